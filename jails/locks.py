"""Locks between a vassal's workers (``lock-engine``), robust against a
worker killed while it holds one: the kernel lets go of it with the
process.

- ``fcntl`` (the default): a POSIX record lock on an anonymous file the app
  master makes before the workers fork. Record locks belong to processes,
  not file descriptions, so every worker locks through the one inherited fd
  and each one's lock dies with it.
- ``ipcsem``: a SysV semaphore (semget with IPC_PRIVATE, or a key from
  ``ftok = FILE``), taken and given with SEM_UNDO, so the kernel gives back
  what a dead holder took. Removed by its maker at exit unless
  ``persistent-ipcsem`` is set, or another live process (one of a zerg,
  uWSGI's case) operated it last.

Python has no SysV IPC: semget/semop/semctl/ftok go through libc (ctypes),
which is why this is in jails/.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys

ENGINES = ("fcntl", "ipcsem")

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_NOWAIT = 0o4000
IPC_RMID = 0
SEM_UNDO = 0x1000
# semctl commands differ between the two platforms we run on.
if sys.platform.startswith("freebsd"):
    GETPID, GETVAL, SETVAL = 4, 5, 8
else:
    GETPID, GETVAL, SETVAL = 11, 12, 16


class LockError(OSError):
    """The lock is gone (a semaphore removed under us) or cannot be made."""


class _Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


_libc = ctypes.CDLL(None, use_errno=True)
for _fn in ("semget", "semop", "semctl", "ftok"):
    getattr(_libc, _fn)
_libc.ftok.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.semop.argtypes = (ctypes.c_int, ctypes.POINTER(_Sembuf), ctypes.c_size_t)
_libc.semctl.restype = ctypes.c_int


def _check(result: int, what: str) -> int:
    if result == -1:
        code = ctypes.get_errno()
        raise LockError(code, f"{what}: {os.strerror(code)}")
    return result


class FcntlLock:
    engine = "fcntl"

    def __init__(self) -> None:
        self.fd = os.memfd_create("pyemperor-thunder-lock", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 1)

    def acquire(self, blocking: bool) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise LockError(exc.errno, f"thunder lock: {exc.strerror}") from None

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def describe(self) -> dict:
        return {"engine": self.engine}

    def close(self, owner: bool) -> None:
        os.close(self.fd)


class SysvSemaphore:
    engine = "ipcsem"

    def __init__(self, ftok_path: str | None = None, persistent: bool = False):
        self.persistent = persistent
        self.ftok_path = ftok_path
        self.maker = os.getpid()
        if ftok_path is not None:
            key = _check(_libc.ftok(os.fsencode(ftok_path), ord("T")), f"ftok {ftok_path}")
        else:
            key = IPC_PRIVATE
        self.key = key
        try:
            self.id = _check(_libc.semget(key, 1, IPC_CREAT | IPC_EXCL | 0o600), "semget")
            _check(_libc.semctl(self.id, 0, SETVAL, ctypes.c_int(1)), "semctl SETVAL")
        except LockError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # ftok'd and persistent: the one a previous instance left.
            self.id = _check(_libc.semget(key, 1, 0o600), "semget")

    def _op(self, delta: int, flags: int) -> int:
        buf = _Sembuf(0, delta, SEM_UNDO | flags)
        return _libc.semop(self.id, ctypes.byref(buf), 1)

    def acquire(self, blocking: bool) -> bool:
        if self._op(-1, 0 if blocking else IPC_NOWAIT) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EAGAIN:
            return False
        if code == errno.EINTR:
            return False  # a signal: the caller looks at why and tries again
        raise LockError(code, f"thunder lock semaphore {self.id}: {os.strerror(code)}")

    def release(self) -> None:
        if self._op(1, 0) != 0:
            code = ctypes.get_errno()
            raise LockError(code, f"thunder lock semaphore {self.id}: {os.strerror(code)}")

    def last_pid(self) -> int:
        """Who operated the semaphore last (semctl GETPID)."""
        return _check(_libc.semctl(self.id, 0, GETPID), "semctl GETPID")

    def exists(self) -> bool:
        return _libc.semctl(self.id, 0, GETVAL) != -1

    def describe(self) -> dict:
        return {"engine": self.engine, "id": self.id, "key": self.key, "persistent": self.persistent}

    def close(self, owner: bool) -> None:
        """``owner``: the maker (the app master) at its exit removes it,
        unless it is persistent or a live process other than ours last
        operated it."""
        if not owner or self.persistent:
            return
        try:
            last = self.last_pid()
        except LockError:
            return  # gone already
        if last not in (0, os.getpid()) and _alive(last) and last != self.maker:
            return
        _libc.semctl(self.id, 0, IPC_RMID)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def make(engine: str, ftok_path: str | None = None, persistent: bool = False) -> FcntlLock | SysvSemaphore:
    if engine == "ipcsem":
        return SysvSemaphore(ftok_path, persistent)
    return FcntlLock()
