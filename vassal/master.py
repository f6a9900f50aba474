"""The app master: loads the app once, pre-forks workers, respawns the ones
that die. A graceful reload replaces the master as a whole (see top.py).

It reports to the top process over ``ctl`` (a socketpair end it shares with
its workers): ``R`` once every worker is up, ``L`` (from a worker) after the
first request. End of file on ``ctl`` means the top process is gone.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
import traceback
import zlib

import jails
from bedrock import protocol
from bedrock.config import Config
from bedrock.log import log, set_role
from bedrock.loop import Loop, reaped
from bedrock.proc import kill_quietly, run_and_exit
from bedrock.sockets import Listener, recv_or_eof
from jails import JailError, locks
from jails.locks import FcntlLock, SysvSemaphore
from vassal import hooks, phases, routing, uwsgi_api
from vassal.app import AppLoadError, load_app
from vassal.cheaper import Cheaper
from vassal.gevent_worker import MIN_SOCKET_TIMEOUT, GeventWorker
from vassal.handover import Handover
from vassal.http_parser import Limits
from vassal.scoreboard import Scoreboard
from vassal.spool import SpoolBudget
from vassal.status import StatusChannel
from vassal.worker import Worker

# A worker that dies sooner than this after its start is respawned after a
# pause, so a crashing app does not fork in a tight loop.
QUICK_DEATH = 1.0


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass


class Master:
    def __init__(self, name: str, config: Config, listeners: list[Listener], ctl: socket.socket, loop: Loop,
                 handover: Handover | None = None):
        self.name = name
        self.handover = handover
        self.config = config
        self.listeners = listeners
        self.ctl = ctl
        self.parent_loop = loop
        self.loop = Loop()
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.status = StatusChannel()
        self.processes = config.get_int("processes")
        self.stopping = False
        self.app = None
        self.lazy = config.get_bool("lazy-apps")
        self.gevent = config.get_int("gevent")
        self.harakiri = config.get_int("harakiri")
        self.reload_on_rss = config.get_int("reload-on-rss") * 1024 * 1024
        self.scoreboard = Scoreboard(self.processes)
        self.lock: FcntlLock | SysvSemaphore | None = None
        self.runtime: uwsgi_api.Runtime | None = None
        self.clock_timer = None
        self.flushing: set[socket.socket] = set()
        self.exit_code = 0
        self.cheaper: Cheaper | None = None
        self.cheapened: set[int] = set()
        if config.has("cheaper"):
            self.cheaper = Cheaper(
                config.get_int("cheaper"),
                self.processes,
                config.get_opt_int("cheaper-initial"),
                config.get_int("cheaper-step", 1),
                config.get_opt_int("cheaper-rss-limit-soft"),
                config.get_opt_int("cheaper-rss-limit-hard"),
            )

    def run(self) -> None:
        """Runs in the forked child; never returns."""
        run_and_exit(self._run, lambda trace: log(f"app master crashed:\n{trace}"))

    def _run(self) -> int:
        set_role(f"{self.name} master")
        set_title(f"vassal master {self.name}")
        jails.backend().die_with_parent(signal.SIGTERM)  # if the top process is killed outright
        self.parent_loop.reset_signals_in_child()
        try:
            phases.drop_privileges(self.config)
            hooks.run_phase(self.config, "as-user")
            hooks.run_phase(self.config, "pre-app")
        except hooks.HookExit as exc:
            return exc.code
        except (hooks.HookError, JailError, OSError) as exc:
            log(str(exc))
            return protocol.EXIT_HOOK
        # Before the app is imported: its `import uwsgi` (and what it
        # registers there is every worker's).
        if self.gevent:
            problem = self._prepare_gevent()
            if problem:
                log(problem)
                return protocol.EXIT_APP_LOAD
        self.runtime = uwsgi_api.install(self.config, self.processes)
        if self.gevent:
            self.runtime.timeout = max(self.runtime.timeout, MIN_SOCKET_TIMEOUT)
        if not self.lazy:
            try:
                self.app = load_app(self.config)
            except AppLoadError as exc:
                log(f"app-load failed: {exc}")
                return protocol.EXIT_APP_LOAD
            except BaseException:
                log(f"app-load failed:\n{traceback.format_exc().rstrip()}")
                return protocol.EXIT_APP_LOAD
        try:
            hooks.run_phase(self.config, "post-app")
        except hooks.HookExit as exc:
            return exc.code
        except hooks.HookError as exc:
            log(str(exc))
            return protocol.EXIT_HOOK
        routing.log_tables(self.config)
        thunder = self.config.get_bool("thunder-lock")
        # One worker and nothing to watch it for: serve from this process
        # (gevent: a master enforces worker-reload-mercy).
        if self.processes == 1 and not (self.config.has("cheaper") or self.lazy or self.harakiri or self.reload_on_rss or self.gevent):
            log("thunder lock: enabled (one worker: nothing to serialize)" if thunder
                else "thunder lock: disabled (you can enable it with --thunder-lock)")
            return self._run_single()
        if thunder:
            try:
                lock = self._make_lock()
            except OSError as exc:
                log(f"thunder lock: cannot make it: {exc}")
                return protocol.EXIT_ERROR
            log(f"thunder lock: enabled (engine {lock.engine})")
        else:
            log("thunder lock: disabled (you can enable it with --thunder-lock)")
        try:
            return self._supervise()
        finally:
            if self.lock is not None:
                self.lock.close(owner=True)

    def _socket_signature(self) -> int:
        return zlib.crc32(" ".join(sorted(f"{listener.kind}:{listener.address}" for listener in self.listeners)).encode())

    def _make_lock(self) -> FcntlLock | SysvSemaphore:
        self.lock = locks.make(self.config.get_str("lock-engine", "fcntl"), self._socket_signature(),
                               self.config.get_opt_str("ftok"), self.config.get_bool("persistent-ipcsem"))
        return self.lock

    def _check_lock(self) -> bool:
        """A semaphore removed under us (ipcrm): the workers that used it
        exit; their replacements get a new one (the same key). If none can be
        made, the master gives up (the top starts another) rather than run
        without workers."""
        if not isinstance(self.lock, SysvSemaphore) or self.lock.exists():
            return True
        old = self.lock.id
        try:
            self.lock = self.lock.renewed(self._socket_signature())
        except OSError as exc:
            log(f"thunder lock: semaphore {old} is gone and no new one can be made ({exc}): stopping")
            self.exit_code = protocol.EXIT_ERROR
            self.stop(graceful=True)
            return False
        log(f"thunder lock: semaphore {old} is gone, workers from now on use {self.lock.id}")
        return True

    def _supervise(self) -> int:
        loop = self.loop
        loop.add_signal(signal.SIGCHLD, lambda s: self._reap())
        loop.add_signal(signal.SIGTERM, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGHUP, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGINT, lambda s: self.stop(graceful=False))
        loop.add_signal(signal.SIGQUIT, lambda s: self.stop(graceful=False))
        loop.add_reader(self.ctl, self._on_ctl)
        self._route_signals()
        for index in range(self.cheaper.initial if self.cheaper else self.processes):
            self._spawn(index)
        # Every second: harakiri, reload-on-rss, cheaper, and the status report.
        loop.call_later(1.0, self._watch_workers)
        self.ctl.send(b"R")
        self._report()
        loop.run(until=lambda: self.stopping and not self.workers)
        hooks.run_phase(self.config, "as-user-atexit", fatal=False)
        return self.exit_code

    def _route_signals(self) -> None:
        """uwsgi signals: the workers' requests, and the clock's signals."""
        runtime = self.runtime
        assert runtime is not None
        router = runtime.route(lambda: {index + 1 for index, _ in self.workers.values()},
                               lambda: {index + 1 for pid, (index, _) in self.workers.items() if pid not in self.cheapened})

        def requests(sock, wid: int) -> None:
            runtime.receive_requests(wid, sock)
            self._arm_clock()  # (it may have added a timer)

        def raised() -> None:
            runtime.receive_raised(runtime.queues.raised_master)
            self._flush_signals()

        for wid, (master_end, _) in enumerate(runtime.queues.requests, start=1):
            self.loop.add_reader(master_end, lambda _fd=None, sock=master_end, wid=wid: requests(sock, wid))
        self.loop.add_reader(runtime.queues.raised_master, lambda _fd=None: raised())
        router.tick()
        self._arm_clock()

    def _arm_clock(self) -> None:
        assert self.runtime is not None
        if self.clock_timer is not None:
            self.clock_timer.cancel()
            self.clock_timer = None
        wait = self.runtime.next_in()
        if wait is not None and not self.stopping:
            self.clock_timer = self.loop.call_later(wait, self._on_clock)

    def _on_clock(self) -> None:
        self.clock_timer = None
        assert self.runtime is not None
        self.runtime.tick()
        self._flush_signals()
        self._arm_clock()

    def _flush_signals(self) -> None:
        """Signals for a worker whose queue is full wait until it has room."""
        assert self.runtime is not None and self.runtime.router is not None
        outbox = self.runtime.router.outbox
        for sock in list(self.flushing):
            if sock not in outbox.pending:
                self.loop.remove_writer(sock)
                self.flushing.discard(sock)
        for sock in outbox.pending:
            if sock not in self.flushing:
                self.flushing.add(sock)
                self.loop.add_writer(sock, lambda _fd=None: (outbox.flush(), self._flush_signals()))

    def _prepare_gevent(self) -> str | None:
        """gevent is optional: a vassal asking for it without it fails to
        load its app, with a message naming the package."""
        try:
            import gevent  # noqa: F401
        except ImportError as exc:
            return (f"app-load failed: gevent = {self.gevent} needs the gevent package ({exc}); "
                    "install it in the vassal's Python (pip install gevent, or pyemperor[gevent])")
        if self.config.get_bool("gevent-early-monkey-patch"):
            from gevent import monkey

            monkey.patch_all()
            log("gevent: monkey-patched before the app is imported")
        return None

    def _worker(self, index: int, scoreboard: bool = True) -> Worker:
        kind = Worker
        extra: dict = {}
        if self.gevent:
            kind = GeventWorker
            extra = {"cores": self.gevent, "wait_for_hub": self.config.get_bool("gevent-wait-for-hub"),
                     "socket_timeout": float(self.config.get_int("socket-timeout"))}
        spool_limit = self.config.get_int("body-spool-limit")  # (each worker its own: made here, after the fork)
        return kind(
            index + 1,
            self.listeners,
            self.app,  # type: ignore[arg-type]
            self.ctl.fileno(),
            max_head=self.config.get_int("buffer-size"),
            max_body=self.config.get_int("limit-post"),
            keepalive=self.config.get_int("http-keepalive"),
            http_limits=Limits(
                head=self.config.get_int("buffer-size"),
                body=self.config.get_int("limit-post"),
                request_line=self.config.get_int("limit-request-line"),
                fields=self.config.get_int("limit-request-fields"),
                field_size=self.config.get_int("limit-request-field-size"),
                body_timeout=float(self.config.get_int("socket-timeout")),
                keep_alive=self.config.get_int("http-keepalive") > 0,
                spool=SpoolBudget(spool_limit) if spool_limit else None,
            ),
            max_requests=self.config.get_int("max-requests"),
            scoreboard=self.scoreboard if scoreboard else None,
            handover=self.handover,
            head_timeout=self.config.get_float("http-head-timeout"),
            access_log=not self.config.get_bool("disable-logging"),
            memory_report=self.config.get_bool("memory-report"),
            lock=self.lock if scoreboard else None,
            runtime=self.runtime,
            **extra,
        )

    def _watch_workers(self) -> None:
        """harakiri: a worker stuck on one request too long is killed (and
        replaced by the reaper); reload-on-rss: a worker past the limit is
        recycled gracefully."""
        now = time.time()
        for pid, (index, _) in list(self.workers.items()):
            started, _, line = self.scoreboard.read(index)
            if self.harakiri and started and now - started > self.harakiri:
                log(f"HARAKIRI: worker {index + 1} (pid {pid}) stuck for {now - started:.0f}s on {line!r}, killing it")
                self.scoreboard.clear(index)
                kill_quietly(pid, signal.SIGKILL)
            elif self.reload_on_rss and jails.backend().rss(pid) > self.reload_on_rss:
                log(f"worker {index + 1} (pid {pid}) uses {jails.backend().rss(pid) // 1048576} MB > reload-on-rss, recycling it")
                kill_quietly(pid, signal.SIGTERM)
        if self.cheaper is not None and not self.stopping:
            self._cheaper_step()
        if not self.stopping:
            self._report()
            self.loop.call_later(1.0, self._watch_workers)

    def _report(self) -> None:
        """Workers (pid, RSS, busy) and the last cheaper decision, to the emperor."""
        workers = []
        for pid, (index, _) in sorted(self.workers.items(), key=lambda item: item[1][0]):
            started, requests, _ = self.scoreboard.read(index)
            workers.append({"index": index + 1, "pid": pid, "rss_bytes": jails.backend().rss(pid), "busy": bool(started),
                            "requests": requests, "cheapened": pid in self.cheapened,
                            "accept_races": self.scoreboard.races(index)})
        cheaper = None
        if self.cheaper is not None:
            last = self.cheaper.last
            cheaper = {
                "minimum": self.cheaper.minimum,
                "maximum": self.cheaper.maximum,
                "workers": sum(1 for w in workers if not w["cheapened"]),
                "last": None if last is None else {"action": last.action, "count": last.count, "reason": last.reason, "at": last.at},
            }
        lock = {"enabled": self.lock is not None, **(self.lock.describe() if self.lock is not None else {})}
        self.status.send({"master_pid": os.getpid(), "at": time.time(), "workers": workers, "cheaper": cheaper,
                          "thunder_lock": lock})

    def _cheaper_step(self) -> None:
        assert self.cheaper is not None
        live = {pid: index for pid, (index, _) in self.workers.items() if pid not in self.cheapened}
        sizes = {pid: jails.backend().rss(pid) for pid in live}
        busy = sum(1 for index in live.values() if self.scoreboard.read(index)[0])
        backlog = max((jails.backend().listen_backlog(listener.sock) for listener in self.listeners), default=0)
        decision = self.cheaper.decide(len(live), busy, backlog, sum(sizes.values()))
        last = self.cheaper.last
        if last is not None:
            # The title is how the emperor's stats see this without a channel.
            set_title(f"vassal master {self.name} [cheaper: {len(live)} workers; last {last.action}: {last.reason}]")
        if decision.action == "spawn":
            used = {index for index, _ in self.workers.values()}
            free = [i for i in range(self.processes) if i not in used][: decision.count]
            for index in free:
                self._spawn(index)
            log(f"cheaper: +{len(free)} worker(s) ({decision.reason})")
        elif decision.action == "remove" and live:
            # The idlest (or, over the hard limit, the largest) worker goes.
            over = "hard" in decision.reason
            victim = max(live, key=lambda p: sizes[p]) if over else min(
                live, key=lambda p: (bool(self.scoreboard.read(live[p])[0]), -live[p]))
            self.cheapened.add(victim)
            kill_quietly(victim, signal.SIGKILL if over else signal.SIGTERM)
            log(f"cheaper: -1 worker (pid {victim}; {decision.reason})")

    def _run_single(self) -> int:
        """One worker: the master serves requests itself, as uWSGI does
        without --master. A forked worker would only add a process (~3 MB)
        per vassal; the top process already supervises this one, replacing
        it if it dies or recycles (max-requests)."""
        self.ctl.send(b"R")
        # The loaded app and the server are there for good: out of the
        # collector's sight, so a full collection does not walk them
        # between two requests.
        gc.freeze()
        # Nothing reads the scoreboard here: harakiri and cheaper need a master.
        assert self.runtime is not None
        self.runtime.become_single()
        self.runtime.post_fork()
        self._worker(0, scoreboard=False).run()
        self.runtime.run_atexit()
        hooks.run_phase(self.config, "as-user-atexit", fatal=False)
        return 0

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        if not self._check_lock():
            return
        gc.freeze()  # the loaded app is shared with the workers: keep it unscanned
        pid = os.fork()
        if pid == 0:
            run_and_exit(lambda: self._worker_life(index), lambda trace: log(f"worker crashed:\n{trace}"))
        self.scoreboard.clear(index)
        self.workers[pid] = (index, time.monotonic())

    def _worker_life(self, index: int) -> None:
        """In a forked worker."""
        self.loop.reset_signals_in_child()
        set_role(f"{self.name} worker {index + 1}")
        set_title(f"vassal worker {index + 1} {self.name}")
        jails.backend().die_with_parent(signal.SIGTERM)
        assert self.runtime is not None
        self.runtime.become_worker(index + 1)
        if self.lazy:
            try:
                self.app = load_app(self.config)
            except BaseException:
                log(f"app-load failed in worker {index + 1}:\n{traceback.format_exc().rstrip()}")
                raise SystemExit(protocol.EXIT_APP_LOAD) from None
        if self.gevent and self.config.get_bool("gevent-monkey-patch") and not self.config.get_bool("gevent-early-monkey-patch"):
            from gevent import monkey

            monkey.patch_all()
        self.runtime.post_fork()
        self._worker(index).run()
        self.runtime.run_atexit()

    def _reap(self) -> None:
        for pid, status in reaped():
            entry = self.workers.pop(pid, None)
            if entry is None:
                continue
            index, started = entry
            self.scoreboard.clear(index)
            if self.runtime is not None and self.runtime.router is not None:
                self.runtime.router.worker_gone(index + 1)
            if self.stopping:
                continue
            if pid in self.cheapened:
                self.cheapened.discard(pid)
                continue  # removed on purpose
            if self.lazy and os.WIFEXITED(status) and os.WEXITSTATUS(status) == protocol.EXIT_APP_LOAD:
                log("lazy-apps: a worker could not load the app; stopping the vassal (app-load is fatal)")
                self.exit_code = protocol.EXIT_APP_LOAD
                self.stop(graceful=False)
                continue
            if os.WIFSIGNALED(status):
                log(f"worker {index + 1} (pid {pid}) killed by signal {os.WTERMSIG(status)}, respawning")
            elif os.WEXITSTATUS(status) != 0:
                log(f"worker {index + 1} (pid {pid}) exited with code {os.WEXITSTATUS(status)}, respawning")
            delay = 1.0 if time.monotonic() - started < QUICK_DEATH and os.waitstatus_to_exitcode(status) != 0 else 0.0
            self.loop.call_later(delay, lambda i=index: self._spawn(i))

    def _past_mercy(self, pid: int, mercy: int) -> None:
        entry = self.workers.get(pid)
        if entry is not None:
            log(f"worker {entry[0] + 1} (pid {pid}) still running {mercy}s after it was asked to stop "
                "(worker-reload-mercy): killing it")
            kill_quietly(pid, signal.SIGKILL)

    def _on_ctl(self) -> None:
        data = recv_or_eof(self.ctl, 64)
        if data is None:
            return
        if not data:
            # The top process is gone: nothing may outlive it.
            self.stop(graceful=False)

    def stop(self, graceful: bool) -> None:
        first = not self.stopping
        self.stopping = True
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        for pid in list(self.workers):
            kill_quietly(pid, sig)
        if graceful and first:
            mercy = self.config.get_int("worker-reload-mercy")
            for pid in list(self.workers):
                self.loop.call_later(mercy, lambda p=pid, m=mercy: self._past_mercy(p, m))
        if not graceful:
            self.loop.remove_reader(self.ctl)
