"""``emperor-pidfile``: our pid in a file we hold an flock on for as long
as we run (a second emperor on the same pidfile is refused, and a stale
file from a dead one is simply taken over); removed at exit."""

from __future__ import annotations

import os

from emperor.singleton import AlreadyRunning, try_lock, unlock


class Pidfile:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.fd: int | None = None

    def write(self) -> None:
        fd = try_lock(self.path)
        if fd is None:
            raise AlreadyRunning(f"another emperor holds the pidfile {self.path}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def remove(self) -> None:
        if self.fd is not None:
            unlock(self.fd, self.path)
            self.fd = None
