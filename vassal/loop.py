"""A small event loop: fd readiness, timers and signals, without threads.

Signal handlers only enqueue: Python writes each caught signal's number to
the wakeup pipe (``signal.set_wakeup_fd``) and the loop dispatches it as an
ordinary event, so no handler ever runs loop code (gunicorn's arbiter style).
The emperor, a vassal's top process and its app master all run on this.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

Callback = Callable[[], Any]


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
        self._seq = itertools.count()
        self._signal_handlers: dict[int, Callable[[int], Any]] = {}
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self.running = False

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
                handler(signum)

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

    def run_once(self, cap: float | None = None) -> None:
        timeout = self._next_timeout(cap)
        fd_map = self.selector.get_map()
        for key, events in self.selector.select(timeout):
            # An earlier callback of this batch may have dropped this fd.
            current = fd_map.get(key.fd)
            if current is None or current.fileobj is not key.fileobj:
                continue
            if events & selectors.EVENT_READ and current.data[0] is not None:
                current.data[0]()
            if events & selectors.EVENT_WRITE:
                current = fd_map.get(key.fd)
                if current is not None and current.fileobj is key.fileobj and current.data[1] is not None:
                    current.data[1]()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        self.running = True
        while self.running and not (until and until()):
            self.run_once(cap=1.0)

    def stop(self) -> None:
        self.running = False
