"""uWSGI's signal framework: numbered signals (0-255) that an app registers
with a target and a handler, raised by the app, by timers, crons and file
monitors in the master, or by another node (modifier1 110).

The master routes each raised signal to its target: ``worker`` (or empty:
exactly one worker, whichever takes it first from a queue they all read),
``workers`` (each), ``workerN``, ``active-workers`` (each worker not being
retired). A handler registered in the master is every worker's (inherited
at fork); one registered in a worker runs only in that worker, so the
master sends its signals there alone.

Queues are datagram socketpairs made by the master before the first fork:
one shared by all workers (for ``worker``) and one per worker slot, which
also carries the worker's requests to the master (raise, register, add a
timer). Every message is small and the master checks each one: an app
cannot make it raise.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bedrock.log import log
from bedrock.sockets import send_now

SIGNALS = 256
MAX_TIMERS = 64  # of each kind, as uWSGI's tables
MAX_MESSAGE = 16384
READ_CHUNK = 65536
TARGETS = ("worker", "workers", "active-workers")
_WORKER_N = re.compile(r"worker(\d+)\Z")


class SignalError(ValueError):
    pass


def check_number(num: object) -> int:
    if not isinstance(num, int) or isinstance(num, bool) or not 0 <= num < SIGNALS:
        raise SignalError(f"a signal number is 0 to {SIGNALS - 1}, not {num!r}")
    return num


def check_target(target: object, numproc: int) -> str:
    """The canonical target ('' is uWSGI's default: one worker)."""
    if isinstance(target, bytes):
        target = target.decode(errors="replace")
    if not isinstance(target, str):
        raise SignalError(f"a signal target is a string, not {type(target).__name__}")
    if target in ("", "worker"):
        return "worker"
    if target in TARGETS:
        return target
    match = _WORKER_N.match(target)
    if match and 1 <= int(match.group(1)) <= numproc:
        return target
    raise SignalError(f"signal target {target!r}: expected worker, workers, active-workers or worker1..worker{numproc}")


@dataclass
class Entry:
    target: str
    handler: Callable | None  # None: known in the master, the handler lives in a worker
    owners: set[int] = field(default_factory=set)  # worker ids holding a handler (0: every worker)


class SignalTable:
    """The signals this process knows: the master's (with every handler
    registered before the fork) or a worker's (those plus its own)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}

    def register(self, num: int, target: str, handler: Callable | None, wid: int) -> None:
        entry = self.entries.get(num)
        if entry is None:
            entry = self.entries[num] = Entry(target, handler)
        entry.target = target
        if handler is not None:
            entry.handler = handler
        entry.owners.add(wid)

    def registered(self, num: int) -> bool:
        return num in self.entries

    def run(self, num: int, wid: int) -> None:
        """The handler, in this process; never raises."""
        entry = self.entries.get(num)
        if entry is None or entry.handler is None:
            log(f"error managing signal {num} on worker {wid}: no handler registered here")
            return
        try:
            entry.handler(num)
        except BaseException as exc:  # (SystemExit too: a remote signal must not end the worker)
            log(f"signal {num} handler on worker {wid} raised {type(exc).__name__}: {exc}")


# --- timers, crons, file monitors (run by the master) -----------------------


@dataclass
class Timer:
    num: int
    every: float
    due: float
    left: int  # rb timers: iterations to go (0: for ever)

    def advance(self, now: float) -> None:
        self.due += self.every
        if self.due <= now:
            self.due = now + self.every  # after a stall: once, not a burst to catch up


@dataclass
class Cron:
    num: int
    fields: tuple[int, int, int, int, int]  # minute, hour, day, month, weekday


@dataclass
class FileMonitor:
    num: int
    path: str
    seen: tuple | None


def _stat_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def cron_matches(fields: tuple[int, int, int, int, int], moment: time.struct_time) -> bool:
    """uWSGI's cron fields: -1 any, -N every N (the value divisible by N),
    else equal. Weekday 0 is Sunday, as in crontab."""
    values = (moment.tm_min, moment.tm_hour, moment.tm_mday, moment.tm_mon, (moment.tm_wday + 1) % 7)
    for wanted, value in zip(fields, values, strict=True):
        if wanted == -1:
            continue
        if wanted < -1:
            if value % -wanted:
                return False
        elif wanted != value:
            return False
    return True


def check_cron(fields: tuple) -> tuple[int, int, int, int, int]:
    limits = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
    names = ("minute", "hour", "day", "month", "weekday")
    if len(fields) != 5:
        raise SignalError("a cron has five fields: minute, hour, day, month, weekday")
    out = []
    for value, (low, high), name in zip(fields, limits, names, strict=True):
        if not isinstance(value, int) or isinstance(value, bool) or not (value < 0 and value >= -high - 1 or low <= value <= high):
            raise SignalError(f"cron {name} {value!r}: expected {low}-{high}, -1 (any) or -N (every N)")
        out.append(value)
    return tuple(out)  # type: ignore[return-value]


class Clock:
    """The master's signal sources; ``fire`` gives the signals now due."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.rb_timers: list[Timer] = []
        self.crons: list[Cron] = []
        self.monitors: list[FileMonitor] = []
        self.next_minute = (int(time.time()) // 60 + 1) * 60
        self.next_poll = 0.0  # file monitors: polled once a second

    def add_timer(self, num: int, seconds: object, iterations: object = 0, rb: bool = False) -> None:
        kind = self.rb_timers if rb else self.timers
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0.01 <= seconds <= 86400 * 366:
            raise SignalError(f"a timer's period is a positive number of seconds, not {seconds!r}")
        if not isinstance(iterations, int) or iterations < 0:
            raise SignalError(f"iterations is 0 (for ever) or more, not {iterations!r}")
        if len(kind) >= MAX_TIMERS:
            raise SignalError(f"at most {MAX_TIMERS} {'rb ' if rb else ''}timers")
        kind.append(Timer(num, float(seconds), time.monotonic() + seconds, iterations))

    def add_cron(self, num: int, fields: tuple) -> None:
        if len(self.crons) >= MAX_TIMERS:
            raise SignalError(f"at most {MAX_TIMERS} crons")
        self.crons.append(Cron(num, check_cron(fields)))

    def add_file_monitor(self, num: int, path: object) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str) or not path or "\0" in path:
            raise SignalError(f"a file monitor watches a path, not {path!r}")
        if len(self.monitors) >= MAX_TIMERS:
            raise SignalError(f"at most {MAX_TIMERS} file monitors")
        self.monitors.append(FileMonitor(num, path, _stat_key(path)))

    def add(self, request: object) -> None:
        """A timer, cron or file monitor, as a worker asks for it (untrusted)."""
        if not isinstance(request, dict):
            raise SignalError("a timer request is an object")
        num = check_number(request.get("num"))
        kind = request.get("kind")
        if kind in ("timer", "rb_timer"):
            self.add_timer(num, request.get("seconds"), request.get("iterations", 0), rb=kind == "rb_timer")
        elif kind == "cron":
            fields = request.get("fields")
            self.add_cron(num, tuple(fields) if isinstance(fields, list) else ())
        elif kind == "file_monitor":
            self.add_file_monitor(num, request.get("path"))
        else:
            raise SignalError(f"unknown timer kind {kind!r}")

    def empty(self) -> bool:
        return not (self.timers or self.rb_timers or self.crons or self.monitors)

    def next_in(self, now: float) -> float | None:
        """Seconds to the next thing due (file monitors: polled every second)."""
        if self.empty():
            return None
        dues = [timer.due for timer in (*self.timers, *self.rb_timers)]
        wait = min(dues) - now if dues else 60.0
        if self.monitors:
            wait = min(wait, self.next_poll - now)
        if self.crons:
            wait = min(wait, self.next_minute - time.time())
        return max(0.0, wait)

    def fire(self, now: float) -> list[int]:
        due: list[int] = []
        for timer in self.timers:
            if now >= timer.due:
                due.append(timer.num)
                timer.advance(now)
        for timer in list(self.rb_timers):
            if now >= timer.due:
                due.append(timer.num)
                timer.advance(now)
                if timer.left:
                    timer.left -= 1
                    if not timer.left:
                        self.rb_timers.remove(timer)
        wall = time.time()
        if self.crons and wall >= self.next_minute:
            moment = time.localtime(self.next_minute)
            self.next_minute = (int(wall) // 60 + 1) * 60
            due.extend(cron.num for cron in self.crons if cron_matches(cron.fields, moment))
        if now < self.next_poll:
            return due
        self.next_poll = now + 1.0
        for monitor in self.monitors:
            seen = _stat_key(monitor.path)
            if seen != monitor.seen:
                monitor.seen = seen
                due.append(monitor.num)
        return due


# --- the queues ---------------------------------------------------------------


def _pair(kind: int, bufsize: int) -> tuple[socket.socket, socket.socket]:
    ends = socket.socketpair(socket.AF_UNIX, kind)
    for end in ends:
        end.setblocking(False)
        if bufsize:
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    return ends


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """False when the queue is full (the signal is dropped, as in uWSGI)."""
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


class Outbox:
    """Bytes for the queues, sent whole when there is room: a kernel buffer
    counts each send, not each byte, so a burst of single-byte sends fills
    it at a few hundred signals; what waits here goes out in one send."""

    LIMIT = 65536  # per queue; past it a signal is dropped (and counted)

    def __init__(self) -> None:
        self.pending: dict[socket.socket, bytearray] = {}

    def put(self, sock: socket.socket, data: bytes) -> bool:
        waiting = self.pending.get(sock)
        if waiting is None:
            sent = send_now(sock, (data,))
            if sent is None:
                return False
            if sent < len(data):
                self.pending[sock] = bytearray(data[sent:])
            return True
        if len(waiting) + len(data) > self.LIMIT:
            return False
        waiting += data
        return True

    def flush(self) -> None:
        for sock, waiting in list(self.pending.items()):
            try:
                sent = sock.send(waiting)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                sent = len(waiting)
            del waiting[:sent]
            if not waiting:
                del self.pending[sock]


class Queues:
    """Signals travel as single bytes on stream socketpairs, as in uWSGI (a
    byte each, so a queue holds its whole buffer's worth): workers raise
    on one the master reads; the master sends to one all workers read (a
    byte goes to exactly one of them) and to one per worker slot. A
    worker's other requests (register, add a timer) are packets on its
    slot's seqpacket pair, so one that dies mid-request leaves no half
    message for the next worker in its slot."""

    def __init__(self, numproc: int, bufsize: int = 0):
        self.raised_master, self.raised_worker = _pair(socket.SOCK_STREAM, bufsize)
        self.shared_master, self.shared_worker = _pair(socket.SOCK_STREAM, bufsize)
        self.slots = [_pair(socket.SOCK_STREAM, bufsize) for _ in range(numproc)]  # (master end, worker end) per worker id - 1
        self.requests = [_pair(socket.SOCK_SEQPACKET, 0) for _ in range(numproc)]

    def worker_ends(self, wid: int) -> tuple[socket.socket, socket.socket]:
        """A worker's own queue and the shared one."""
        return self.slots[wid - 1][1], self.shared_worker

    def close(self) -> None:
        for pair in (*self.slots, *self.requests, (self.raised_master, self.raised_worker),
                     (self.shared_master, self.shared_worker)):
            for end in pair:
                end.close()


class Router:
    """The master's side: registrations, the clock, and where each raised
    signal goes. ``live`` and ``active`` say which worker ids run now."""

    def raised(self, data: bytes) -> None:
        """Signal numbers the workers raised, a byte each."""
        for num in data:
            self.raise_signal(num)

    def __init__(self, queues: Queues, table: SignalTable, clock: Clock, numproc: int,
                 live: Callable[[], set[int]], active: Callable[[], set[int]]):
        self.queues = queues
        self.table = table
        self.clock = clock
        self.numproc = numproc
        self.live = live
        self.active = active
        self.dropped = 0
        self.unknown_logged: set[int] = set()
        self.outbox = Outbox()

    def raise_signal(self, num: int) -> bool:
        """Send it to its target; False when nothing takes it."""
        entry = self.table.entries.get(num)
        if entry is None:
            if num not in self.unknown_logged:
                self.unknown_logged.add(num)
                log(f"signal {num} is not registered: dropped")
            return False
        target = entry.target
        if target == "worker" and 0 in entry.owners:
            return self._send(self.queues.shared_master, num)
        if target in ("worker", "workers"):
            wids = self.live()
        elif target == "active-workers":
            wids = self.active()
        else:
            wids = {int(target[6:])} & self.live()
        if 0 not in entry.owners:
            wids &= entry.owners  # its handler lives only there
        if target == "worker":
            wids = set(sorted(wids)[:1])
        sent = False
        for wid in sorted(wids):
            sent = self._send(self.queues.slots[wid - 1][0], num) or sent
        return sent

    def _send(self, end: socket.socket, num: int) -> bool:
        if self.outbox.put(end, bytes((num,))):
            return True
        self.dropped += 1
        if self.dropped in (1, 10, 100, 1000) or self.dropped % 10000 == 0:
            log(f"signal queue full: {self.dropped} signal(s) dropped so far (signal-bufsize)")
        return False

    def tick(self) -> None:
        for num in self.clock.fire(time.monotonic()):
            self.raise_signal(num)

    def worker_gone(self, wid: int) -> None:
        """Its own handlers died with it (a respawned one registers again)."""
        for num, entry in list(self.table.entries.items()):
            entry.owners.discard(wid)
            if not entry.owners:
                del self.table.entries[num]

    def on_message(self, wid: int, data: bytes) -> None:
        """A worker's request; anything malformed is logged and dropped."""
        if not data:
            return
        kind, body = data[:1], data[1:]
        try:
            if kind == b"r" and len(body) >= 1:
                num = body[0]
                self.table.register(num, check_target(body[1:].decode(), self.numproc), None, wid)
            elif kind == b"t":
                self.clock.add(json.loads(body))
            else:
                raise SignalError(f"unknown message {data[:16]!r}")
        except Exception as exc:  # (RecursionError from nested JSON, too)
            log(f"signals: worker {wid}'s request refused: {type(exc).__name__}: {str(exc)[:200]}")


def source_request(kind: str, num: int, **fields: object) -> bytes:
    return b"t" + json.dumps({"kind": kind, "num": num, **fields}).encode()
