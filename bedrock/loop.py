"""A small event loop: fd readiness, timers and signals, without threads.

Signal handlers only enqueue: Python writes each caught signal's number to
the wakeup pipe (``signal.set_wakeup_fd``) and the loop dispatches it as an
ordinary event, so no handler ever runs loop code (gunicorn's arbiter style).
The emperor, a vassal's top process and its app master all run on this.

No callback can take the loop down: an exception is reported (once per
place and kind, with its traceback; repeats are counted) and the loop goes
on. An fd callback that keeps failing is paused for a second at a time,
since a readable fd whose reader raises would otherwise be retried at full
speed forever: that costs the one connection or channel, not the process.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from bedrock.log import stamped

Callback = Callable[[], Any]
# The timer heap is swept of cancelled timers when it grows past this (and
# then past twice what is left), so it stays proportional to the live ones.
COMPACT_MIN = 1024

# An fd callback failing again within this many seconds is paused for
# SUSPEND_S, then watched again.
REPEAT_FAILURE_S = 1.0
SUSPEND_S = 1.0
# Repeats of a reported failure are summed up at most this often.
SUMMARY_INTERVAL_S = 60.0
# Distinct failure places remembered (beyond, each is reported anew).
MAX_FAILURE_KINDS = 256


def _report_to_stderr(message: str) -> None:
    try:
        os.write(2, stamped(f"loop {os.getpid()}", message))
    except OSError:
        pass


def _describe(callback: Any) -> str:
    name = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    module = getattr(callback, "__module__", None)
    return f"{module}.{name}" if module else name


def reaped() -> Iterator[tuple[int, int]]:
    """Every exited child (pid, wait status) without blocking: waitpid(-1,
    WNOHANG) in a loop, as one SIGCHLD may stand for many exits."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback):
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _noop(signum: int, frame: object) -> None:
    """Delivery happens through the wakeup fd."""


class Loop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._compact_at = COMPACT_MIN
        self._seq = itertools.count()
        self._signal_handlers: dict[int, Callable[[int], Any]] = {}
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self.running = False
        # Where failures of callbacks are told (the emperor may set its log).
        self.report: Callable[[str], None] = _report_to_stderr
        self._failures: dict[tuple[str, str, str], list[float]] = {}
        self._fd_failures: dict[tuple[int, int], float] = {}
        self._pid = os.getpid()

    # --- fds ---------------------------------------------------------------
    # Each registered fd carries [reader, writer]; either may be None.
    def _set(self, fileobj: Any, index: int, callback: Callback | None) -> None:
        try:
            key = self.selector.get_key(fileobj)
            handlers = list(key.data)
        except (KeyError, ValueError):
            key = None
            handlers = [None, None]
        handlers[index] = callback
        mask = (selectors.EVENT_READ if handlers[0] else 0) | (selectors.EVENT_WRITE if handlers[1] else 0)
        try:
            if key is None:
                if mask:
                    self.selector.register(fileobj, mask, handlers)
            elif mask:
                self.selector.modify(fileobj, mask, handlers)
            else:
                self.selector.unregister(fileobj)
        except (ValueError, OSError):
            # A closed fd: nothing left to watch.
            pass

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        self._set(fileobj, 0, callback)

    def remove_reader(self, fileobj: Any) -> None:
        self._set(fileobj, 0, None)

    def add_writer(self, fileobj: Any, callback: Callback) -> None:
        self._set(fileobj, 1, callback)

    def remove_writer(self, fileobj: Any) -> None:
        self._set(fileobj, 1, None)

    def forget(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # --- timers ------------------------------------------------------------
    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(time.monotonic() + max(0.0, delay), callback)

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        if len(self._timers) > self._compact_at:
            # Cancelled timers leave the heap only when they reach its top: a
            # timer re-armed per event (by a flood) would pile them up.
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._compact_at = max(COMPACT_MIN, 2 * len(self._timers))
        return timer

    # --- signals -----------------------------------------------------------
    def add_signal(self, signum: int, callback: Callable[[int], Any]) -> None:
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            self.add_reader(self._wake_r, self._read_signals)
        self._signal_handlers[signum] = callback
        signal.signal(signum, _noop)

    def _read_signals(self) -> None:
        assert self._wake_r is not None
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        seen: list[int] = []
        for signum in data:
            # Coalesce repeats in one batch (many SIGCHLD at once) but keep order.
            if signum not in seen:
                seen.append(signum)
        for signum in seen:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                try:
                    handler(signum)
                except Exception as exc:
                    self._failed(handler, exc, f"the handler of signal {signum}")

    def reset_signals_in_child(self) -> None:
        """After fork: the child must not share our wakeup pipe or handlers."""
        signal.set_wakeup_fd(-1)
        for signum in self._signal_handlers:
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = None
        try:
            self.selector.close()
        except OSError:
            pass

    # --- running -----------------------------------------------------------
    def _next_timeout(self, cap: float | None) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return cap
        delay = max(0.0, self._timers[0][0] - time.monotonic())
        return delay if cap is None else min(cap, delay)

    def _failed(self, callback: Any, exc: Exception, what: str, fd: tuple[Any, int] | None = None) -> None:
        """Called from an except block: report ``exc`` (once per place and
        kind), and give up on an fd callback that fails again at once."""
        if os.getpid() != self._pid:
            # A child forked inside a callback got here with its parent's
            # loop on the stack: it must not go on as a copy of the parent.
            raise
        now = time.monotonic()
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = (_describe(callback), type(exc).__qualname__, where)
        entry = self._failures.get(key)
        if entry is None:
            if len(self._failures) >= MAX_FAILURE_KINDS:
                self._failures.clear()
            self._failures[key] = [now, 0]
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
            self._tell(f"{what} ({key[0]}) failed, the loop goes on; repeats are counted, not shown:\n{details}")
        else:
            entry[1] += 1
            if now - entry[0] >= SUMMARY_INTERVAL_S:
                self._tell(f"{what} ({key[0]}) failed {entry[1]:.0f} more time(s) at {where}: {exc!r}")
                entry[0], entry[1] = now, 0
        if fd is not None:
            fileobj, index = fd
            try:
                fdno = fileobj if isinstance(fileobj, int) else fileobj.fileno()
            except (OSError, ValueError):
                fdno = -1
            last = self._fd_failures.get((fdno, index))
            self._fd_failures[(fdno, index)] = now
            if len(self._fd_failures) > MAX_FAILURE_KINDS:
                self._fd_failures = {k: t for k, t in self._fd_failures.items() if now - t < REPEAT_FAILURE_S}
            if last is not None and now - last < REPEAT_FAILURE_S:
                # Paused, not dropped: a readable fd whose reader raises would
                # spin, but the fd may be the emperor's only eyes (inotify).
                handler = self._handler(fileobj, index)
                self._set(fileobj, index, None)
                self._tell(f"{what} ({key[0]}) keeps failing: not watching fd {fdno} for "
                           f"{'reading' if index == 0 else 'writing'} for {SUSPEND_S:.0f}s")
                if handler is not None:
                    self.call_later(SUSPEND_S, lambda: self._resume(fileobj, index, handler))

    def _handler(self, fileobj: Any, index: int) -> Callback | None:
        try:
            return self.selector.get_key(fileobj).data[index]
        except (KeyError, ValueError):
            return None

    def _resume(self, fileobj: Any, index: int, handler: Callback) -> None:
        """Watch a paused fd again, unless it was closed or re-registered meanwhile."""
        try:
            if (fileobj if isinstance(fileobj, int) else fileobj.fileno()) < 0:
                return
            os.fstat(fileobj if isinstance(fileobj, int) else fileobj.fileno())
        except (OSError, ValueError):
            return
        if self._handler(fileobj, index) is None:
            self._set(fileobj, index, handler)

    def _tell(self, message: str) -> None:
        try:
            self.report(message)
        except Exception:
            _report_to_stderr(message)

    def run_once(self, cap: float | None = None) -> None:
        timeout = self._next_timeout(cap)
        fd_map = self.selector.get_map()
        for key, events in self.selector.select(timeout):
            # An earlier callback of this batch may have dropped this fd.
            current = fd_map.get(key.fd)
            if current is None or current.fileobj is not key.fileobj:
                continue
            # try costs nothing until something raises (3.11's zero-cost
            # exceptions): the fast path stays as it was.
            if events & selectors.EVENT_READ and (callback := current.data[0]) is not None:
                try:
                    callback()
                except Exception as exc:
                    self._failed(callback, exc, "a reader", (key.fileobj, 0))
            if events & selectors.EVENT_WRITE:
                current = fd_map.get(key.fd)
                if current is not None and current.fileobj is key.fileobj and (callback := current.data[1]) is not None:
                    try:
                        callback()
                    except Exception as exc:
                        self._failed(callback, exc, "a writer", (key.fileobj, 1))
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                try:
                    timer.callback()
                except Exception as exc:
                    self._failed(timer.callback, exc, "a timer")

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.running = True
        while self.running and not (until and until()):
            self.run_once(cap=1.0)

    def stop(self) -> None:
        self.running = False
