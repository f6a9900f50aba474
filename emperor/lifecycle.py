"""One vassal as the emperor sees it: an explicit state machine.

States (DESIGN section 3): starting, ready, reloading, stopping, stopped,
backoff, invalid. Every wait is a timer on the emperor's loop; nothing here
blocks. A vassal's processes are tracked by its cgroup (or its process group
where cgroups are unavailable); the vassal only counts as exited once that
is empty, so no orphan keeps its port when it is respawned.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jails
from bedrock import protocol
from bedrock.config import Config, ConfigError
from bedrock.identity import stat_following
from bedrock.loop import Timer
from bedrock.proc import kill_quietly
from bedrock.sockets import recv_or_eof
from emperor.logbuf import LogBuffer, read_available
from emperor.reporting import ProcessTree, clean_report
from emperor.spawn import Spawned, config_fd
from emperor.states import (
    BACKOFF,
    INVALID,
    READY,
    RELOADING,
    STARTING,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    StateError,
)
from jails.tracking import LimitError, LimitGroups, ProcessGroupTracker, VassalCgroup

if TYPE_CHECKING:
    from emperor.launcher import Launcher

# A vassal that stays up this long gets its backoff reset (DESIGN section 3).
STABLE_AFTER = 30.0
# How often a dead vassal's cgroup is checked for leftovers being killed.
EMPTY_POLL = 0.02
# A reload that never reports ready again is given up on after this long.
RELOAD_TIMEOUT = 60.0
# What a vassal may send on the emperor pipe and the status socket before it
# is read only once a second (legitimate traffic is a few bytes, one report).
PIPE_BYTES_PER_SECOND = 4096
STATUS_REPORTS_PER_SECOND = 8


@dataclass
class Signature:
    """What tells that a config file changed (content, touch, replacement)."""

    ino: int
    dev: int
    mtime_ns: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, path: str) -> Signature | None:
        try:
            st = stat_following(path)
        except PermissionError:
            try:
                st = os.lstat(path)  # a link its owner may not follow: read_config says so
            except OSError:
                return None
        except OSError:
            return None
        return cls(st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@dataclass
class Vassal:
    name: str
    path: str
    launcher: Launcher
    config: Config | None = None
    signature: Signature | None = None
    state: str = STARTING
    error: str | None = None
    pid: int | None = None
    pipe: socket.socket | None = None
    log_fd: int | None = None
    status_sock: socket.socket | None = None
    app_status: dict | None = None  # the app master's last report (vassal/status.py)
    restarts: int = 0
    spawns: int = 0
    last_exit: dict | None = None
    loyal: bool = False
    started_at: float | None = None
    ready_at: float | None = None
    backoff_until: float | None = None
    throttle_ms: int = 0
    spawning: bool = False  # asked the zygote, pid not known yet
    held: bool = False  # stopped by the operator
    removing: bool = False  # its file is gone
    restart_pending: bool = False
    voluntary: bool = False
    exit_reason: str | None = None  # set when we kill it (curse)
    last_heartbeat: float | None = None
    unknown_bytes: int = 0  # on the emperor pipe since the last spawn
    # Tyrant mode: the (uid, gid) whose file this vassal is, as it was read;
    # the control socket authorises by this, never by whoever owns the path now.
    owner: tuple[int, int] | None = None
    last_read: float = 0.0  # monotonic time its file was last read for a change
    reload_queued: bool = False  # a reload asked for while one was in flight
    error_kind: str | None = None  # "quota": refused for emperor-tyrant-max-vassals, waiting for a place
    running_config: Config | None = None  # what the current instance was spawned with
    changed_while_spawning: bool = False  # its file changed before the zygote told us the pid
    tracker: VassalCgroup | ProcessGroupTracker | None = None
    limit_groups: LimitGroups | None = None
    oom_fd: int | None = None
    timers: dict[str, Timer] = field(default_factory=dict)
    log: LogBuffer | None = None
    tree: ProcessTree = field(default_factory=ProcessTree)
    _budgets: dict[str, tuple[float, int]] = field(default_factory=dict)
    _throttled: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.log = LogBuffer(self.launcher.log_lines, echo=self._echo)

    # --- helpers -------------------------------------------------------------
    def _echo(self, line: str) -> None:
        self.launcher.vassal_log(self, line)

    def _timer(self, name: str, delay: float, callback) -> None:
        self._cancel(name)
        self.timers[name] = self.launcher.loop.call_later(delay, callback)

    def _cancel(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _enter(self, new: str) -> None:
        """The one place a vassal changes state."""
        if self.state not in TRANSITIONS[new]:
            raise StateError(f"vassal {self.name}: {self.state} -> {new} is not a transition")
        self.state = new

    def has_timer(self, name: str) -> bool:
        return name in self.timers

    def after(self, delay: float, name: str, callback) -> None:
        """``callback`` in ``delay`` seconds, as this vassal's timer ``name``
        (replacing one of that name; all go when the vassal does)."""
        def fire() -> None:
            self.timers.pop(name, None)
            callback()

        self._timer(name, delay, fire)

    def invalid(self, error: str | None) -> None:
        """Its file does not validate: with nothing of it running it waits
        for a fixed file; a running one keeps the last good config (and is
        invalid once it has exited, see _after_exit)."""
        self.error = error
        self._cancel("backoff")
        self.backoff_until = None
        if self.pid is None and not self.spawning:
            self._enter(INVALID)

    def dispose(self) -> None:
        """Forgotten by the emperor (its file is gone): no timer, cgroup or
        limit group stays behind."""
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if isinstance(self.tracker, VassalCgroup):
            self.tracker.remove()
        if self.limit_groups is not None:
            self.limit_groups.remove()
        self._enter(STOPPED)

    def note(self, message: str) -> None:
        self.launcher.log(f"[{self.name}] {message}")

    @property
    def wrapped(self) -> bool:
        return self.launcher.wraps(self.path)

    # --- spawning ------------------------------------------------------------------
    def spawn(self) -> None:
        assert self.pid is None and not self.spawning
        for name in ("backoff", "heartbeat", "curse", "term", "reload"):
            self._cancel(name)
        self.backoff_until = None
        self.loyal = False
        self.voluntary = False
        self.unknown_bytes = 0
        self.exit_reason = None
        self.last_heartbeat = None
        self.restart_pending = False
        self.reload_queued = False
        self.changed_while_spawning = False
        cgroup = self.launcher.cgroup_for(self)
        try:
            procs = self.launcher.cgroup_procs_for(self, cgroup)
        except (LimitError, OSError) as exc:
            self.note(f"cannot apply limits: {exc}")
            self.error = str(exc)
            self._record_exit(None, None, "exit", f"limits: {exc}")
            self._schedule_respawn()
            return
        if self.config is None:
            self._enter(INVALID)
            return
        self.running_config = self.config
        try:
            spawned = self.launcher.launch(self, cgroup, procs)
            self.spawning = spawned.pid is None
        except OSError as exc:
            self.note(f"cannot spawn: {exc}")
            self._record_exit(None, None, "exit", f"spawn failed: {exc}")
            self._schedule_respawn()
            return
        self._attach(spawned, cgroup)

    def _attach(self, spawned: Spawned, cgroup: VassalCgroup | None) -> None:
        self.pipe = spawned.pipe
        self.log_fd = spawned.log_fd
        self.tracker = cgroup
        self._enter(STARTING)
        self.started_at = time.time()
        self.ready_at = None
        self.spawns += 1
        self.tree = ProcessTree()
        self._budgets.clear()
        self._throttled.clear()
        loop = self.launcher.loop
        loop.add_reader(self.pipe, self._on_pipe)
        loop.add_reader(self.log_fd, self._on_log)
        self.app_status = None
        self.status_sock = spawned.status
        if self.status_sock is not None:
            loop.add_reader(self.status_sock, self._on_status)
        if self.limit_groups is not None:
            self.oom_fd = self.limit_groups.oom_eventfd()
            if self.oom_fd is not None:
                loop.add_reader(self.oom_fd, self._on_oom)
        for router in self.launcher.routers:
            if router.serves(self):
                router.broker(self)
        if spawned.pid is not None:
            self.spawned(spawned.pid, None)

    def spawned(self, pid: int | None, error: str | None) -> None:
        """The top process exists (pid known), or could not be made."""
        self.spawning = False
        if pid is None:
            self.note(f"cannot spawn: {error}")
            self.exited(127 << 8, failed_spawn=error)
            return
        self.pid = pid
        if self.tracker is None:
            self.tracker = ProcessGroupTracker(pid)
        self.note(f"spawned (pid {pid})")
        self.launcher.after_spawn(self)
        if self.changed_while_spawning and self.state != STOPPING:
            self.changed_while_spawning = False
            running, wanted = self.running_config, self.config
            if wanted is not None and running is not None and wanted is not running:
                if wanted.jail_fingerprint() != running.jail_fingerprint():
                    self.note("its file changed while it was being spawned (jail-level options): restarting")
                    self.restart()
                else:
                    self.reload_queued = True  # handed over once it is ready

    # --- the emperor pipe ----------------------------------------------------------
    def send(self, byte: int) -> bool:
        if self.pipe is None:
            return False
        try:
            self.pipe.send(bytes([byte]))
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def _hand_config(self, config: Config) -> bool:
        if self.pipe is None:
            return False
        fd = config_fd(config.to_json())
        try:
            socket.send_fds(self.pipe, [bytes([protocol.CONFIG_FD])], [fd])
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _on_pipe(self) -> None:
        assert self.pipe is not None
        data = recv_or_eof(self.pipe, 256)
        if data is None:
            return
        if not data:
            # The vassal closed its end: it is exiting; SIGCHLD tells the rest.
            self.launcher.loop.remove_reader(self.pipe)
            return
        # A flood of one byte means what one of them means (the vassal's
        # code can write here), and a vassal that floods is read less.
        if self._over_budget("pipe", len(data), PIPE_BYTES_PER_SECOND, self.pipe, self._on_pipe):
            self.note(f"more than {PIPE_BYTES_PER_SECOND} bytes a second on the emperor pipe: reading it once a second")
        for byte in dict.fromkeys(data):
            self._on_message(byte)

    def _over_budget(self, what: str, amount: int, per_second: int, fileobj, reader) -> bool:
        """Count ``amount`` against a one-second budget; past it, stop reading
        ``fileobj`` until the second is over. True the first time per spawn."""
        now = time.monotonic()
        started, used = self._budgets.get(what, (now, 0))
        if now - started >= 1.0:
            started, used = now, 0
        used += amount
        self._budgets[what] = (started, used)
        if used <= per_second:
            return False
        loop = self.launcher.loop
        loop.remove_reader(fileobj)

        def resume() -> None:
            self.timers.pop(f"resume-{what}", None)
            if fileobj in (self.pipe, self.status_sock):
                loop.add_reader(fileobj, reader)

        self._timer(f"resume-{what}", max(0.0, started + 1.0 - now), resume)
        first = what not in self._throttled
        self._throttled.add(what)
        return first

    def _on_message(self, byte: int) -> None:
        if byte == protocol.READY:
            if self.state in (STARTING, RELOADING):
                self._enter(READY)
                self.ready_at = time.time()
                self._cancel("reload")
                self.note("ready")
                if self.reload_queued:
                    self.reload_queued = False
                    self.reload(reread=False)
        elif byte == protocol.LOYAL:
            if not self.loyal:
                self.loyal = True
                self.note("loyal")
        elif byte == protocol.HEARTBEAT:
            # One timer per vassal that looks at the last beat when it fires:
            # re-arming a timer per byte let a flood fill the loop's heap.
            self.last_heartbeat = time.monotonic()
            if "heartbeat" not in self.timers:
                self._timer("heartbeat", self.launcher.required_heartbeat, self._heartbeat_due)
        elif byte == protocol.VOLUNTARY_SHUTDOWN:
            self.voluntary = True
            self.note("announced a voluntary shutdown")
        elif byte == protocol.SPAWNED:
            pass
        else:
            # The app can write here too: say it once per spawn, not per byte.
            self.unknown_bytes += 1
            if self.unknown_bytes == 1:
                self.note(f"ignoring unknown message {byte} (further unknown bytes are counted, not logged)")

    def _on_oom(self) -> None:
        """v1: the memory cgroup hit OOM; an OOM kill anywhere stops the whole vassal."""
        assert self.oom_fd is not None
        try:
            os.eventfd_read(self.oom_fd)
        except (BlockingIOError, OSError):
            return
        # The event comes as the cgroup goes under OOM, a moment before the
        # kernel's kill is counted: look again on a short timer.
        self._check_oom(40)

    def _check_oom(self, tries: int) -> None:
        self.timers.pop("oom", None)
        if self.limit_groups is None or self.pid is None or self.exit_reason == "oom":
            return
        if self.limit_groups.oom_kills() > self.limit_groups.oom_baseline:
            self.note("out of memory (memory-limit reached): stopping the whole vassal")
            self.exit_reason = "oom"
            self.curse()
        elif tries > 1:
            self._timer("oom", 0.05, lambda: self._check_oom(tries - 1))

    def _on_status(self) -> None:
        """The app master's reports: only the last one is kept; anything that
        is not a report (a tenant's app can write here) is ignored, and said
        once per spawn. Decoded with bounded size and nesting (DESIGN 4):
        ``[`` * 50000 once made json recurse until the emperor died."""
        from emperor import untrusted

        assert self.status_sock is not None
        # Only the newest report counts: drain what is queued, decode the last.
        data = None
        for _ in range(64):
            try:
                data = self.status_sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close_status()
                return
        if data is None:
            return
        # The app master reports once a second: more than a few a second is
        # someone else (the app), and costs it the reading, not us the CPU.
        if self._over_budget("status", 1, STATUS_REPORTS_PER_SECOND, self.status_sock, self._on_status):
            self.note(f"more than {STATUS_REPORTS_PER_SECOND} status reports a second: reading them once a second")
        try:
            report = clean_report(untrusted.loads(data, max_bytes=65536, max_depth=16))
        except (ValueError, RecursionError) as exc:
            problem = f"ignoring a malformed status report: {exc}"
        except Exception as exc:  # whatever a report holds costs that report only
            problem = f"ignoring a status report that could not be read: {exc!r}"
        else:
            if report is not None:
                self.app_status = report
                return
            problem = "ignoring a status report that is not one (an object with a 'workers' list)"
        if untrusted.first_time(("status", self.name, self.spawns)):
            self.note(problem[:300] + "; further ones are ignored silently")

    def _close_status(self) -> None:
        if self.status_sock is not None:
            self.launcher.loop.forget(self.status_sock)
            self.status_sock.close()
            self.status_sock = None

    def _close_oom(self) -> None:
        if self.oom_fd is not None:
            self.launcher.loop.forget(self.oom_fd)
            os.close(self.oom_fd)
            self.oom_fd = None

    def _heartbeat_due(self) -> None:
        self.timers.pop("heartbeat", None)
        if self.pid is None or self.state == STOPPING or self.last_heartbeat is None:
            return
        left = self.last_heartbeat + self.launcher.required_heartbeat - time.monotonic()
        if left > 0:
            self._timer("heartbeat", left, self._heartbeat_due)
            return
        self.note(f"no heartbeat for {self.launcher.required_heartbeat}s, cursing it")
        self.curse()

    def _on_log(self) -> None:
        assert self.log_fd is not None and self.log is not None
        data = read_available(self.log_fd)
        if data is None:
            self._close_log()
            return
        if data:
            self.log.feed(data)

    def _close_log(self) -> None:
        if self.log_fd is not None:
            self.launcher.loop.remove_reader(self.log_fd)
            tail = read_available(self.log_fd) if self.log_fd is not None else None
            if tail and self.log is not None:
                self.log.feed(tail)
            os.close(self.log_fd)
            self.log_fd = None
            if self.log is not None:
                self.log.flush()

    # --- operator and file driven transitions -------------------------------------
    def reload(self, reread: bool = True) -> bool:
        """Graceful reload: the vassal keeps its jail and sockets. Ours are
        handed the config the emperor validated (byte 41 with a memfd, then
        byte 1): a vassal never parses its own file. ``reread``: read and
        validate the file (and its templates) again first, as an operator's
        reload means; a file that no longer validates reloads the last good one."""
        if self.pid is None or self.state not in (READY, STARTING, RELOADING):
            return False
        if self.state == RELOADING and not self.wrapped:
            # One handover in flight at most: a reload storm on a vassal that
            # does not read its pipe would pin a config memfd per touch.
            # The newest config goes when this reload is done.
            self.reload_queued = True
            return True
        if reread and not self.wrapped:
            try:
                config = self.launcher.read_config(self.path)
            except ConfigError as exc:
                self.error = str(exc)
                self.note(f"config invalid, reloading the previous one:\n{exc}")
            else:
                previous, self.config, self.error = self.config, config, None
                if previous is not None and previous.jail_fingerprint() != config.jail_fingerprint():
                    self.note("jail-level options changed, restarting")
                    self.restart()
                    return True
        if not self.wrapped and self.config is not None and not self._hand_config(self.config):
            return False
        if not self.send(protocol.RELOAD):
            return False
        if self.state != RELOADING:  # (a wrapped uWSGI is sent every reload it is asked for)
            self._enter(RELOADING)
        self._timer("reload", RELOAD_TIMEOUT, self._reload_timed_out)
        self.note("graceful reload")
        return True

    def _reload_timed_out(self) -> None:
        self.timers.pop("reload", None)
        if self.state == RELOADING:
            self.note(f"no ready message {RELOAD_TIMEOUT:.0f}s after a reload; considering it ready")
            self._enter(READY)
            if self.reload_queued:
                self.reload_queued = False
                self.reload(reread=False)

    def restart(self) -> None:
        self.held = False
        if self.pid is None and not self.spawning:
            self.start_now()
            return
        self.restart_pending = True
        self.stop()

    def hold(self) -> None:
        """The operator's stop: down until start, restart or reset, also when
        a restart was on its way (it is called off)."""
        self.held = True
        self.restart_pending = False
        self.changed_while_spawning = False
        self.stop()

    def stop(self) -> None:
        """Stop byte, then SIGTERM, then SIGKILL to everything after the curse tolerance."""
        for name in ("backoff", "heartbeat", "reload"):
            self._cancel(name)
        if self.pid is None and not self.spawning:
            if self.state in (BACKOFF, STARTING, READY, RELOADING):
                self._enter(STOPPED)
            self.backoff_until = None
            if self.removing and not self.has_timer("empty"):
                # (while its leftovers are being collected, _after_exit forgets it)
                self.launcher.forget(self)
            return
        if self.state == STOPPING:
            return
        self._enter(STOPPING)
        tolerance = self.launcher.curse_tolerance
        if not self.send(protocol.STOP):
            self._terminate()
        else:
            self._timer("term", tolerance / 2, self._terminate)
        self._timer("curse", tolerance, self.curse)

    def _terminate(self) -> None:
        self.timers.pop("term", None)
        if self.pid is not None and not self.wrapped:
            # A uWSGI vassal takes SIGTERM as "reload": only ours get it.
            kill_quietly(self.pid, signal.SIGTERM)

    def curse(self) -> None:
        """SIGKILL every process of the vassal."""
        self.timers.pop("curse", None)
        if self.pid is None and (self.tracker is None or self.tracker.is_empty()):
            return
        if self.exit_reason is None and self.state != STOPPING:
            self.exit_reason = "curse"
        if self.pid is not None:
            kill_quietly(self.pid, signal.SIGKILL)
        if self.tracker is not None:
            self.tracker.kill(signal.SIGKILL)

    def start_now(self) -> None:
        """Spawn now if nothing runs (operator start/reset, a fixed file)."""
        self._cancel("backoff")
        self.backoff_until = None
        if self.has_timer("empty"):
            # The last instance's leftovers are still being killed: the new
            # one comes once they are gone (it must not share their cgroup).
            self.restart_pending = self.config is not None and not self.removing
            return
        if self.pid is None and not self.spawning and not self.removing and self.config is not None:
            self.spawn()

    def reset(self) -> None:
        self.throttle_ms = 0
        self.held = False
        if self.pid is None and not self.spawning:
            self.start_now()

    # --- exit ------------------------------------------------------------------------
    def exited(self, status: int, failed_spawn: str | None = None) -> None:
        """The top process was reaped; leftovers are killed before anything else."""
        pid = self.pid
        self.pid = None
        self.spawning = False
        if self.pipe is not None:
            self.launcher.loop.forget(self.pipe)
            self.pipe.close()
            self.pipe = None
        for name in ("heartbeat", "term", "reload"):
            self._cancel(name)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        reason = self.exit_reason or ("signal" if sig is not None else protocol.EXIT_REASONS.get(code or 0, "exit"))
        if reason in ("exit", "signal") and self.launcher.oom_killed(self):
            reason = "oom"
        detail = f"killed by signal {sig}" if sig is not None else f"exit code {code}"
        if failed_spawn:
            detail = f"spawn failed: {failed_spawn}"
        self.note(f"pid {pid} exited ({detail}, reason {reason})")
        self._record_exit(code, sig, reason, detail)
        self._collect_leftovers()

    def _record_exit(self, code: int | None, sig: int | None, reason: str, detail: str) -> None:
        self.last_exit = {"code": code, "signal": sig, "reason": reason, "at": time.time(), "detail": detail}

    def _collect_leftovers(self) -> None:
        """No orphan may keep the vassal's port: kill what is left, then wait
        (on a timer) for the cgroup to be empty."""
        self._cancel("curse")
        tracker = self.tracker
        if tracker is not None and not tracker.is_empty():
            tracker.kill(signal.SIGKILL)
            self._timer("empty", EMPTY_POLL, self._collect_leftovers)
            return
        self._cancel("empty")
        self._close_log()
        self._close_oom()
        self._close_status()
        self._teardown_jail()
        self._after_exit()

    def _teardown_jail(self) -> None:
        """What the platform keeps after the processes (a FreeBSD jail and its
        rctl rules) goes now; a failure is logged, never fatal."""
        if self.config is None:
            return
        try:
            jails.backend().teardown(self.config, self.name)
        except (jails.JailError, OSError) as exc:
            self.note(f"teardown: {exc}")

    def _after_exit(self) -> None:
        uptime = time.time() - (self.started_at or time.time())
        if self.removing:
            self._enter(STOPPED)
            self.launcher.forget(self)
            return
        if self.restart_pending:
            self.restart_pending = False
            self.restarts += 1
            self.spawn()
            return
        if self.config is None and not self.held:
            # Its file went invalid meanwhile: it waits for a fixed one.
            self._enter(INVALID)
            return
        if self.held or self.voluntary or self.state == STOPPING:
            self._enter(STOPPED)
            return
        if uptime >= STABLE_AFTER:
            self.throttle_ms = 0
        self.restarts += 1
        self._schedule_respawn()

    def _schedule_respawn(self) -> None:
        base = self.launcher.throttle_ms
        cap = self.launcher.max_throttle_ms
        self.throttle_ms = base if self.throttle_ms == 0 else min(cap, self.throttle_ms * 2)
        delay = self.throttle_ms / 1000.0
        self._enter(BACKOFF)
        self.backoff_until = time.time() + delay
        self.note(f"respawn in {delay:.1f}s")
        self._timer("backoff", delay, self._backoff_done)

    def _backoff_done(self) -> None:
        self.timers.pop("backoff", None)
        self.backoff_until = None
        if self.state == BACKOFF and self.pid is None and not self.spawning:
            self.spawn()
