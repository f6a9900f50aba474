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

from jails.linux import JailError, die_with_parent
from vassal import hooks, jail, protocol
from vassal.app import load_app
from vassal.config import Config
from vassal.log import log, set_role
from vassal.loop import Loop, reaped
from vassal.sockets import Listener
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
    def __init__(self, name: str, config: Config, listeners: list[Listener], ctl: socket.socket, loop: Loop):
        self.name = name
        self.config = config
        self.listeners = listeners
        self.ctl = ctl
        self.parent_loop = loop
        self.loop = Loop()
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self.processes = int(config.get("processes"))  # type: ignore[arg-type]
        self.stopping = False
        self.app = None

    def run(self) -> None:
        """Runs in the forked child; never returns."""
        code = 0
        try:
            code = self._run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log(f"app master crashed:\n{traceback.format_exc().rstrip()}")
            code = 1
        finally:
            os._exit(code)

    def _run(self) -> int:
        set_role(f"{self.name} master")
        set_title(f"vassal master {self.name}")
        die_with_parent(signal.SIGTERM)  # if the top process is killed outright
        self.parent_loop.reset_signals_in_child()
        try:
            jail.drop_privileges(self.config)
            hooks.run_phase(self.config, "as-user")
            hooks.run_phase(self.config, "pre-app")
        except hooks.HookExit as exc:
            return exc.code
        except (hooks.HookError, JailError, OSError) as exc:
            log(str(exc))
            return protocol.EXIT_HOOK
        try:
            self.app = load_app(self.config)
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
        if self.processes == 1 and not self.config.has("cheaper"):
            return self._run_single()
        loop = self.loop
        loop.add_signal(signal.SIGCHLD, lambda s: self._reap())
        loop.add_signal(signal.SIGTERM, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGHUP, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGINT, lambda s: self.stop(graceful=False))
        loop.add_signal(signal.SIGQUIT, lambda s: self.stop(graceful=False))
        loop.add_reader(self.ctl, self._on_ctl)
        for index in range(self.processes):
            self._spawn(index)
        self.ctl.send(b"R")
        loop.run(until=lambda: self.stopping and not self.workers)
        hooks.run_phase(self.config, "as-user-atexit", fatal=False)
        return 0

    def _worker(self, index: int) -> Worker:
        return Worker(
            index + 1,
            self.listeners,
            self.app,  # type: ignore[arg-type]
            self.ctl.fileno(),
            max_head=int(self.config.get("buffer-size")),  # type: ignore[arg-type]
            max_body=int(self.config.get("limit-post")),  # type: ignore[arg-type]
            keepalive=int(self.config.get("http-keepalive")),  # type: ignore[arg-type]
            max_requests=int(self.config.get("max-requests")),  # type: ignore[arg-type]
        )

    def _run_single(self) -> int:
        """One worker: the master serves requests itself, as uWSGI does
        without --master. A forked worker would only add a process (~3 MB)
        per vassal; the top process already supervises this one, replacing
        it if it dies or recycles (max-requests)."""
        self.ctl.send(b"R")
        self._worker(0).run()
        hooks.run_phase(self.config, "as-user-atexit", fatal=False)
        return 0

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        gc.freeze()  # the loaded app is shared with the workers: keep it unscanned
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self.loop.reset_signals_in_child()
                set_role(f"{self.name} worker {index + 1}")
                set_title(f"vassal worker {index + 1} {self.name}")
                die_with_parent(signal.SIGTERM)
                self._worker(index).run()
            except BaseException:
                log(f"worker crashed:\n{traceback.format_exc().rstrip()}")
                code = 1
            finally:
                os._exit(code)
        self.workers[pid] = (index, time.monotonic())

    def _reap(self) -> None:
        for pid, status in reaped():
            entry = self.workers.pop(pid, None)
            if entry is None:
                continue
            index, started = entry
            if self.stopping:
                continue
            if os.WIFSIGNALED(status):
                log(f"worker {index + 1} (pid {pid}) killed by signal {os.WTERMSIG(status)}, respawning")
            elif os.WEXITSTATUS(status) != 0:
                log(f"worker {index + 1} (pid {pid}) exited with code {os.WEXITSTATUS(status)}, respawning")
            delay = 1.0 if time.monotonic() - started < QUICK_DEATH and os.waitstatus_to_exitcode(status) != 0 else 0.0
            self.loop.call_later(delay, lambda i=index: self._spawn(i))

    def _on_ctl(self) -> None:
        try:
            data = self.ctl.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            # The top process is gone: nothing may outlive it.
            self.stop(graceful=False)

    def stop(self, graceful: bool) -> None:
        self.stopping = True
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not graceful:
            self.loop.remove_reader(self.ctl)
