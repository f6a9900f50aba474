"""The zygote: a template process that has imported the vassal code once and
forks vassals on request, as uWSGI's fork-server does.

A fresh interpreter per vassal costs ~100 ms of start-up and ~15 MB of
private memory; a fork of this template costs a millisecond and shares the
interpreter and the imported modules copy-on-write (``gc.freeze`` keeps the
collector from touching, and so copying, the shared objects).

The zygote is exec'd fresh by the emperor (no emperor state leaks into
vassals) and talks over a SOCK_SEQPACKET socketpair: a request is one JSON
message with the vassal's fds attached (SCM_RIGHTS). For each request the
zygote forks an intermediate child, which joins the vassal's cgroup, forks
the vassal's top process, reports its pid and exits; the top process is
then re-parented to the emperor, a child subreaper, which reaps it like any
other child. End of file on the socket means the emperor is gone.
"""

from __future__ import annotations

import array
import gc
import itertools
import json
import os

# Everything a vassal's top process, app master and workers import, so that
# it is shared with every vassal instead of loaded by each.
import pkgutil  # noqa: F401  (runpy.run_path imports it lazily)
import runpy  # noqa: F401  (wsgi-file loading)
import select
import signal
import socket
import sys

import jails
import vassal.app  # noqa: F401
import vassal.cli
import vassal.http  # noqa: F401
import vassal.master  # noqa: F401
import vassal.status  # noqa: F401
import vassal.top  # noqa: F401
import vassal.worker  # noqa: F401
from bedrock.proc import default_signals, wire_child
from emperor.spawn import VASSAL_TUN_FD, become_owner, unshare_clone
from jails.tracking import copy_limits, join_cgroups
from jails.tun import ENV_TUN_FDS

try:
    import setproctitle
except ImportError:  # pragma: no cover
    setproctitle = None  # type: ignore[assignment]

# The platform's jail backend, chosen once here: made after each fork, its
# module and objects would land in pages every vassal then copies.
jails.backend()

MAX_MESSAGE = 1 << 20
MAX_FDS = 8
# The emperor pipe, the log pipe, /dev/null, the status socket, the config
# (see run_vassal).
VASSAL_FDS = 5


def _die_with_parent() -> None:
    try:
        jails.backend().die_with_parent(signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def receive(sock: socket.socket) -> tuple[dict, list[int]] | None:
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    if not msg:
        return None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return json.loads(msg), list(fds)


def run_vassal(request: dict, fds: list[int], sock: socket.socket) -> None:
    """In the vassal's top process: wire stdio and the pipe, then run it."""
    code = 1
    try:
        sock.close()
        pipe_fd, log_fd, null_fd, status_fd, config_fd, *tun = fds
        os.setsid()
        wire_child(null_fd, log_fd, [(pipe_fd, int(request["pipe_fd"])), (status_fd, int(request["status_fd"])),
                   (config_fd, int(request["config_fd"]))] + [(fd, VASSAL_TUN_FD + n) for n, fd in enumerate(tun)])
        default_signals(signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if tun:
            os.environ[ENV_TUN_FDS] = ",".join(str(VASSAL_TUN_FD + n) for n in range(len(tun)))
        sys.argv = list(request["argv"])
        if request.get("drop"):
            become_owner(tuple(request["drop"]))
        gc.enable()
        code = vassal.cli.run_handed()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        try:
            os.write(2, f"vassal {request.get('name')} could not start: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


def handle(request: dict, fds: list[int], sock: socket.socket) -> None:
    middle = os.fork()
    if middle != 0:
        # Not waited for: joining a cgroup can take milliseconds, and spawns
        # must not queue behind each other (SIGCHLD is ignored: auto-reaped).
        for fd in fds:
            os.close(fd)
        return
    # The intermediate child. SIGCHLD must not stay ignored here: a vassal
    # that dies before we exit would be auto-reaped and its status lost.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        join_cgroups(request.get("cgroup_procs") or [])
    except BaseException as exc:
        _reply_and_exit(sock, {"id": request["id"], "error": repr(exc)})
    intermediate(request, fds, sock)


def _reply_and_exit(sock: socket.socket, reply: dict) -> None:
    try:
        sock.send(json.dumps(reply).encode())
    finally:
        os._exit(0)


def intermediate(request: dict, fds: list[int], sock: socket.socket) -> None:
    """In the intermediate child, inside the vassal's cgroups: unshare, fork
    the top process, report its pid to the emperor, exit."""
    try:
        # Our next child is PID 1 of a new pid namespace, if one is asked for.
        _, tun = unshare_clone(request.get("clone") or [], request.get("id_maps"), int(request.get("tun_devices") or 0))
        pid = os.fork()
        if pid == 0:
            run_vassal(request, fds + tun, sock)
        reply = {"id": request["id"], "pid": pid}
    except BaseException as exc:
        reply = {"id": request["id"], "error": repr(exc)}
    _reply_and_exit(sock, reply)


class Spare:
    """An intermediate child forked ahead of time and already moved into a
    spare cgroup, so that a spawn pays neither the fork nor the cgroup move
    (the first move into a cgroup after a quiet spell waits for an RCU grace
    period: 15-30 ms on cgroup v1). On use, its cgroup dir is given the
    limits the emperor set on the vassal's, replaces it (rename) and the
    spare carries on as the intermediate child."""

    def __init__(self, base: str, number: int, emperor_sock: socket.socket):
        self.path = os.path.join(base, f".spare-{os.getpid()}-{number}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.zygote = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            self._child(theirs, emperor_sock)
        theirs.close()
        self.sock = ours
        self.ready = False

    def _child(self, channel: socket.socket, emperor_sock: socket.socket) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            _die_with_parent()
            if os.getppid() != self.zygote:
                os._exit(0)  # the zygote died before the death signal was armed
            os.mkdir(self.path)  # not makedirs: never re-create a removed tree
            join_cgroups([os.path.join(self.path, "cgroup.procs")])
            channel.send(b"ready")
            received = receive(channel)
        except BaseException:
            os._exit(1)
        if received is None:
            os._exit(0)
        request, fds = received
        channel.close()
        intermediate(request, fds, emperor_sock)

    def poll_ready(self) -> bool:
        """False once the spare is gone (it could not make its cgroup)."""
        try:
            data = self.sock.recv(16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        self.ready = data == b"ready"
        return self.ready

    def _oom_watched(self, target: str) -> bool:
        """v1 with the memory hierarchy as the tracking one: the emperor
        watches the OOM eventfd of the dir it gave a memory-limit, so that
        dir must stay (the slower path joins it)."""
        try:
            with open(os.path.join(target, "memory.limit_in_bytes")) as handle:
                wanted = handle.read()
            with open(os.path.join(self.path, "memory.limit_in_bytes")) as handle:
                return handle.read() != wanted
        except FileNotFoundError:
            return False

    def take(self, request: dict, fds: list[int]) -> bool:
        """Hand the request over if its cgroup is the spare's to become."""
        target = request.get("cgroup_dir")
        procs = request.get("cgroup_procs") or []
        if not self.ready or not target or procs != [os.path.join(target, "cgroup.procs")]:
            return False
        if os.path.dirname(target) != os.path.dirname(self.path):
            return False
        try:
            if self._oom_watched(target):
                return False
            # The emperor has set the vassal's limits on target (v2: all of
            # them; v1: the tracking hierarchy's, pids.max): they must bind
            # before its first instruction, so our dir takes them before it
            # takes target's place. Target must exist: a spare that had
            # nothing to copy could carry an earlier vassal's values.
            copy_limits(target, self.path)
            os.rmdir(target)  # made empty by the emperor; ours replaces it
            os.rename(self.path, target)
        except OSError:
            return False
        self.sock.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        self.sock.close()
        return True


def main() -> int:
    fd = int(sys.argv[1])
    spare_base = sys.argv[2] if len(sys.argv) > 2 else None
    sock = socket.socket(fileno=fd)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if setproctitle is not None:
        setproctitle.setproctitle("emperor zygote")
    gc.collect()
    gc.freeze()
    gc.disable()
    spares = itertools.count(1)
    spare = Spare(spare_base, next(spares), sock) if spare_base else None
    while True:
        watched = [sock] + ([spare.sock] if spare is not None and not spare.ready else [])
        try:
            readable, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if spare is not None and spare.sock in readable and not spare.poll_ready():
            spare.sock.close()
            spare = None  # spawns take the slower path from now on
        if sock not in readable:
            continue
        try:
            received = receive(sock)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if received is None:
            return 0
        request, fds = received
        if len(fds) != VASSAL_FDS:
            for extra in fds:
                os.close(extra)
            sock.send(json.dumps({"id": request.get("id"), "error": f"expected {VASSAL_FDS} fds, got {len(fds)}"}).encode())
            continue
        if spare is not None and spare.take(request, fds):
            for fd_ in fds:
                os.close(fd_)
            spare = Spare(spare_base, next(spares), sock)  # the next one, off the critical path
            continue
        handle(request, fds, sock)


if __name__ == "__main__":
    sys.exit(main())
