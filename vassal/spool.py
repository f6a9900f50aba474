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
import time
from collections.abc import Callable
from typing import BinaryIO

from bedrock.log import log

SPOOL_THRESHOLD = 1 << 20  # bytes kept in memory before spooling to a file
SPOOL_MEMORY = 64 << 20  # of a worker's body-spool-limit, what may be held in memory
STREAM_THRESHOLD = SPOOL_THRESHOLD  # a Content-Length past this is streamed to the app
STREAM_START = 256 << 10  # of a streamed body, what the loop reads before the app is called
DEFAULT_BODY_TIMEOUT = 4.0  # seconds a streamed body may stall (socket-timeout)
READ_PIECE = 1 << 20  # the most one recv asks for (a larger read loops)
# A streamed body holds a worker while it comes in: past the first
# socket-timeout it must keep up this average rate, or it is cut (a client
# trickling a byte per timeout would otherwise hold the worker for ever;
# mod_reqtimeout's MinRate). 16 KiB/s is a slow mobile uplink.
MIN_BODY_RATE = 16 << 10
CREDIT_CAP = 2  # the most wait banked by sending fast, in socket-timeouts


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


class SpoolBudget:
    """What one worker holds of request bodies before its app runs, over
    all its connections (body-spool-limit): chunked ones of any size (their
    size comes only at their end), others up to STREAM_THRESHOLD, a streamed
    one's first bytes. Unbounded, one client's endless chunked body, or many
    clients' slow ones, filled the disk of the spool or the worker's memory.
    Of it, at most ``memory`` is held in memory: past that a body goes to
    its spool file from its first byte."""

    __slots__ = ("limit", "used", "memory", "in_memory")

    def __init__(self, limit: int, memory: int = SPOOL_MEMORY):
        self.limit = limit
        self.used = 0
        self.memory = memory
        self.in_memory = 0


def room_needed(length: int) -> int:
    """What of its worker's SpoolBudget a body of ``length`` announced
    bytes takes at most before its app runs (a streamed one: its start)."""
    return min(length, STREAM_START) if length > STREAM_THRESHOLD else length


def refusal(budget: SpoolBudget, needed: int) -> tuple[int, str]:
    """The answer to a body that finds no room: 413 if it takes ``needed``
    bytes, more than the whole limit, alone; else 503 (others' bodies hold
    it: a moment later there may be room)."""
    if needed > budget.limit:
        return 413, f"the request body passes this worker's body-spool-limit ({budget.limit} bytes)"
    return 503, f"the bodies coming in hold all of this worker's body-spool-limit ({budget.limit} bytes)"


class Reservation:
    """A body's share of its worker's SpoolBudget, taken as bytes arrive,
    given back when the body is closed (or dropped unclosed)."""

    _budget: SpoolBudget | None = None
    _reserved = 0

    def reserve(self, count: int, budget: SpoolBudget) -> bool:
        """Take ``count`` more bytes of ``budget``; False if it has no room."""
        if budget.used + count > budget.limit:
            return False
        budget.used += count
        self._budget = budget
        self._reserved += count
        return True

    def _give_back(self) -> None:
        budget = self._budget
        if budget is not None:
            budget.used -= self._reserved
            self._budget, self._reserved = None, 0

    def __del__(self) -> None:
        self._give_back()


class BodySpool(Reservation):
    """A write-then-read buffer that moves to a file past ``threshold``,
    or at once when its worker's bodies hold all the memory they may."""

    def __init__(self, threshold: int = SPOOL_THRESHOLD):
        self.threshold = threshold
        self.file: BinaryIO = io.BytesIO()
        self.size = 0
        self.spooled = False
        self._in_memory = 0  # what of the budget's memory this holds

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.spooled:
            budget = self._budget
            if self.size > self.threshold or (budget is not None and budget.in_memory + len(data) > budget.memory):
                spool = open_tmpfile()  # (OSError: the parser answers it)
                spool.write(self.file.getvalue())  # type: ignore[attr-defined]
                self.file = spool
                self.spooled = True
                self._release_memory()
            elif budget is not None:
                budget.in_memory += len(data)
                self._in_memory += len(data)
        self.file.write(data)

    def _release_memory(self) -> None:
        if self._in_memory and self._budget is not None:
            self._budget.in_memory -= self._in_memory
        self._in_memory = 0

    def _give_back(self) -> None:
        self._release_memory()
        super()._give_back()

    def finish(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self._give_back()
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


class BodyPace:
    """How long a request body's client may still be waited for: no stall
    past ``timeout``, and over the time spent waiting an average of
    MIN_BODY_RATE (mod_reqtimeout's MinRate: a byte per timeout would hold
    a worker for ever). Only waiting counts (an app that reads slowly is not
    the client's fault); sending fast banks at most CREDIT_CAP timeouts."""

    __slots__ = ("timeout", "credit")

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.credit = timeout  # seconds the client may still be waited for

    def next_wait(self) -> tuple[float, bool]:
        """The next wait's bound, and whether the rate (not the stall) sets
        it; a bound of 0 or less: the client is already too slow."""
        return (self.credit, True) if self.credit < self.timeout else (self.timeout, False)

    def waited(self, seconds: float) -> None:
        self.credit -= seconds

    def received(self, count: int) -> None:
        self.credit = min(self.credit + count / MIN_BODY_RATE, CREDIT_CAP * self.timeout)

    def why(self, slow: bool) -> str:
        """What a cut says: the rate (``slow``, as next_wait tells) or the stall."""
        return f"the client sent under {MIN_BODY_RATE >> 10} KiB/s" if slow else f"the client sent nothing for {self.timeout:g}s"


class StreamedBody(Reservation):
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
        self._pace = BodyPace(DEFAULT_BODY_TIMEOUT)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def complete(self) -> bool:
        """Every byte of the body was received (read by the app or not)."""
        return self.wire == 0

    def reserve(self, count: int, budget: SpoolBudget) -> bool:
        # Only its first STREAM_START bytes are the loop's to hold: the
        # read that brings them may bring more, which is not charged (else
        # a limit just above STREAM_START refused uploads by how reads fell).
        return super().reserve(min(count, max(0, STREAM_START - self._reserved)), budget)

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
        self._pace = BodyPace(timeout)

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
        # (a gevent socket would wait in recv itself, to its own timeout:
        # it is made non-blocking for the recv, then put back for the answer)
        own_timeout = sock.gettimeout() if hasattr(sock, "gettimeout") else None
        while True:
            try:
                if own_timeout:
                    sock.settimeout(0.0)
                count = sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self._before_wait is not None:
                    if own_timeout:
                        sock.settimeout(own_timeout)  # (the 100 Continue is sent blocking)
                    before, self._before_wait = self._before_wait, None
                    before()
                wait, slow = self._allowed_wait()
                started = time.monotonic()
                try:
                    wait_readable(sock.fileno(), wait)
                except TimeoutError:
                    self._fail_slow(slow)
                    raise
                finally:
                    self._pace.waited(time.monotonic() - started)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                self._fail(f"the connection failed ({exc.strerror or exc})")
                raise
            finally:
                if own_timeout:
                    sock.settimeout(own_timeout)
            if count == 0:
                self._fail("the client closed")
                raise ClientDisconnected(errno.ECONNRESET, "the client closed before the end of the body")
            self.wire -= count
            self._pace.received(count)
            if self._received is not None:
                self._received(count)
            return count

    def _allowed_wait(self) -> tuple[float, bool]:
        """How long the next wait for the client may be, and whether the
        rate (not the stall timeout) is what bounds it (BodyPace)."""
        wait, slow = self._pace.next_wait()
        if wait <= 0:
            self._fail_slow(True)
            raise TimeoutError(errno.ETIMEDOUT, "the request body came too slowly")
        return wait, slow

    def _fail_slow(self, slow: bool) -> None:
        if not self.failed:
            self._fail(self._pace.why(slow))

    def _fail(self, why: str) -> None:
        self.failed = True
        log(f"request body cut short: {why} after {self.size - self.wire} of {self.size} bytes")

    def read(self, size: int | None = -1) -> bytes:
        available = self.buffered + self.wire
        if size is None or size < 0 or size > available:
            size = available
        if size <= self.buffered:
            return self._take(size)
        # (grown as bytes come, not sized by what the client announced)
        out = bytearray(self._take(self.buffered))
        scratch = memoryview(bytearray(min(READ_PIECE, size - len(out))))
        while len(out) < size:
            got = self._recv_into(scratch[:min(len(scratch), size - len(out))])
            out += scratch[:got]
        return bytes(out)

    def readline(self, size: int | None = -1) -> bytes:
        limit = self.buffered + self.wire if size is None or size < 0 else size
        scanned = self._pos  # (a long line is searched once, not again per piece)
        while True:
            end = self._buf.find(b"\n", scanned, self._pos + limit)
            if end >= 0:
                return self._take(end + 1 - self._pos)
            if self.buffered >= limit or self.wire == 0:
                return self._take(limit)
            if self._pos:  # (what was returned is dropped: only the partial line stays)
                del self._buf[:self._pos]
                self._pos = 0
            scanned = len(self._buf)
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

    def discard(self, seconds: float) -> None:
        """Read and drop what the app left, for up to ``seconds`` (the
        answer went out: closing with bytes unread would reset it away)."""
        if self.failed or self.sock is None:
            return
        self._buf, self._pos = bytearray(), 0
        until = time.monotonic() + seconds
        scratch = memoryview(bytearray(min(READ_PIECE, self.wire)))
        try:
            while self.wire and (left := until - time.monotonic()) > 0:
                self.timeout = self._pace.timeout = left  # (no wait runs past ``seconds``)
                self._pace.credit = min(self._pace.credit, left)
                self._recv_into(scratch[:min(len(scratch), self.wire)])
        except OSError:
            pass  # (logged as cut short: the close is all that is left)

    def close(self) -> None:
        self._give_back()
        self._buf, self._pos = bytearray(), 0
