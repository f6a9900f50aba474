"""The ``uwsgi`` module that apps import, as uWSGI embeds it: worker ids,
RPC, signals, timers, crons, file monitors, ``atexit``, ``opt``.

It exists only inside a vassal (put in ``sys.modules`` before the app is
imported), like uWSGI's, so ``uwsgidecorators`` works unchanged. One
``Runtime`` per process holds the state: in the app master (worker id 0)
what is registered there is inherited by every worker at fork; a worker
(``become_worker``) registers for itself and asks the master (over its
signal queue, vassal.signals) to route signals and run timers. With one
worker and no separate master the process is both (``single``).
"""

from __future__ import annotations

import atexit as atexit_module
import os
import socket
import sys
import time
import types
from collections.abc import Callable

from bedrock.config import Config
from bedrock.log import log
from vassal import rpc, signals
from vassal.rpc import RpcError, RpcTable, as_bytes
from vassal.signals import (
    Clock,
    Queues,
    Router,
    SignalError,
    SignalTable,
    check_number,
    check_target,
    source_request,
)


class Runtime:
    def __init__(self, config: Config, numproc: int):
        self.config = config
        self.numproc = numproc
        self.wid = 0
        self.role = "master"
        self.masterpid = os.getpid()
        self.timeout = float(config.get_int("socket-timeout"))
        self.rpc = RpcTable(config.get_int("rpc-max"))
        self.table = SignalTable()
        self.clock = Clock()
        self.queues = Queues(numproc, config.get_int("signal-bufsize"))
        self.router: Router | None = None
        self.channel: socket.socket | None = None  # a worker's requests to the master
        self.outbox = signals.Outbox()  # a worker's raised signals
        self.module = build_module(self)

    # --- roles --------------------------------------------------------------------
    def route(self, live: Callable[[], set[int]], active: Callable[[], set[int]]) -> Router:
        """In the master (or a lone worker): route signals, run the clock."""
        self.router = Router(self.queues, self.table, self.clock, self.numproc, live, active)
        return self.router

    def become_worker(self, wid: int) -> None:
        """In a freshly forked worker."""
        self.wid = wid
        self.role = "worker"
        self.router = None
        self.channel = self.queues.requests[wid - 1][1]

    def become_single(self) -> Router:
        """One worker serving from the master's process."""
        self.wid = 1
        self.role = "single"
        return self.route(lambda: {1}, lambda: {1})

    def worker_queues(self) -> list[socket.socket]:
        own, shared = self.queues.worker_ends(self.wid)
        return [own, shared]

    # --- what the worker loop calls ---------------------------------------------
    def receive(self, sock: socket.socket) -> None:
        """Signals waiting on one of our queues: their handlers run here
        (a round's worth, then back to serving; the rest next round)."""
        try:
            data = sock.recv(signals.READ_CHUNK)
        except OSError:
            return
        for num in data:
            self.table.run(num, self.wid)

    def receive_raised(self, sock: socket.socket) -> None:
        """In the master: signals the workers raised."""
        assert self.router is not None
        try:
            data = sock.recv(signals.READ_CHUNK)
        except OSError:
            return
        self.router.raised(data)

    def receive_requests(self, wid: int, sock: socket.socket) -> None:
        """In the master: a worker's requests."""
        assert self.router is not None
        for _ in range(64):
            try:
                data = sock.recv(signals.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.router.on_message(wid, data)

    def flush(self) -> bool:
        """Signals still waiting for room in a queue: True while some do."""
        outbox = self.router.outbox if self.router is not None else self.outbox
        if outbox.pending:
            outbox.flush()
        return bool(outbox.pending)

    def next_in(self) -> float | None:
        return self.clock.next_in(time.monotonic()) if self.router is not None else None

    def tick(self) -> None:
        if self.router is not None:
            self.router.tick()

    def run_atexit(self) -> None:
        """A worker's last words (unless skip-atexit): uwsgi.atexit, then the
        atexit module's functions, as uWSGI runs them."""
        if self.config.get_bool("skip-atexit"):
            return
        hook = getattr(self.module, "atexit", None)
        if callable(hook):
            try:
                hook()
            except Exception as exc:
                log(f"uwsgi.atexit raised {type(exc).__name__}: {exc}")
        try:
            atexit_module._run_exitfuncs()
        except Exception as exc:
            log(f"an atexit function raised {type(exc).__name__}: {exc}")

    def post_fork(self) -> None:
        hook = getattr(self.module, "post_fork_hook", None)
        if callable(hook):
            hook()

    # --- the API ----------------------------------------------------------------
    def _to_master(self, data: bytes) -> None:
        if self.router is not None:
            self.router.on_message(self.wid, data)
        elif self.channel is None or not signals.send_quietly(self.channel, data):
            raise SignalError("the master's request queue is full")

    def register_signal(self, num: object, target: object, handler: object) -> None:
        num = check_number(num)
        if not callable(handler):
            raise SignalError("a signal handler must be callable")
        canonical = check_target(target, self.numproc)
        if self.role == "worker":
            self.table.register(num, canonical, handler, self.wid)
            self._to_master(b"r" + bytes((num,)) + canonical.encode())
        else:
            self.table.register(num, canonical, handler, 0)
        log(f"[uwsgi-signal] signum {num} registered (wid: {self.wid} target: {canonical})")

    def signal(self, num: object, node: object = None) -> None:
        num = check_number(num)
        if node:
            where = as_bytes(node, "the node").decode(errors="replace")
            try:
                accepted = rpc.remote_signal(where, num, self.timeout)
            except OSError as exc:
                raise OSError(f"unable to deliver signal {num} to node {where}: {exc}") from None
            if not accepted:
                raise ValueError(f"node {where} rejected signal {num}")
            return
        if self.router is not None:
            self.router.raise_signal(num)
        elif not self.outbox.put(self.queues.raised_worker, bytes((num,))):
            raise SignalError(f"signal {num}: the master's signal queue is full (signal-bufsize)")

    def add_source(self, kind: str, num: object, **fields: object) -> None:
        request = {"kind": kind, "num": check_number(num), **fields}
        if self.role == "worker":
            Clock().add(request)  # (checked here too: the app gets the error, not the master's log)
            self._to_master(source_request(kind, request["num"], **fields))
        else:
            self.clock.add(request)

    def call(self, name: object, args: tuple) -> bytes | None:
        """None when there is no result (no such function, it failed, or
        it gave nothing), as uWSGI's module answers."""
        return self.rpc.call(as_bytes(name, "the function name"), [as_bytes(a, "an rpc argument") for a in args])

    def remote(self, node: object, name: object, args: tuple) -> bytes | None:
        if not node:
            return self.call(name, args)
        where = as_bytes(node, "the node").decode(errors="replace")
        key, values = as_bytes(name, "the function name"), [as_bytes(a, "an rpc argument") for a in args]
        try:
            return rpc.remote_call(where, key, values, self.timeout)
        except (OSError, RpcError) as exc:
            log(f"rpc to {where}: {exc}")
            return None


_current: Runtime | None = None


def current() -> Runtime | None:
    """This process's runtime (None outside an app master and its workers)."""
    return _current


def install(config: Config, numproc: int) -> Runtime:
    """Before the app is imported: ``import uwsgi`` gives this process's module."""
    global _current
    _current = Runtime(config, numproc)
    sys.modules["uwsgi"] = _current.module
    return _current


def build_module(runtime: Runtime) -> types.ModuleType:
    module = types.ModuleType("uwsgi", "pyemperor's uwsgi module (uWSGI's API for apps)")
    api = module.__dict__

    def worker_id() -> int:
        return runtime.wid

    def masterpid() -> int:
        return runtime.masterpid

    def mule_id() -> int:
        return 0

    def register_rpc(name, func, argc: int = 0) -> bool:
        runtime.rpc.register(name, func, "master" if runtime.wid == 0 or runtime.role == "single" else f"worker {runtime.wid}")
        return True

    def rpc_call(node, name, *args) -> bytes | None:
        return runtime.remote(node, name, args)

    def call(name, *args) -> bytes | None:
        return runtime.call(name, args)

    def rpc_list() -> tuple[bytes, ...]:
        return runtime.rpc.names()

    def register_signal(num, target, handler) -> None:
        runtime.register_signal(num, target, handler)

    def signal(num, node=None) -> None:
        runtime.signal(num, node)

    def signal_registered(num) -> bool:
        return runtime.table.registered(check_number(num))

    def add_timer(num, seconds) -> None:
        runtime.add_source("timer", num, seconds=seconds)

    def add_rb_timer(num, seconds, iterations: int = 0) -> None:
        runtime.add_source("rb_timer", num, seconds=seconds, iterations=iterations)

    def add_cron(num, minute, hour, day, month, weekday) -> bool:
        runtime.add_source("cron", num, fields=[minute, hour, day, month, weekday])
        return True

    def add_file_monitor(num, path) -> None:
        runtime.add_source("file_monitor", num, path=os.fsdecode(path) if isinstance(path, bytes) else path)

    for func in (worker_id, masterpid, mule_id, register_rpc, call, rpc_list, register_signal, signal,
                 signal_registered, add_timer, add_rb_timer, add_cron, add_file_monitor):
        api[func.__name__] = func
    api["rpc"] = rpc_call
    api["numproc"] = runtime.numproc
    opt: dict[str, object] = {}
    for entry in runtime.config.expanded:  # (uWSGI's: bytes; a repeated key a list)
        value = entry.value.encode()
        before = opt.get(entry.key)
        opt[entry.key] = value if before is None else [*before, value] if isinstance(before, list) else [before, value]
    api["opt"] = opt
    api["SPOOL_OK"], api["SPOOL_RETRY"], api["SPOOL_IGNORE"] = -2, -1, 0
    return module
