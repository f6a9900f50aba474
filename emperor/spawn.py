"""Starting one vassal process: fork, then in the child only what must happen
before exec (new session, join the vassal's cgroup, wire fds), then exec.

The argv is the one uWSGI's emperor gives its vassals, ``BINARY [--inherit
F]... [--set K=V]... --ini FILE``, so our ``vassal`` and a real uWSGI (via
``emperor-wrapper``) start the same way. The child's cwd is the vassal dir.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass, field

import jails
from bedrock import protocol
from bedrock.proc import (
    anonymous_file,
    die_in_child,
    exec_child,
    proxy_pid1,
    reset_signals,
    wire_child,
)
from jails.tracking import join_cgroups
from jails.tun import ENV_TUN_FDS

# The vassal end of the emperor pipe always lands on this fd in the child.
VASSAL_PIPE_FD = 3
# Our extension beside the emperor pipe (which stays bytes only): a datagram
# socket on which the app master reports its workers and cheaper decisions.
VASSAL_STATUS_FD = 4
# The validated config of a built-in vassal (a sealed memfd), read at start.
VASSAL_CONFIG_FD = 5
# Tyrant mode: /dev/net/tun fds opened for the vassal's tuntap-devices, from here on.
VASSAL_TUN_FD = 6
# The zygote's end of its socket to the emperor, named in its argv.
ZYGOTE_FD = 3


@dataclass
class SpawnRequest:
    name: str
    path: str
    kind: str  # "ini" or "toml"
    inherit: list[str]  # a wrapped uWSGI's templates (ours get them expanded in ``config``)
    overrides: list[tuple[str, str]]  # a wrapped uWSGI's --set flags (likewise)
    wrapper: str | None
    cgroup_procs: list[str]  # cgroup.procs files to join (tracking and limits)
    cgroup_dir: str | None = None  # the tracking cgroup (a zygote spare may become it)
    clone: list[str] = field(default_factory=list)  # emperor-use-clone namespaces
    as_vassal: list[tuple[str, str, str, str]] = field(default_factory=list)  # (action, args, key, value)
    tyrant: tuple[int, int] | None = None  # the file owner, in tyrant mode
    id_maps: tuple[str, str] | None = None  # (uid_map, gid_map) when clone has "user"
    brokered: bool = False  # the emperor passes the router connection over the pipe
    env: dict[str, str] = field(default_factory=dict)  # the clean environment the config was expanded in
    config: bytes | None = None  # built-in vassals: the validated config (Config.to_json)
    # Tyrant mode without namespaces: the owner's (uid, gid), taken before the
    # vassal's first instruction, so nothing of the tenant's runs as root.
    drop: tuple[int, int] | None = None
    tun_devices: int = 0  # tyrant mode in namespaces: /dev/net/tun fds to open for the vassal


@dataclass
class Spawned:
    pid: int | None  # None until the zygote reports it
    pipe: socket.socket
    log_fd: int
    status: socket.socket | None = None  # the app master's status datagrams (vassal/status.py)


def build_argv(req: SpawnRequest) -> list[str]:
    """A real uWSGI gets uWSGI's argv (it reads the file itself: templates
    and overrides go as flags); ours only name the file, for ps: they run
    the config handed to them, parsed once, by the emperor."""
    if req.wrapper:
        return [req.wrapper] + wrapper_args(req)
    return [sys.executable, "-P", "-m", "vassal", f"--{req.kind}", req.path]


def wrapper_args(req: SpawnRequest) -> list[str]:
    argv: list[str] = []
    for template in req.inherit:
        argv += ["--inherit", template]
    for key, value in req.overrides:
        argv += ["--set", f"{key}={value}"]
    argv += [f"--{req.kind}", req.path]
    return argv


def build_env(req: SpawnRequest) -> dict[str, str]:
    env = dict(req.env)
    env[protocol.ENV_FD] = str(VASSAL_PIPE_FD)
    env[protocol.ENV_STATUS_FD] = str(VASSAL_STATUS_FD)
    env["UWSGI_VASSAL_NAME"] = req.name
    env["UWSGI_VASSAL_CONFIG"] = req.path
    env[protocol.ENV_CLONED] = ",".join(req.clone)
    if req.as_vassal:
        env["PYEMPEROR_AS_VASSAL"] = json.dumps(req.as_vassal)
    if req.brokered:
        env[protocol.ENV_BROKERED] = "1"
    else:
        env.pop(protocol.ENV_BROKERED, None)
    if req.tyrant is not None:
        env[protocol.ENV_TYRANT] = f"{req.tyrant[0]}:{req.tyrant[1]}"
    else:
        env.pop(protocol.ENV_TYRANT, None)
    if req.config is not None:
        env[protocol.ENV_CONFIG_FD] = str(VASSAL_CONFIG_FD)
    return env


def config_fd(data: bytes) -> int:
    """A read-only fd holding ``data``: a sealed memfd (nobody can change what
    the emperor validated once it is handed over), else an unlinked file."""
    fd = anonymous_file("vassal-config", sealing=True)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    seals = getattr(fcntl, "F_SEAL_SEAL", 0) | getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_WRITE", 0)
    if seals and hasattr(fcntl, "F_ADD_SEALS"):
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            pass  # not a memfd (the fallback)
    return fd


def become_owner(owner: tuple[int, int]) -> None:
    """Tyrant mode without namespaces: the vassal's processes are the file's
    owner from their first instruction on, groups and no_new_privs included."""
    import pwd

    uid, gid = owner
    try:
        name: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    jails.backend().drop_privileges(uid, gid, name)


def unshare_clone(clone: list[str], id_maps: tuple[str, str] | list[str] | None, tun_devices: int = 0) -> tuple[bool, list[int]]:
    """Unshare the emperor-use-clone namespaces: (True if one is a pid
    namespace, so our next child is its PID 1; /dev/net/tun fds for the vassal)."""
    if not clone:
        return False, []
    return jails.backend().clone_for_spawn(clone, id_maps, tun_devices)


def hand_tun_fds(fds: list[int], env: dict[str, str] | os._Environ) -> None:
    """The tun fds opened for the vassal, at fixed numbers after its own
    (so the fd closing around them keeps them) and named in its environment."""
    for number, fd in enumerate(fds):
        target = VASSAL_TUN_FD + number
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    if fds:
        env[ENV_TUN_FDS] = ",".join(str(VASSAL_TUN_FD + n) for n in range(len(fds)))


def enter_clone(clone: list[str], id_maps: tuple[str, str] | None, tun_devices: int, env: dict[str, str]) -> None:
    """In a spawned child: unshare the emperor-use-clone namespaces. With a
    pid namespace only our next child is inside it (as PID 1): this process
    forks it and stays behind as a proxy forwarding signals and exit status."""
    pid_ns, tun = unshare_clone(clone, id_maps, tun_devices)
    hand_tun_fds(tun, env)
    if pid_ns:
        proxy_pid1()


def spawn(req: SpawnRequest) -> Spawned:
    argv = build_argv(req)
    env = build_env(req)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status_ours, status_theirs = status_pair()
    log_r, log_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    handed = config_fd(req.config) if req.config is not None else None
    cwd = os.path.dirname(req.path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            os.setsid()
            join_cgroups(req.cgroup_procs)
            reset_signals()
            moves = [(theirs.fileno(), VASSAL_PIPE_FD), (status_theirs.fileno(), VASSAL_STATUS_FD)]
            wire_child(devnull, log_w, moves + ([(handed, VASSAL_CONFIG_FD)] if handed is not None else []))
            os.chdir(cwd)
            enter_clone(req.clone, req.id_maps, req.tun_devices, env)
            if req.drop is not None:
                become_owner(req.drop)
            exec_child(argv, env, what=f"emperor: cannot start vassal {req.name}")
        except BaseException as exc:
            die_in_child(f"emperor: cannot start vassal {req.name}", exc)
        os._exit(127)
    theirs.close()
    status_theirs.close()
    os.close(log_w)
    os.close(devnull)
    if handed is not None:
        os.close(handed)
    ours.setblocking(False)
    os.set_blocking(log_r, False)
    return Spawned(pid, ours, log_r, status_ours)


def status_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    return ours, theirs
