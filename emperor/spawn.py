"""Starting one vassal process: fork, then in the child only what must happen
before exec (new session, join the vassal's cgroup, wire fds), then exec.

The argv is the one uWSGI's emperor gives its vassals, ``BINARY [--inherit
F]... [--set K=V]... --ini FILE``, so our ``vassal`` and a real uWSGI (via
``emperor-wrapper``) start the same way. The child's cwd is the vassal dir.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass

from vassal import protocol

# The vassal end of the emperor pipe always lands on this fd in the child.
VASSAL_PIPE_FD = 3


@dataclass
class SpawnRequest:
    name: str
    path: str
    kind: str  # "ini" or "toml"
    inherit: list[str]
    overrides: list[tuple[str, str]]
    wrapper: str | None
    cgroup_procs: str | None  # the vassal cgroup's cgroup.procs file, if tracked


@dataclass
class Spawned:
    pid: int
    pipe: socket.socket
    log_fd: int


def build_argv(req: SpawnRequest) -> list[str]:
    if req.wrapper:
        argv = [req.wrapper]
    else:
        argv = [sys.executable, "-m", "vassal"]
    for template in req.inherit:
        argv += ["--inherit", template]
    for key, value in req.overrides:
        argv += ["--set", f"{key}={value}"]
    argv += [f"--{req.kind}", req.path]
    return argv


def build_env(req: SpawnRequest) -> dict[str, str]:
    env = dict(os.environ)
    env[protocol.ENV_FD] = str(VASSAL_PIPE_FD)
    env["UWSGI_VASSAL_NAME"] = req.name
    env["UWSGI_VASSAL_CONFIG"] = req.path
    return env


def spawn(req: SpawnRequest) -> Spawned:
    argv = build_argv(req)
    env = build_env(req)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_r, log_w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.path.dirname(req.path)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            os.setsid()
            if req.cgroup_procs:
                with open(req.cgroup_procs, "w") as handle:
                    handle.write(str(os.getpid()))
            signal.set_wakeup_fd(-1)
            for sig in range(1, signal.NSIG):
                try:
                    if signal.getsignal(sig) not in (signal.SIG_DFL, None):
                        signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.dup2(devnull, 0)
            os.dup2(log_w, 1)
            os.dup2(log_w, 2)
            if theirs.fileno() == VASSAL_PIPE_FD:
                os.set_inheritable(VASSAL_PIPE_FD, True)
            else:
                os.dup2(theirs.fileno(), VASSAL_PIPE_FD)
            os.closerange(VASSAL_PIPE_FD + 1, os.sysconf("SC_OPEN_MAX"))
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        except BaseException as exc:
            try:
                os.write(2, f"emperor: cannot start vassal {req.name}: {exc}\n".encode())
            except OSError:
                pass
        os._exit(127)
    theirs.close()
    os.close(log_w)
    os.close(devnull)
    ours.setblocking(False)
    os.set_blocking(log_r, False)
    return Spawned(pid, ours, log_r)
