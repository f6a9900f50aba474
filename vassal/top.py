"""The vassal's top process: a small init that owns the emperor pipe, the
listening sockets and the attached daemons, and never imports the app.

It forks an app master (which loads the app and pre-forks workers). A
graceful reload re-reads the config, rebinds only the sockets whose address
changed, starts a new master and, once that one is ready, lets the old one
drain: the top process keeps its pid, so a uWSGI emperor (which tracks its
direct child) keeps seeing the same vassal.
"""

from __future__ import annotations

import gc
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

import jails
from bedrock import protocol
from bedrock.config import Config, ConfigError, from_fd
from bedrock.log import log, set_role, set_sink
from bedrock.loop import Loop, Timer, reaped
from bedrock.proc import exec_child, kill_quietly, killpg_quietly
from bedrock.sockets import Listener, SocketError, bind, recv_or_eof
from jails import JailError
from vassal import hooks, phases
from vassal.app import has_app
from vassal.handover import Handover
from vassal.logpipe import LogPipe
from vassal.master import Master, set_title
from vassal.smartdaemon import SmartDaemon
from vassal.status import keep_from_exec as keep_status_from_exec

DAEMON_RESPAWN_DELAY = 1.0


@dataclass
class MasterHandle:
    pid: int
    ctl: socket.socket
    generation: int
    started: float
    ready: bool = False
    kill_timer: Timer | None = None


@dataclass
class Daemon:
    command: str
    pid: int | None = None
    started: float = 0.0
    restarts: int = 0
    timer: Timer | None = field(default=None, repr=False)


LOG_KEYS = ("logto", "log-encoder", "logger")  # (any of them: the vassal's output goes through a LogPipe)


def _log_setup(config) -> str:
    """What a failure to set the log up is about, for its message."""
    return f"logto {config.get('logto')}" if config.has("logto") else "logger setup"


class Top:
    def __init__(self, name: str, config: Config, reload_config: Callable[[], Config] | None):
        self.name = name
        self.config = config
        # None: the emperor hands each new config over (CONFIG_FD) and we
        # never read the file ourselves (DESIGN 3: one parse, in the emperor).
        self.reload_config = reload_config
        self.handed: Config | None = None
        self.loop = Loop()
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.current: MasterHandle | None = None
        self.pending: MasterHandle | None = None
        self.draining: dict[int, MasterHandle] = {}
        self.daemons: dict[str, Daemon] = {}
        self.generation = 0
        # Made before any app master: every generation's workers share it.
        self.handover = Handover()
        self.stopping = False
        self.exit_code = protocol.EXIT_OK
        self.loyal_sent = False
        self.ready_sent = False
        self.emperor: socket.socket | None = None
        self.heartbeat_timer: Timer | None = None
        self.tun_links: list = []
        self.logpipe: LogPipe | None = None
        self.smart_daemons: dict[tuple[str, str], SmartDaemon] = {}
        self.smart_starters: dict[int, str] = {}

    # --- emperor pipe ------------------------------------------------------
    def _attach_emperor(self) -> None:
        fd_text = os.environ.get(protocol.ENV_FD)
        if not fd_text:
            return
        try:
            self.emperor = socket.socket(fileno=int(fd_text))
        except (ValueError, OSError) as exc:
            log(f"ignoring {protocol.ENV_FD}={fd_text!r}: {exc}")
            return
        # Our children (masters, workers, daemons) must not hold the pipe:
        # its EOF is how the emperor learns that the whole vassal is gone.
        os.set_inheritable(self.emperor.fileno(), False)
        self.emperor.setblocking(False)
        self.loop.add_reader(self.emperor, self._on_emperor)

    def send(self, byte: int) -> None:
        if self.emperor is None:
            return
        try:
            self.emperor.send(bytes([byte]))
        except (BlockingIOError, InterruptedError):
            log(f"emperor pipe full, dropped message {byte}")
        except OSError:
            pass

    def _on_emperor(self) -> None:
        assert self.emperor is not None
        try:
            data, fds, _, _ = socket.recv_fds(self.emperor, 64, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        if not data:
            log("the emperor is gone, shutting down")
            self.loop.remove_reader(self.emperor)
            self.emperor = None
            self.stop(graceful=True)
            return
        for byte in data:
            if byte == protocol.STOP:
                log("stop requested by the emperor")
                self.stop(graceful=True)
            elif byte == protocol.RELOAD:
                log("graceful reload requested by the emperor")
                self.reload()
            elif byte == protocol.ROUTER_FD and fds:
                fd = fds.pop(0)
                if self.tun_links:
                    self.tun_links[0].adopt(fd)
                else:
                    os.close(fd)
            elif byte == protocol.CONFIG_FD and fds:
                self._take_config(fds.pop(0))
            else:
                log(f"ignoring unknown emperor message {byte}")
        for fd in fds:
            os.close(fd)

    def _take_config(self, fd: int) -> None:
        """The emperor's validated config for the next reload."""
        if self.reload_config is not None:
            os.close(fd)  # we read our own file (not started by our emperor)
            return
        try:
            self.handed = from_fd(fd)
        except ConfigError as exc:
            log(f"ignoring a handed config: {exc}")

    def _next_config(self) -> Config:
        if self.reload_config is not None:
            return self.reload_config()
        new, self.handed = self.handed or self.config, None
        return new

    # --- lifecycle -------------------------------------------------------------
    def run(self) -> int:
        set_role(f"{self.name}")
        set_title(f"vassal {self.name}")
        keep_status_from_exec()
        # Daemons that double-fork come back to us, not to the emperor or
        # init: we reap them, and only processes descending from us (or in
        # our cgroup) are ever signalled for a pidfile.
        jails.backend().become_subreaper()
        loop = self.loop
        loop.add_signal(signal.SIGCHLD, lambda s: self._reap())
        loop.add_signal(signal.SIGTERM, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGINT, lambda s: self.stop(graceful=True))
        loop.add_signal(signal.SIGQUIT, lambda s: self.stop(graceful=False))
        loop.add_signal(signal.SIGHUP, lambda s: self.reload())
        loop.add_signal(signal.SIGUSR2, lambda s: self.logpipe and self.logpipe.reopen())
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if any(self.config.has(key) for key in LOG_KEYS):
            try:
                self.logpipe = LogPipe(self.config.get_opt_str("logto"), self.config.getlist("log-encoder"), self.config)
            except OSError as exc:
                log(f"{_log_setup(self.config)}: {exc.strerror or exc}")
                return protocol.EXIT_ERROR
            set_sink(self.logpipe.emit)
            self.logpipe.start(loop)
        self._attach_emperor()
        self.send(protocol.SPAWNED)
        bad = phases.problems(self.config, protocol.cloned_namespaces(), tyrant=protocol.tyrant_owner())
        if bad:
            for problem in bad:
                log(str(problem))
            return protocol.EXIT_CONFIG
        try:
            self.tun_links = phases.enter(self.config)
            for link in self.tun_links:
                link.start(self.loop)
            apply_process_settings(self.config)
            self._sync_listeners(self.config)
        except hooks.HookExit as exc:
            log(f"exit hook: stopping with code {exc.code}")
            return exc.code
        except hooks.HookError as exc:
            log(str(exc))
            return protocol.EXIT_HOOK
        except (SocketError, JailError, OSError) as exc:  # (tun and netlink errors are JailErrors)
            log(str(exc))
            return protocol.EXIT_ERROR
        if has_app(self.config):
            self._start_master()
        else:
            self._mark_ready()
        self._sync_daemons(self.config)
        self._schedule_heartbeat()
        loop.run(until=self._finished)
        for listener in self.listeners.values():
            listener.close()
        kill_descendants()
        if self.logpipe is not None:
            self.logpipe.close()
        return self.exit_code

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        alive_masters = any((self.current, self.pending, self.draining))
        alive_daemons = any(d.pid for d in self.daemons.values())
        return not alive_masters and not alive_daemons

    def _mark_ready(self) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            log(f"ready (pid {os.getpid()})")
        self.send(protocol.READY)

    def _schedule_heartbeat(self) -> None:
        interval = self.config.get_int("heartbeat")
        if self.heartbeat_timer:
            self.heartbeat_timer.cancel()
            self.heartbeat_timer = None
        if interval <= 0 or self.emperor is None:
            return

        def beat() -> None:
            if not self.stopping and (self.current is None or self.current.ready):
                self.send(protocol.HEARTBEAT)
            self.heartbeat_timer = self.loop.call_later(interval, beat)

        self.heartbeat_timer = self.loop.call_later(interval, beat)

    def stop(self, graceful: bool) -> None:
        if self.stopping and graceful:
            return
        if not self.stopping:
            # No generation to come: idle connections the draining workers
            # hand over are closed here at once, not left open in the pair.
            self.loop.add_reader(self.handover.recv_end, lambda _fd=None: self.handover.close_waiting())
        self.stopping = True
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        mercy = self.config.get_int("reload-mercy")
        for handle in self._masters():
            kill_quietly(handle.pid, sig)
            if graceful and handle.kill_timer is None:
                handle.kill_timer = self.loop.call_later(mercy, lambda p=handle.pid: kill_quietly(p, signal.SIGKILL))
        for smart in self.smart_daemons.values():
            smart.stop(sig)
        for daemon in self.daemons.values():
            if daemon.timer:
                daemon.timer.cancel()
            if daemon.pid:
                self._signal_group(daemon.pid, sig)
                if graceful:
                    self.loop.call_later(mercy, lambda p=daemon.pid: self._signal_group(p, signal.SIGKILL))

    def _masters(self) -> list[MasterHandle]:
        return [h for h in (self.current, self.pending, *self.draining.values()) if h is not None]

    @staticmethod
    def _signal_group(pid: int, sig: int) -> None:
        try:
            killpg_quietly(pid, sig) or kill_quietly(pid, sig)
        except PermissionError:
            kill_quietly(pid, sig)

    # --- reload ------------------------------------------------------------------
    def reload(self) -> None:
        if self.stopping:
            return
        try:
            new = self._next_config()
        except ConfigError as exc:
            log(f"reload refused, config invalid, still running the previous one:\n{exc}")
            return
        if new.jail_fingerprint() != self.config.jail_fingerprint():
            log("jail-level options changed: they take effect on the next restart")
        old = self.config
        try:
            apply_process_settings(new)
            self._sync_listeners(new)
        except (SocketError, OSError) as exc:
            log(f"reload refused: {exc}")
            return
        self.config = new
        if self.logpipe is not None:
            try:
                self.logpipe.update(new.get_opt_str("logto"), new.getlist("log-encoder"), new)
            except OSError as exc:
                log(f"{_log_setup(new)}: {exc.strerror or exc}")
        elif any(new.has(key) for key in LOG_KEYS):
            # (the processes' output does not pass through a log pipe of ours:
            # one made now would not see it)
            log(f"reload: {', '.join(key for key in LOG_KEYS if new.has(key))} added: they take effect when the vassal "
                "is restarted, not on a reload")
        if has_app(new):
            self._start_master()
        elif has_app(old):
            for handle in self._masters():
                self._retire(handle)
            self._mark_ready()
        else:
            self._mark_ready()
        self._sync_daemons(new)
        self._schedule_heartbeat()

    def _sync_listeners(self, config: Config) -> None:
        wanted = [("http", a) for a in config.getlist("http-socket")] + [("uwsgi", a) for a in config.getlist("socket")]
        backlog = config.get_int("listen")
        mode = config.get_opt_int("chmod-socket")
        owner = config.get_opt_str("chown-socket")
        fresh: dict[tuple[str, str], Listener] = {}
        try:
            for key in wanted:
                if key in self.listeners or key in fresh:
                    continue
                fresh[key] = bind(key[0], key[1], backlog, mode, owner, tenant=phases.socket_tenant(config))
        except SocketError:
            for listener in fresh.values():
                listener.close()
            raise
        for key in list(self.listeners):
            if key not in wanted:
                # Old workers keep their own copies until they drain.
                self.listeners.pop(key).sock.close()
        self.listeners.update(fresh)
        for key in fresh:
            log(f"{key[0]} socket bound on {key[1]}")

    # --- app masters ------------------------------------------------------------
    def _start_master(self) -> None:
        if self.pending is not None:
            # A reload while one is starting: that one is already stale.
            self._retire(self.pending)
            self.pending = None
        self.generation += 1
        parent_end, child_end = socket.socketpair()
        listeners = list(self.listeners.values())
        # What exists now is shared with the master: keep the collector off it.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            # Only our own end may stay open here: an inherited copy of the
            # emperor pipe or of an older master's ctl would hide their EOF.
            parent_end.close()
            for other in self._masters():
                other.ctl.close()
            for link in self.tun_links:
                os.close(link.fd)
                if link.sock is not None:
                    link.sock.close()
            if self.emperor is not None:
                self.emperor.close()
            if self.logpipe is not None:
                self.logpipe.child_fds()
                set_sink(None)
            Master(self.name, self.config, listeners, child_end, self.loop, self.handover).run()
        child_end.close()
        parent_end.setblocking(False)
        handle = MasterHandle(pid, parent_end, self.generation, time.monotonic())
        self.pending = handle
        self.loop.add_reader(parent_end, lambda h=handle: self._on_master(h))

    def _on_master(self, handle: MasterHandle) -> None:
        data = recv_or_eof(handle.ctl, 256)
        if data is None:
            return
        if not data:
            self.loop.remove_reader(handle.ctl)
            return
        if b"R" in data and handle is self.pending:
            handle.ready = True
            self.pending = None
            if self.current is not None:
                self._retire(self.current)
            self.current = handle
            log(f"app master generation {handle.generation} ready (pid {handle.pid})")
            self._mark_ready()
        if b"L" in data and not self.loyal_sent:
            self.loyal_sent = True
            self.send(protocol.LOYAL)

    def _retire(self, handle: MasterHandle) -> None:
        """Let an old master drain; kill it after reload-mercy."""
        self.draining[handle.pid] = handle
        if self.current is handle:
            self.current = None
        kill_quietly(handle.pid, signal.SIGTERM)
        mercy = self.config.get_int("reload-mercy")
        handle.kill_timer = self.loop.call_later(mercy, lambda p=handle.pid: kill_quietly(p, signal.SIGKILL))

    def _master_exited(self, handle: MasterHandle, status: int) -> None:
        self.loop.remove_reader(handle.ctl)
        handle.ctl.close()
        if handle.kill_timer:
            handle.kill_timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        if self.draining.pop(handle.pid, None) is not None or self.stopping:
            if handle is self.current:
                self.current = None
            if handle is self.pending:
                self.pending = None
            return
        if handle is self.pending:
            self.pending = None
            if self.current is None:
                # Nothing serves: the vassal cannot start (DESIGN: app-load is fatal).
                log(f"app master exited with {code} before it was ready")
                self.exit_code = code if code in (protocol.EXIT_APP_LOAD, protocol.EXIT_HOOK) else protocol.EXIT_ERROR
                self.stop(graceful=True)
            else:
                log(f"reload failed (app master exited with {code}), still serving the previous generation")
            return
        if handle is self.current and code == protocol.EXIT_APP_LOAD:
            self.current = None
            log("the app could not be loaded (lazy-apps worker): stopping")
            self.exit_code = protocol.EXIT_APP_LOAD
            self.stop(graceful=True)
            return
        if handle is self.current:
            self.current = None
            log(f"app master (pid {handle.pid}) died with {code}, starting a new one")
            delay = 1.0 if time.monotonic() - handle.started < 1.0 else 0.0
            self.loop.call_later(delay, self._start_master_if_needed)

    def _start_master_if_needed(self) -> None:
        if not self.stopping and self.current is None and self.pending is None and has_app(self.config):
            self._start_master()

    # --- attached daemons --------------------------------------------------------
    def _sync_smart_daemons(self, config: Config) -> None:
        wanted = {(pidfile, " ".join(rest)) for pidfile, *rest in config.getlist("smart-attach-daemon")}
        for key in list(self.smart_daemons):
            if key not in wanted:
                self.smart_daemons.pop(key).stop()
        for key in sorted(wanted - set(self.smart_daemons)):
            self.smart_daemons[key] = SmartDaemon(key[0], key[1], self.loop, self._start_smart)

    def _start_smart(self, command: str) -> int | None:
        """Fork the daemonizing command; its starter is reaped like any child."""
        daemon = Daemon(command)
        self._spawn_daemon(daemon)
        if daemon.pid is not None:
            self.smart_starters[daemon.pid] = command
        return daemon.pid

    def _sync_daemons(self, config: Config) -> None:
        self._sync_smart_daemons(config)
        wanted = list(config.getlist("attach-daemon"))
        for command, daemon in list(self.daemons.items()):
            if command not in wanted:
                daemon.command = ""  # no respawn
                if daemon.timer:
                    daemon.timer.cancel()
                if daemon.pid:
                    self._signal_group(daemon.pid, signal.SIGTERM)
                else:
                    del self.daemons[command]
        for command in wanted:
            if command not in self.daemons:
                self.daemons[command] = Daemon(command)
                self._spawn_daemon(self.daemons[command])

    def _spawn_daemon(self, daemon: Daemon) -> None:
        daemon.timer = None
        if self.stopping or not daemon.command:
            return
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                if self.logpipe is not None:
                    self.logpipe.child_fds()
                    set_sink(None)
                phases.drop_privileges(self.config)
                argv = ["/bin/sh", "-c", daemon.command] if _needs_shell(daemon.command) else shlex.split(daemon.command)
                exec_child(argv, what=f"attach-daemon {daemon.command!r}", search_path=True, report=log)
            except BaseException as exc:
                log(f"attach-daemon {daemon.command!r}: {exc}")
            finally:
                os._exit(127)
        daemon.pid = pid
        daemon.started = time.monotonic()
        log(f"attached daemon {daemon.command!r} started (pid {pid})")

    def _daemon_exited(self, daemon: Daemon, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        daemon.pid = None
        if self.stopping:
            return
        if not daemon.command:
            self.daemons = {k: v for k, v in self.daemons.items() if v is not daemon}
            return
        daemon.restarts += 1
        delay = DAEMON_RESPAWN_DELAY if time.monotonic() - daemon.started < 1.0 else 0.0
        log(f"attached daemon {daemon.command!r} exited with {code}, restarting")
        daemon.timer = self.loop.call_later(delay, lambda d=daemon: self._spawn_daemon(d))

    # --- reaping -----------------------------------------------------------------
    def _reap(self) -> None:
        # waitpid(-1): in a pid namespace we are PID 1 and must reap orphans too.
        for pid, status in reaped():
            for handle in self._masters():
                if handle.pid == pid:
                    self._master_exited(handle, status)
                    break
            else:
                if self.smart_starters.pop(pid, None) is not None:
                    continue  # a smart daemon's starter: the daemon lives on
                for daemon in self.daemons.values():
                    if daemon.pid == pid:
                        self._daemon_exited(daemon, status)
                        break


def kill_descendants() -> None:
    """Nothing of the vassal outlives its top process, even when no emperor
    is left to kill its cgroup (kill -9 of the emperor): whatever escaped
    with setsid and ignores SIGTERM came back to us (a subreaper) and dies."""
    try:
        leftovers = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.Error:
            pass


def apply_process_settings(config: Config) -> None:
    """``env`` and ``chdir``: set in the top process so that every master,
    worker and daemon forked after it inherits them."""
    for key, value in config.getlist("env"):
        os.environ[key] = value
    if config.has("chdir"):
        directory = config.get_str("chdir")
        try:
            os.chdir(directory)
        except OSError as exc:
            raise OSError(exc.errno, f"chdir {directory!r}: {exc.strerror}") from None


def _needs_shell(command: str) -> bool:
    return any(ch in command for ch in "|&;<>()$`\\\"'*?[#~=%\n")
