"""Locks between a vassal's workers (``lock-engine``), robust against a
worker killed while it holds one: the kernel lets go of it with the
process.

- ``fcntl`` (the default): a POSIX record lock on an anonymous file the app
  master makes before the workers fork. Record locks belong to processes,
  not file descriptions, so every worker locks through the one inherited fd
  and each one's lock dies with it.
- ``ipcsem``: a SysV semaphore (semget with IPC_PRIVATE, or a key from
  ``ftok = FILE``), taken and given with SEM_UNDO, so the kernel gives back
  what a dead holder took. Removed when the last app master using it exits
  (a count in the set, SEM_UNDO'd too), unless ``persistent-ipcsem``.

Python has no SysV IPC: semget/semop/semctl/ftok go through libc (ctypes),
which is why this is in jails/.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import sys

from bedrock.proc import anonymous_file

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
        self.fd = anonymous_file("pyemperor-thunder-lock")
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
    """A set of three: [0] the lock; [1] how many app masters use it (each
    adds one with SEM_UNDO, so a SIGKILLed one is taken off by the kernel:
    the last one out removes the set); [2] a signature of the vassal's
    sockets, so that a second vassal given the same ``ftok`` file is refused
    instead of taking turns with the first on sockets it does not watch."""

    engine = "ipcsem"
    LOCK, USERS, SIGNATURE = 0, 1, 2

    def __init__(self, signature: int, ftok_path: str | None = None, persistent: bool = False, key: int | None = None):
        self.persistent = persistent
        self.ftok_path = ftok_path
        if key is None:
            key = _check(_libc.ftok(os.fsencode(ftok_path), ord("T")), f"ftok {ftok_path}") if ftok_path else IPC_PRIVATE
        self.key = key
        signature = 1 + signature % 32000
        try:
            self.id = _check(_libc.semget(key, 3, IPC_CREAT | IPC_EXCL | 0o600), "semget")
            _check(_libc.semctl(self.id, self.LOCK, SETVAL, ctypes.c_int(1)), "semctl SETVAL")
            _check(_libc.semctl(self.id, self.SIGNATURE, SETVAL, ctypes.c_int(signature)), "semctl SETVAL")
        except LockError as exc:
            if exc.errno != errno.EEXIST:
                raise
            # ftok'd: one an earlier generation of this vassal made (a reload,
            # persistent-ipcsem). Anyone's else is refused, not used.
            self.id = _check(_libc.semget(key, 3, 0o600), f"semget (ftok {ftok_path})")
            _refuse_foreign(self.id, ftok_path)
            theirs = _check(_libc.semctl(self.id, self.SIGNATURE, GETVAL), "semctl GETVAL")
            if theirs != signature:
                raise LockError(errno.EBUSY, f"ftok {ftok_path}: its semaphore is used by a vassal with other sockets") from None
        if self._op(self.USERS, 1, 0) != 0:
            code = ctypes.get_errno()
            raise LockError(code, f"thunder lock semaphore {self.id}: {os.strerror(code)}")

    def _op(self, number: int, delta: int, flags: int) -> int:
        buf = _Sembuf(number, delta, SEM_UNDO | flags)
        return _libc.semop(self.id, ctypes.byref(buf), 1)

    def acquire(self, blocking: bool) -> bool:
        if self._op(self.LOCK, -1, 0 if blocking else IPC_NOWAIT) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EAGAIN, errno.EINTR):
            return False  # taken; or a signal: the caller looks at why and tries again
        raise LockError(code, f"thunder lock semaphore {self.id}: {os.strerror(code)}")

    def release(self) -> None:
        if self._op(self.LOCK, 1, 0) != 0:
            code = ctypes.get_errno()
            raise LockError(code, f"thunder lock semaphore {self.id}: {os.strerror(code)}")

    def exists(self) -> bool:
        return _libc.semctl(self.id, 0, GETVAL) != -1

    def renewed(self, signature: int) -> SysvSemaphore:
        """A new set in place of one removed under us (the same key)."""
        return SysvSemaphore(signature, self.ftok_path, self.persistent, key=self.key)

    def describe(self) -> dict:
        return {"engine": self.engine, "id": self.id, "key": self.key, "persistent": self.persistent,
                "ftok": self.ftok_path}

    def close(self, owner: bool) -> None:
        """The app master at its exit: one user less; the last one out
        removes the set, unless it is persistent."""
        if not owner:
            return
        if self._op(self.USERS, -1, IPC_NOWAIT) != 0:
            return  # gone already
        last = SemLast(self.id, self.USERS)
        if not self.persistent and last.is_zero():
            _libc.semctl(self.id, 0, IPC_RMID)


class SemLast:
    """Wait-for-zero without waiting: is nobody else using the set?"""

    def __init__(self, semid: int, number: int):
        self.semid, self.number = semid, number

    def is_zero(self) -> bool:
        buf = _Sembuf(self.number, 0, IPC_NOWAIT)
        return _libc.semop(self.semid, ctypes.byref(buf), 1) == 0


def _refuse_foreign(semid: int, ftok_path: str | None) -> None:
    """A set this user did not make with mode 0600 is someone else's: using
    it would let them stop our workers (a value of 0) or watch us."""
    try:
        with open("/proc/sysvipc/sem") as handle:
            rows = [line.split() for line in handle.readlines()[1:]]
    except OSError:
        return  # (FreeBSD: no such table; the kernel's permission check stands)
    for row in rows:
        if len(row) >= 8 and row[1] == str(semid):
            perms, nsems, uid, cuid = int(row[2], 8), int(row[3]), int(row[4]), int(row[6])
            if uid != os.geteuid() or cuid != os.geteuid() or perms & 0o777 != 0o600 or nsems != 3:
                raise LockError(errno.EPERM, f"ftok {ftok_path}: semaphore {semid} with that key is not ours "
                                f"(owner uid {uid}, creator uid {cuid}, mode {perms & 0o777:o}, {nsems} semaphores): refusing it")
            return


def make(engine: str, signature: int = 0, ftok_path: str | None = None, persistent: bool = False) -> FcntlLock | SysvSemaphore:
    """``signature``: of the vassal's sockets (ipcsem sets are refused to a
    vassal with other sockets)."""
    if engine == "ipcsem":
        return SysvSemaphore(signature, ftok_path, persistent)
    return FcntlLock()
