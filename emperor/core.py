"""The emperor: one loop, one Vassal state machine per config file.

Everything the emperor does goes through :meth:`Emperor.execute`: control
socket requests, and signals (SIGHUP is ``reload --all``, SIGTERM/SIGINT are
``shutdown``, SIGUSR1 is ``log-status``), as in circus. Nothing in the loop
waits for a vassal: exits arrive by SIGCHLD, bytes by readiness, delays are
timers.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable

import jails
from bedrock import journal
from bedrock.config import (
    Config,
    ConfigError,
    ConfigUnavailable,
)
from bedrock.log import stamped
from bedrock.loop import Loop, reaped
from emperor import commands
from emperor.commands import CommandError, Peer
from emperor.control_server import ControlServer, StatsServer
from emperor.file_changes import Action, Known, Sight, on_config, on_sight
from emperor.launcher import Launcher
from emperor.lifecycle import Signature, Vassal
from emperor.monitor import DirMonitor, Source, is_regular
from emperor.names import name_problem, tenant_name_problem
from emperor.pidfile import Pidfile
from emperor.router_supervisor import RouterSupervisor
from emperor.zygote_client import ZygoteClient
from jails.tracking import (
    CgroupTree,
    reap_stale,
    remove_v1_bases,
)
from vassal import hooks


def become_subreaper() -> bool:
    """Descendants that daemonize get reparented to us (and reaped), not to init."""
    return jails.backend().become_subreaper()


# A config read that failed for lack of fds or memory is tried again after this.
CONFIG_RETRY = 1.0
# A vassal's file is read again at most this often (the last change always).
REREAD_INTERVAL = 0.5
QUOTA_ERROR = "tyrant mode: quota reached: uid {uid} already has {count} vassals (emperor-tyrant-max-vassals); this one starts when one of them goes"


def _nonblocking_stderr() -> None:
    """Echoing vassal output must never block the loop. Only a pipe or socket
    of our own is made non-blocking: a terminal or file is shared with others."""

    try:
        mode = os.fstat(2).st_mode
    except OSError:
        return
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        os.set_blocking(2, False)


class Emperor:
    def __init__(self, settings: Config, log: Callable[[str], None] | None = None):
        # Under systemd (JOURNAL_STREAM is our stderr): entries in journald's
        # native protocol, with VASSAL= on each vassal's lines.
        self.journal = journal.Journal() if journal.stderr_is_journal() else None
        self.settings = settings
        self.loop = Loop()
        self.vassals: dict[str, Vassal] = {}
        self.sources = [Source.parse(spec) for spec in settings.getlist("emperor")]
        self.launcher = Launcher(settings, self.loop, self.log, self.vassal_log, self.forget)
        self.tyrant = self.launcher.tyrant
        self.max_per_owner = settings.get_int("emperor-tyrant-max-vassals")
        self._log = log or self._journal_or_stderr
        self.loop.report = self.log  # a failing callback is logged like anything else of ours
        self.started_at = time.time()
        self.shutting_down = False
        self.exit_code = 0
        self.cgroups: CgroupTree | None = None
        self.monitor: DirMonitor | None = None
        self.control: ControlServer | None = None
        self.stats: StatsServer | None = None
        self.pidfile: Pidfile | None = None
        self.subreaper = False
        # Exits reaped before the zygote told us whose pid it was: pid -> (status, when).
        self.early_exits: dict[int, tuple[int, float]] = {}
        self.retrying: set[str] = set()  # config files to read again (ConfigUnavailable)
        self.dropped_log_lines = 0

    # --- logging -----------------------------------------------------------
    def _journal_or_stderr(self, message: str) -> None:
        """Under systemd a native journal entry (journal.py), else a line."""
        if self.journal is None or not self.journal.send(MESSAGE=message, PRIORITY="6", SYSLOG_IDENTIFIER="pyemperor"):
            self._default_log(message)

    @staticmethod
    def _default_log(message: str) -> None:
        """Only the first line of a message starts like an emperor line
        (stamp, ``[emperor]``); the rest (a config error's problems, a
        traceback) are indented, so no text inside a message, such as a
        tenant's file name, can pass for a line of the emperor's own."""
        try:
            os.write(2, stamped("emperor", message))
        except OSError:
            pass

    def log(self, message: str) -> None:
        from emperor.names import printable

        # Messages carry file names and errors from tenants: control
        # characters and undecodable bytes are shown escaped, never raw.
        # Newlines stay (a config error lists one problem a line), except
        # inside a vassal's name, where they are the name's.
        if "\n" in message:
            for name in self.vassals:
                if "\n" in name and name in message:
                    message = message.replace(name, printable(name))
        self._log(printable(message, keep_newlines=True))

    def vassal_log(self, vassal: Vassal, line: str) -> None:
        """Echo one of a vassal's lines (LogBuffer rate-limits what comes
        here). It starts with ``[name]`` and holds no control character, so
        it can never look like an emperor line or rewrite one on a terminal."""
        from emperor.names import printable

        self._arm_echo_notes()
        if self.journal is not None and self.journal.send(MESSAGE=printable(line), PRIORITY="6",
                                                          SYSLOG_IDENTIFIER="pyemperor", VASSAL=printable(vassal.name)):
            return
        try:
            os.write(2, f"[{printable(vassal.name)}] {printable(line)}\n".encode("utf-8", "replace"))
        except BlockingIOError:
            # Our stderr (journald, a pipe) is full: the line stays in the
            # vassal's ring buffer (emperorctl logs); the loop does not wait.
            self.dropped_log_lines += 1
        except OSError:
            pass

    # --- start and stop ------------------------------------------------------
    def start(self, force_scan: bool = False) -> None:
        """Bind the control socket (refusing if another emperor has it), then watch."""
        control_path = self.settings.get_str("emperor-control")
        self.control = ControlServer(self, control_path, self.settings.get_int("emperor-control-mode"))
        self.control.open()
        if self.settings.has("emperor-pidfile"):
            self.pidfile = Pidfile(self.settings.get_str("emperor-pidfile"))
            self.pidfile.write()
        if self.settings.has("emperor-stats"):
            address = self.settings.get_str("emperor-stats")
            self.stats = StatsServer(self, address)
            self.stats.open()
            if self.tyrant and "/" not in address:
                self.log(f"warning: the stats server on {address} shows every tenant's vassals to any local user; "
                         "in tyrant mode give it a unix socket path (made 0600)")
        self.subreaper = become_subreaper()
        _nonblocking_stderr()
        self.cgroups = CgroupTree.create(f"pyemperor.{os.getpid()}")
        self.launcher.cgroups = self.cgroups
        reap_stale(self.cgroups, self.log)  # a SIGKILLed emperor's leftovers would hold ports and cgroups
        self.launcher.routers = [
            RouterSupervisor(self, spec, self.settings.getlist("tuntap-router-firewall-in"), self.settings.getlist("tuntap-router-firewall-out"))
            for spec in self.settings.getlist("tuntap-router")
        ]
        for router in self.launcher.routers:
            router.create_device()  # before exec-as-root, which may configure it
        # exec-as-root / hook-as-root: once, at start, before any vassal.
        hooks.run_phase(self.settings, "as-root")
        for router in self.launcher.routers:
            router.start()
        if self.subreaper and self.settings.get_bool("emperor-zygote"):
            # Vassals forked by the zygote are re-parented to us: only as a subreaper.
            self._start_zygote()
        loop = self.loop
        loop.add_signal(signal.SIGCHLD, lambda s: self.reap())
        loop.add_signal(signal.SIGTERM, lambda s: self._signal_command("shutdown"))
        loop.add_signal(signal.SIGINT, lambda s: self._signal_command("shutdown"))
        loop.add_signal(signal.SIGQUIT, lambda s: self._signal_command("shutdown"))
        loop.add_signal(signal.SIGHUP, lambda s: self._signal_command("reload", {"all": True}))
        loop.add_signal(signal.SIGUSR1, lambda s: self._signal_command("log-status"))
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.monitor = DirMonitor(
            loop,
            self.sources,
            self.on_path,
            self.rescan,
            self.settings.get_float("emperor-freq"),
            force_scan=force_scan,
        )
        tracking = f"cgroup {self.cgroups.base}" if self.cgroups else "process groups (no writable cgroup)"
        if self.cgroups and self.cgroups.how:
            tracking += f" in {self.cgroups.how}"
        self.log(
            f"pid {os.getpid()} watching {', '.join(s.directory + ('/' + s.pattern if s.pattern else '') for s in self.sources)}"
            f" ({self.monitor.mode}); vassals tracked by {tracking}; control {control_path}"
        )
        for source in self.sources:
            self.rescan(source)

    def _start_zygote(self) -> None:
        if self.shutting_down:
            return
        self.launcher.zygote = ZygoteClient(self._zygote_reply, self._zygote_want_write)
        # Spare pre-moved intermediates need cgroup dirs that can be renamed (v1).
        self.launcher.zygote.start(self.cgroups.base if self.cgroups and not self.cgroups.unified else None, self.launcher.vassal_env)
        self.loop.add_reader(self.launcher.zygote.sock, self.launcher.zygote.on_readable)

    def _zygote_want_write(self, wanted: bool) -> None:
        if self.launcher.zygote is None or self.launcher.zygote.sock is None:
            return
        if wanted:
            self.loop.add_writer(self.launcher.zygote.sock, self.launcher.zygote.flush)
        else:
            self.loop.remove_writer(self.launcher.zygote.sock)

    def _zygote_reply(self, request_id: int, pid: int | None, error: str | None) -> None:
        vassal = self.launcher.pending_spawns.pop(request_id, None)
        if vassal is None:
            return
        vassal.spawned(pid, error)
        if pid is not None and pid in self.early_exits:
            status, _ = self.early_exits.pop(pid)
            self.launcher.by_pid.pop(pid, None)
            vassal.exited(status)

    def _zygote_died(self, status: int) -> None:
        zygote = self.launcher.zygote
        self.launcher.zygote = None
        if zygote is not None:
            if zygote.sock is not None:
                self.loop.forget(zygote.sock)
            zygote.fail_pending("the zygote died")
            zygote.close()
        for request_id in list(self.launcher.pending_spawns):
            self._zygote_reply(request_id, None, "the zygote died")
        if not self.shutting_down:
            self.log(f"zygote died ({os.waitstatus_to_exitcode(status)}), starting a new one")
            self.loop.call_later(1.0, self._start_zygote)

    def run(self) -> int:
        self.loop.run(until=self._done)
        self.cleanup()
        return self.exit_code

    def _done(self) -> bool:
        return self.shutting_down and not self.vassals

    def cleanup(self) -> None:
        for router in self.launcher.routers:
            router.stop()
        if self.launcher.zygote is not None:
            zygote, self.launcher.zygote = self.launcher.zygote, None
            zygote.close()  # end of file: it exits
            if zygote.pid:
                try:
                    os.waitpid(zygote.pid, 0)
                except ChildProcessError:
                    pass
        if self.monitor:
            self.monitor.close()
        if self.stats:
            self.stats.close()
        if self.control:
            self.control.close()
        if self.pidfile:
            self.pidfile.remove()
        if self.cgroups:
            self.cgroups.remove()
            remove_v1_bases(os.path.basename(self.cgroups.base))
        self.log("bye")

    def shutdown(self) -> None:
        if self.shutting_down:
            # A second request: no more patience.
            for vassal in list(self.vassals.values()):
                vassal.curse()
            return
        self.shutting_down = True
        self.log(f"shutting down {len(self.vassals)} vassal(s)")
        for vassal in self.vassals.values():
            vassal.removing = True
        for vassal in list(self.vassals.values()):
            try:
                vassal.stop()
            except Exception as exc:  # noqa: BLE001 - one vassal's bug must not keep the others running
                self.log(f"[{vassal.name}] internal error stopping it: {type(exc).__name__}: {exc}")

    def _signal_command(self, name: str, args: dict | None = None) -> None:
        try:
            self.execute(name, args or {}, Peer.root())
        except CommandError as exc:
            self.log(f"{name}: {exc}")

    def execute(self, name: str, args: dict, peer: Peer):
        """The single command path for the control socket and for signals."""
        return commands.execute(self, name, args, peer)

    # --- vassal files -----------------------------------------------------------
    def source_for(self, path: str) -> Source | None:
        for source in self.sources:
            if source.wants(path):
                return source
        return None

    def rescan(self, source: Source) -> None:
        present = set(source.list())
        for path in sorted(present):
            self.on_path(path)
        for vassal in list(self.vassals.values()):
            if os.path.dirname(vassal.path) == source.directory and vassal.path not in present and self.source_for(vassal.path) is source:
                self.on_path(vassal.path)

    def on_path(self, path: str) -> None:
        """Something happened to ``path``: decide what it means. Whatever a
        tenant's file makes go wrong costs that file only, never the monitor
        or the other vassals."""
        try:
            self._on_path(path)
        except Exception as exc:  # noqa: BLE001 - a bug on one file must not blind the emperor
            import traceback

            self.log(f"[{os.path.basename(path)}] internal error handling this file: {type(exc).__name__}: {exc}\n"
                     f"{traceback.format_exc().rstrip()}")
            vassal = self.vassals.get(os.path.basename(path))
            if vassal is not None and vassal.pid is None and not vassal.spawning:
                vassal.invalid(f"internal error: {type(exc).__name__}: {exc}")

    def _on_path(self, path: str) -> None:
        if self.shutting_down:
            return
        name = os.path.basename(path)
        vassal = self.vassals.get(name)
        if vassal is not None and vassal.path != path:
            # Same file name in another watched dir: the first one wins.
            if os.path.exists(vassal.path):
                self.log(f"ignoring {path}: a vassal named {name} already runs from {vassal.path}")
                return
        signature = Signature.of(path)
        present = signature is not None and is_regular(path)
        owner = self._owner_of(path) if present else None
        known = None if vassal is None else Known(vassal.removing, vassal.spawning, vassal.pid is not None, vassal.state)
        sight = on_sight(known, present, vassal is not None and vassal.signature == signature,
                         vassal is not None and self.tyrant and vassal.owner != owner)
        if sight is Sight.IGNORE:
            return
        if present and vassal is not None and not vassal.removing and self._too_soon(vassal, path):
            return
        if sight is Sight.REMOVE:
            assert vassal is not None
            why = "the file's owner changed, stopping the previous owner's vassal" if present else "config gone, stopping"
            self.log(f"[{name}] {why}")
            vassal.removing = True
            vassal.stop()
            return
        # Spawns run the operator's hooks with the name in their environment,
        # as root: in tyrant mode it must not be shell syntax.
        name_error = tenant_name_problem(name) if self.tyrant else None
        config: Config | None = None
        waiting = vassal is None or vassal.removing or vassal.error_kind == "quota"
        quota = self._over_quota(owner) if waiting else None
        error = name_problem(name) or name_error or quota
        if vassal is not None:
            vassal.error_kind = "quota" if quota else None
        if error is None:
            try:
                config = self.launcher.read_config(path)
            except ConfigUnavailable as exc:
                # Out of fds or memory: not the file's fault; look again soon
                # rather than leave it invalid until it changes.
                self._retry_later(path, str(exc))
                return
            except ConfigError as exc:
                error = str(exc)
        previous = vassal.config if vassal is not None else None
        jail_changed = previous is not None and config is not None and previous.jail_fingerprint() != config.jail_fingerprint()
        action = on_config(known, config is not None, jail_changed)
        if action in (Action.NEW, Action.NEW_INVALID):
            vassal = Vassal(name=name, path=path, launcher=self.launcher, signature=signature, config=config, error=error, owner=owner,
                            error_kind="quota" if quota else None)
            self.vassals[name] = vassal
            if action is Action.NEW:
                vassal.spawn()
            else:
                vassal.invalid(error)
                self.log(f"[{name}] invalid config, not starting:\n{error}")
            return
        assert vassal is not None
        vassal.signature = signature
        if action is Action.COME_BACK:
            # Let the old instance go, then start anew.
            vassal.removing = False
            vassal.restart_pending = config is not None
            vassal.config = config
            vassal.error = error
            vassal.path = path
            return
        if action is Action.KEEP_OLD:
            vassal.error = error
            self.log(f"[{name}] config invalid, still running the previous one:\n{error}")
            return
        if action is Action.INVALID:
            vassal.config = None
            vassal.invalid(error)
            self.log(f"[{name}] invalid config:\n{error}")
            return
        vassal.config = config
        vassal.error = None
        if action is Action.DEFER:
            # The instance on its way runs the previous config; once its pid
            # is known it gets this one.
            vassal.changed_while_spawning = True
        elif action is Action.START:
            vassal.throttle_ms = 0
            vassal.start_now()
        elif action is Action.RESTART:
            self.log(f"[{name}] jail-level options changed, restarting")
            vassal.restart()
        elif action is Action.RELOAD and not vassal.reload(reread=False):
            vassal.restart()

    def _over_quota(self, owner: tuple[int, int] | None) -> str | None:
        """Tyrant mode: a tenant dropping thousands of files would have the
        emperor spawn thousands of vassals; past emperor-tyrant-max-vassals
        a new one is refused (and looked at again when one of theirs goes)."""
        if owner is None or not self.max_per_owner:
            return None
        # A vassal being removed counts while anything of it still runs:
        # renaming files in a loop would otherwise keep many alive at once.
        held = sum(1 for v in self.vassals.values()
                   if v.owner == owner and v.error_kind != "quota" and (not v.removing or v.pid is not None or v.spawning))
        if held < self.max_per_owner:
            return None
        return QUOTA_ERROR.format(uid=owner[0], count=held)

    def _too_soon(self, vassal: Vassal, path: str) -> bool:
        """A file touched in a loop would have the emperor parse it (and
        reload the vassal) flat out: changes are taken at most every
        REREAD_INTERVAL per vassal, the last one always."""
        now = time.monotonic()
        wait = vassal.last_read + REREAD_INTERVAL - now
        if wait <= 0:
            vassal.last_read = now
            return False
        if not vassal.has_timer("reread"):
            vassal.after(wait, "reread", lambda: self.on_path(path))
        return True

    def _owner_of(self, path: str) -> tuple[int, int] | None:
        """Tyrant mode: whose vassal ``path`` makes (None: nobody's but root's,
        e.g. a refused symlink)."""
        try:
            return self.launcher.tyrant_owner(path)
        except (ConfigError, OSError):
            return None

    def _retry_later(self, path: str, why: str) -> None:
        if path in self.retrying:
            return
        self.log(f"[{os.path.basename(path)}] {why}; trying again in {CONFIG_RETRY:.0f}s")
        self.retrying.add(path)

        def again() -> None:
            self.retrying.discard(path)
            self.on_path(path)

        self.loop.call_later(CONFIG_RETRY, again)

    def forget(self, vassal: Vassal) -> None:
        if self.vassals.get(vassal.name) is vassal:
            del self.vassals[vassal.name]
        vassal.dispose()
        self.log(f"[{vassal.name}] removed")
        if not self.shutting_down and os.path.lexists(vassal.path) and vassal.name not in self.vassals:
            self.on_path(vassal.path)  # a file that came back meanwhile (e.g. another owner's)
        if self.max_per_owner and vassal.owner is not None and vassal.error_kind != "quota":
            # A place freed up: the owner's first file refused for the quota gets it.
            waiting = [v for v in self.vassals.values() if v.owner == vassal.owner and v.error_kind == "quota"]
            if waiting:
                first = min(waiting, key=lambda v: v.name)
                del self.vassals[first.name]
                self.on_path(first.path)

    # --- processes -------------------------------------------------------------
    def reap(self) -> None:
        for pid, status in reaped():
            if self.launcher.zygote is not None and pid == self.launcher.zygote.pid:
                self._zygote_died(status)
                continue
            router = next((r for r in self.launcher.routers if r.pid == pid), None)
            if router is not None:
                router.exited(status)
                continue
            if self.launcher.hook_exited(pid, status):
                continue
            vassal = self.launcher.by_pid.pop(pid, None)
            if vassal is not None and vassal.pid == pid:
                vassal.exited(status)
            elif self.launcher.pending_spawns:
                # Maybe a zygote-forked vassal that died before its pid reached us.
                now = time.monotonic()
                self.early_exits[pid] = (status, now)
                for old, (_, when) in list(self.early_exits.items()):
                    if now - when > 30:
                        del self.early_exits[old]
            # Anything else: a vassal's orphan re-parented to us (subreaper); reaped.

    # --- echo rate limit notes (DESIGN 7: bad input disturbs nothing else) --------
    # Set by _arm_echo_notes; a class default so that __init__ needs no entry.
    _echo_notes_timer: object | None = None

    def _arm_echo_notes(self) -> None:
        """Something was echoed: make sure the note timer runs, which says in
        our log what each vassal's rate limit held back."""
        if self._echo_notes_timer is None:
            from emperor.logbuf import ECHO_NOTE_INTERVAL

            self._echo_notes_timer = self.loop.call_later(ECHO_NOTE_INTERVAL, self._echo_notes)

    def _echo_notes(self) -> None:
        """Once per interval, one line per vassal whose lines were not all
        echoed; the timer stops once nothing is held back any more."""
        from emperor.logbuf import ECHO_NOTE_INTERVAL

        self._echo_notes_timer = None
        held_back = False
        for name, vassal in sorted(self.vassals.items()):
            limit = vassal.log.echo_limit if vassal.log is not None else None
            count = limit.take_pending() if limit is not None else 0
            if count:
                held_back = True
                self.log(f"[{name}] {count} line(s) not echoed (rate limit; `emperorctl logs {name}` has them)")
        if held_back:
            self._echo_notes_timer = self.loop.call_later(ECHO_NOTE_INTERVAL, self._echo_notes)
