"""One emperor per control socket: an flock'd lock file beside the socket
decides, and a live socket at the path is refused even without the lock
(an emperor of an older version, or one whose lock file was removed by
hand); a socket nobody answers on is stale and goes."""

from __future__ import annotations

import errno
import fcntl
import os
import socket


class AlreadyRunning(Exception):
    pass


def try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on ``path`` (made 0600), or None if
    another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def unlock(fd: int, path: str) -> None:
    """Remove a lock file we hold, then let go of it (in that order: nobody
    else can take a lock on a name that is about to disappear)."""
    try:
        os.unlink(path)
    except OSError:
        pass
    os.close(fd)


class SingleInstance:
    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.lock_path = socket_path + ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Ours, or AlreadyRunning naming the other emperor's path."""
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        self.fd = try_lock(self.lock_path)
        if self.fd is None:
            raise AlreadyRunning(f"another emperor holds {self.socket_path}")
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                raise AlreadyRunning(f"another emperor answers on {self.socket_path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.socket_path)  # stale, from an emperor that died
            finally:
                probe.close()

    def release(self) -> None:
        if self.fd is not None:
            unlock(self.fd, self.lock_path)
            self.fd = None
