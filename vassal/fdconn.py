"""Connections as bare non-blocking file descriptors, for the uwsgi protocol.

nginx opens one upstream connection per request, so per-connection cost is
per-request cost. A Python socket object costs a getsockname(2) (CPython
validates every fd it wraps) and enum conversions; Python's accept cannot
ask for a non-blocking socket, so a read would need a flag per call. Here
accept4(2) returns a non-blocking fd and the connection is read, answered
and closed with plain os calls: accept4, read, write, close per request.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket

SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)
# How long a reader that does not read may hold a send (as SO_SNDTIMEO does
# for the blocking sockets of http-socket).
SEND_TIMEOUT_MS = 60_000


def _load_accept4():
    try:
        # The process's own symbols (libc is linked in): no find_library,
        # which runs ldconfig in a subprocess and leaves garbage behind in
        # the zygote that every vassal would then copy.
        libc = ctypes.CDLL(None, use_errno=True)
        accept4 = libc.accept4
    except (OSError, AttributeError):
        return None
    accept4.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    accept4.restype = ctypes.c_int
    return accept4


_accept4 = _load_accept4() if SOCK_NONBLOCK else None
available = _accept4 is not None

try:
    from vassal._speedups import accept_read as _accept_read_c  # the C speedup, when built
except ImportError:
    _accept_read_c = None


def accept_read(listener_fd: int, size: int = 65536) -> tuple[int, bytes | None] | None:
    """A connection and its first bytes (None if none are there yet), or None
    if no connection waits; one C call where the speedup is built."""
    if _accept_read_c is not None:
        return _accept_read_c(listener_fd, size)
    fd = accept(listener_fd)
    if fd is None:
        return None
    try:
        return fd, os.read(fd, size)
    except BlockingIOError:
        return fd, None
    except OSError:
        os.close(fd)
        raise


def accept(listener_fd: int) -> int | None:
    """A non-blocking, close-on-exec connection fd, or None if none waits."""
    assert _accept4 is not None
    fd = _accept4(listener_fd, None, None, SOCK_NONBLOCK | SOCK_CLOEXEC)
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
        return None
    raise OSError(code, os.strerror(code))


class FdConnection:
    """What the protocol handlers use of a socket: recv, sendall, fileno, close."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int, flags: int = 0) -> bytes:
        return os.read(self.fd, size)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        return os.readv(self.fd, [buffer[:nbytes] if nbytes else buffer])

    def sendall(self, data: bytes) -> None:
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return  # (nearly always: a small answer fits the socket buffer)
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = os.write(self.fd, view)
            except BlockingIOError:
                wait_writable(self.fd)
                continue
            view = view[sent:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def wait_writable(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(SEND_TIMEOUT_MS):
        raise TimeoutError(errno.ETIMEDOUT, "the client does not read its response")
