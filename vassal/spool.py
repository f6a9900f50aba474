"""Request bodies, as the app's ``wsgi.input``.

A body up to STREAM_THRESHOLD is read whole by the worker's loop before
the app runs (the app then never waits on a client). A bigger one with a
Content-Length is a :class:`StreamedBody`: the loop reads its first
STREAM_START bytes (a client must send that much before it holds a
worker), then the app is called and reads the rest from the connection as
it goes, so an upload of any size needs no more memory or disk than what
the app itself keeps. A chunked body, whose size is known only at its end
(and the app gets a CONTENT_LENGTH), is spooled: in memory while small,
then to an anonymous file.

The file is opened with O_TMPFILE where the filesystem supports it: it has
no name, so nothing is left behind when a worker is killed mid-request.
Elsewhere (tmpfs without O_TMPFILE, other kernels) ``tempfile`` is used.
"""

from __future__ import annotations

import errno
import io
import os
import select
import socket
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from bedrock.log import log

SPOOL_THRESHOLD = 1 << 20  # bytes kept in memory before spooling to a file
STREAM_THRESHOLD = SPOOL_THRESHOLD  # a Content-Length past this is streamed to the app
STREAM_START = 256 << 10  # of a streamed body, what the loop reads before the app is called
DEFAULT_BODY_TIMEOUT = 4.0  # seconds a streamed body may stall (socket-timeout)
READ_PIECE = 1 << 20  # the most one recv asks for (a larger read loops)


def open_tmpfile(directory: str | None = None) -> BinaryIO:
    directory = directory or tempfile.gettempdir()
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return os.fdopen(fd, "w+b")
        except OSError:
            pass  # EOPNOTSUPP / EISDIR on filesystems without O_TMPFILE
    return tempfile.TemporaryFile(dir=directory)


class BodySpool:
    """A write-then-read buffer that moves to a file past ``threshold``."""

    def __init__(self, threshold: int = SPOOL_THRESHOLD):
        self.threshold = threshold
        self.file: BinaryIO = io.BytesIO()
        self.size = 0
        self.spooled = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.spooled and self.size > self.threshold:
            spool = open_tmpfile()
            spool.write(self.file.getvalue())  # type: ignore[attr-defined]
            self.file = spool
            self.spooled = True
        self.file.write(data)

    def finish(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()


class ClientDisconnected(ConnectionResetError):
    """The client closed before it sent the body it announced."""


def wait_readable(fd: int, timeout: float) -> None:
    """Until ``fd`` is readable, or TimeoutError (the gevent worker puts
    its own cooperative wait here)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise TimeoutError(errno.ETIMEDOUT, f"no body bytes for {timeout:g}s")


class StreamedBody:
    r"""A body read as the app asks for it: first what the worker's loop
    received (``write``), then, once ``attach``\ ed to the connection, the
    rest straight from the socket, never past the body's end (what follows
    is the next request's, and stays for the parser)."""

    def __init__(self, length: int):
        self.size = length
        self._buf = bytearray()
        self._pos = 0  # what of _buf the app has read
        self.wire = length  # bytes not received yet
        self.sock = None
        self.timeout = DEFAULT_BODY_TIMEOUT
        self._received: Callable[[int], None] | None = None
        self._before_wait: Callable[[], object] | None = None
        self.failed = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def complete(self) -> bool:
        """Every byte of the body was received (read by the app or not)."""
        return self.wire == 0

    def write(self, data: bytes) -> None:
        """Bytes the loop received (before the app runs)."""
        self._buf += data
        self.wire -= len(data)

    def attach(self, sock, timeout: float, received: Callable[[int], None] | None = None,
               before_wait: Callable[[], object] | None = None) -> None:
        """Read the rest from ``sock``; ``received(n)`` says how much came
        (the parser's count), ``before_wait`` runs once before the first
        wait for the client (a 100 Continue that is due)."""
        self.sock, self.timeout, self._received, self._before_wait = sock, timeout, received, before_wait

    def finish(self) -> StreamedBody:
        return self

    # --- the app's side: wsgi.input -------------------------------------------
    def _take(self, size: int) -> bytes:
        pos = self._pos
        data = bytes(memoryview(self._buf)[pos:pos + size])
        self._pos = pos + len(data)
        if self._pos >= len(self._buf):
            self._buf, self._pos = bytearray(), 0
        return data

    def _recv_into(self, view: memoryview) -> int:
        """At least one byte from the wire into ``view`` (at most its size)."""
        if self.failed:
            raise ClientDisconnected(errno.ECONNRESET, "the request body was cut short")
        sock = self.sock
        if sock is None:
            raise ClientDisconnected(errno.ECONNRESET, "the request body is not there")
        while True:
            try:
                count = sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self._before_wait is not None:
                    before, self._before_wait = self._before_wait, None
                    before()
                try:
                    wait_readable(sock.fileno(), self.timeout)
                except TimeoutError:
                    self._fail(f"the client sent nothing for {self.timeout:g}s")
                    raise
                continue
            except InterruptedError:
                continue
            except TimeoutError:
                # (a gevent socket waits in recv itself, to its own timeout)
                self._fail(f"the client sent nothing for {self.timeout:g}s")
                raise
            except OSError as exc:
                self._fail(f"the connection failed ({exc.strerror or exc})")
                raise
            if count == 0:
                self._fail("the client closed")
                raise ClientDisconnected(errno.ECONNRESET, "the client closed before the end of the body")
            self.wire -= count
            if self._received is not None:
                self._received(count)
            return count

    def _fail(self, why: str) -> None:
        self.failed = True
        log(f"request body cut short: {why} after {self.size - self.wire} of {self.size} bytes")

    def read(self, size: int | None = -1) -> bytes:
        available = self.buffered + self.wire
        if size is None or size < 0 or size > available:
            size = available
        if size <= self.buffered:
            return self._take(size)
        out = bytearray(size)
        have = self.buffered
        out[:have] = self._take(have)
        view = memoryview(out)
        while have < size:
            have += self._recv_into(view[have:min(size, have + READ_PIECE)])
        return bytes(out)

    def readline(self, size: int | None = -1) -> bytes:
        limit = self.buffered + self.wire if size is None or size < 0 else size
        while True:
            end = self._buf.find(b"\n", self._pos, self._pos + limit)
            if end >= 0:
                return self._take(end + 1 - self._pos)
            if self.buffered >= limit or self.wire == 0:
                return self._take(limit)
            piece = bytearray(min(self.wire, 65536))
            got = self._recv_into(memoryview(piece))
            self._buf += piece[:got]

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._buf, self._pos = bytearray(), 0
