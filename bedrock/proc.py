"""Process helpers every pyemperor process uses around fork and exec: one
signal reset for children, one fd placement, one exec, one PID-1 proxy,
quiet kills and the resident set of a process."""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

# Imported up front: after pivot-root or chroot the vassal may not reach it.
import psutil

# What a proxy in front of a pid namespace passes on to the PID 1 behind it.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def anonymous_file(name: str, sealing: bool = False) -> int:
    """A close-on-exec fd of a file with no name (inherited across fork):
    a memfd where there is one, else an unlinked temporary file."""
    try:
        return os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    except (AttributeError, OSError):
        import tempfile

        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
        os.set_inheritable(fd, False)
        return fd


def kill_quietly(pid: int, sig: int, group: bool = False) -> bool:
    """Signal a process (``group``: a process group) that may be gone
    already: False if it was."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
        return True
    except ProcessLookupError:
        return False


def killpg_quietly(pgid: int, sig: int) -> bool:
    return kill_quietly(pgid, sig, group=True)


def reset_signals() -> None:
    """In a forked child: every handler back to its default, SIG_IGN too
    (an ignored SIGPIPE survives exec and breaks pipelines in the programs
    we start), no wakeup fd shared with the parent, nothing blocked."""
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        try:
            if signal.getsignal(sig) not in (signal.SIG_DFL, None):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL, SIGSTOP and the real-time ones Python cannot set
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def default_signals(*signals: int) -> None:
    """In a forked child that goes on running Python (no exec): ``signals``
    back to their default action, SIGPIPE ignored as Python starts with it
    (a write to a closed socket is an error to handle, not death)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def place_fds(moves: Sequence[tuple[int, int]]) -> None:
    """Put each source fd at its target number (inheritable), then close every
    fd above the highest target. Sources are first moved above the targets,
    so one move never clobbers another's source."""
    high = [fcntl.fcntl(source, fcntl.F_DUPFD, 64) for source, _ in moves]
    for fd, (_, target) in zip(high, moves, strict=True):
        os.dup2(fd, target)
    top = max((target for _, target in moves), default=2)
    os.closerange(top + 1, os.sysconf("SC_OPEN_MAX"))


def wire_child(null_fd: int, log_fd: int, moves: Sequence[tuple[int, int]]) -> None:
    """A spawned vassal's fds: stdin from /dev/null, stdout and stderr to
    its log pipe, each of ``moves`` at its number, nothing else open."""
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    place_fds(moves)


def exec_child(argv: Sequence[str], env: dict[str, str] | None = None, *, what: str,
               fds: Sequence[tuple[int, int]] | None = None, search_path: bool = False,
               report: Callable[[str], None] | None = None) -> NoReturn:
    """In a forked child: reset signals, place ``fds`` (closing the rest),
    exec. Never returns: a failure is told under ``what`` (to ``report``,
    else straight to stderr) and the child exits 127, as a shell does for a
    command it cannot run."""
    try:
        reset_signals()
        if fds is not None:
            place_fds(fds)
        environ = dict(os.environ) if env is None else env
        if search_path:
            os.execvpe(argv[0], list(argv), environ)
        os.execve(argv[0], list(argv), environ)
    except BaseException as exc:
        die_in_child(what, exc, report)
    os._exit(127)


def die_in_child(what: str, exc: BaseException, report: Callable[[str], None] | None = None) -> NoReturn:
    """A forked child that could not get to its exec: say why, exit 127."""
    try:
        if report is not None:
            report(f"{what}: {exc}")
        else:
            os.write(2, f"{what}: {exc}\n".encode())
    except Exception:
        pass
    os._exit(127)


def run_and_exit(body: Callable[[], object], crashed: Callable[[str], None]) -> NoReturn:
    """A forked child's whole life: ``body``, then _exit with the int it
    returns (else 0) or its SystemExit's int code (any other code counts as
    1, as it always has for app masters and workers); anything else it
    raises is told to ``crashed`` with the traceback and exits 1. Nothing
    unwinds into the code the parent was running when it forked."""
    code = 0
    try:
        result = body()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        crashed(traceback.format_exc().rstrip())
        code = 1
    finally:
        os._exit(code)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status) & 0xFF


def proxy_pid1() -> None:
    """After unshare(CLONE_NEWPID) only our next child is in the namespace,
    as its PID 1. The child returns from here and carries on; this process
    stays behind holding nothing but the child, forwards signals to it and
    exits with its status, so whoever tracks our pid (the emperor, a uWSGI
    emperor) still sees one process."""
    child = os.fork()
    if child == 0:
        return
    # Forwarding first: a SIGTERM from here on must reach the child.
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: kill_quietly(child, s))
    signal.set_wakeup_fd(-1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 1 << 8
            break
    os._exit(exit_code(status))


def alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (not a zombie); one we may not
    signal counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except Exception:
        return True


def rss(pid: int) -> int:
    """A process's resident set in bytes, 0 if it is gone (psutil: the same
    call on Linux and FreeBSD, which has no /proc by default)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return 0
