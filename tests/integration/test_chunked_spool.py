"""A chunked body is sized only at its end, so the worker spools it (the
app gets a CONTENT_LENGTH): what one worker holds of such bodies at once,
over all its connections, is bounded by body-spool-limit (413 past it),
and given back when a body is answered or its connection dies. Before,
with limit-post unset, one client's endless chunked body filled the disk
the spool is on."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import tempfile

import psutil
import pytest

from tests.helpers import TIME_SCALE, app_vassal, http_get, wait_for

APP = '''
import hashlib

def application(env, start_response):
    data = env["wsgi.input"].read()
    out = f"{env.get('CONTENT_LENGTH')} {hashlib.sha256(data).hexdigest()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
'''

LIMIT = 8 << 20
PIECE = 64 << 10


@pytest.fixture(params=["sync", "gevent"])
def vassal(request, tmp_path):
    with app_vassal(tmp_path, "spool", APP, f"body-spool-limit = {LIMIT}\n", request.param) as running:
        yield running


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _head() -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def _flood_until_answered(sock: socket.socket, limit_bytes: int) -> tuple[bytes, int]:
    """Chunks as fast as the vassal takes them, until it answers (or
    ``limit_bytes`` went out: then it never did)."""
    sock.setblocking(False)
    out = memoryview(_chunk(b"z" * PIECE) * 16)
    sent = 0
    answer = b""
    pending = out
    while sent < limit_bytes:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                pass
            break
        if not writable:
            break
        try:
            count = sock.send(pending)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += count
        pending = pending[count:] or out
    sock.setblocking(True)
    return answer, sent


def _spool_files(proc) -> list[int]:
    """The sizes of the anonymous spool files the vassal's processes hold open."""
    tmp = os.path.realpath(tempfile.gettempdir())
    found = []
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            for entry in os.listdir(f"/proc/{process.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{process.pid}/fd/{entry}")
                except OSError:
                    continue
                if target.startswith(tmp + "/") and target.endswith("(deleted)"):
                    try:
                        found.append(os.stat(f"/proc/{process.pid}/fd/{entry}").st_size)
                    except OSError:
                        continue
        except (FileNotFoundError, psutil.NoSuchProcess):
            continue
    return found


def test_an_endless_chunked_body_gets_413_and_its_spool_is_freed(vassal):
    proc, port, log = vassal
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_head())
        answer, sent = _flood_until_answered(sock, 64 * LIMIT)
        assert answer.startswith(b"HTTP/1.1 413 "), (sent, answer[:200])
        assert LIMIT <= sent < 8 * LIMIT  # (what the socket buffers held besides)
    wait_for(lambda: "body-spool-limit" in log.read_text(errors="replace"), 10, what="the refusal logged")
    wait_for(lambda: not _spool_files(proc), 10, what="the spool file closed")
    assert http_get(port, "/") is not None  # (the vassal serves on)


def test_the_limit_is_shared_by_a_workers_connections_and_given_back(vassal):
    proc, port, log = vassal
    held = b"a" * (5 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as first:
        first.sendall(_head() + b"".join(_chunk(held[i:i + PIECE]) for i in range(0, len(held), PIECE)))
        # (5 MiB of the first body spooled, its end not sent yet: 5 more MiB do not fit in 8)
        # (what a spool file holds lags by what its writer buffers)
        wait_for(lambda: max(_spool_files(proc), default=0) >= len(held) - (64 << 10), 10, what="the first body spooled")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            second.sendall(_head())
            answer, _ = _flood_until_answered(second, 8 * LIMIT)
            # (503, not 413: the first body holds the room, a moment later there may be some)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        first.sendall(b"0\r\n\r\n")
        first.settimeout(10)
        reply = first.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert reply.endswith(f"{len(held)} {hashlib.sha256(held).hexdigest()}".encode())
    # Given back: a body as big as the first is taken again.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
        third.sendall(_head() + b"".join(_chunk(held[i:i + PIECE]) for i in range(0, len(held), PIECE))
                      + b"0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        third.settimeout(10)
        reply = b""
        while chunk := third.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 200 ") == 2


def test_a_connection_that_dies_mid_body_gives_its_room_back_at_once(vassal):
    """Not when a garbage collection finds its parser (the connection and
    its parser were a cycle): a quiet worker might never run one, and every
    later body was refused."""
    proc, port, log = vassal
    held = b"a" * (3 << 20)
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(_head() + b"".join(_chunk(held[i:i + PIECE]) for i in range(0, len(held), PIECE)))
            wait_for(lambda: _spool_files(proc), 10, what="the body spooled")
    wait_for(lambda: not _spool_files(proc), 10, what="the dead connections' spool files closed")
    body = b"b" * (7 << 20)  # (fits only if both 3 MiB were given back)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_head() + b"".join(_chunk(body[i:i + PIECE]) for i in range(0, len(body), PIECE))
                     + b"0\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert reply.endswith(f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())


def test_bodies_parsed_behind_a_close_are_given_back(vassal):
    """A whole chunked request behind one that says close is parsed (and
    charged) with it, and never answered: the close gives it back."""
    proc, port, log = vassal
    behind = _head() + _chunk(b"c" * (60 << 10)) + b"0\r\n\r\n"  # (with the GET, one read of the worker)
    for _ in range(150):  # (9 MiB of bodies nobody answers: past the limit, if they stayed charged)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + behind)
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # (the close, with the unanswered request unread by nobody: the kernel's reset)
    body = b"d" * (7 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_head() + b"".join(_chunk(body[i:i + PIECE]) for i in range(0, len(body), PIECE))
                     + b"0\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_refused_clients_still_sending_hold_no_gevent_core(tmp_path):
    """After a 413 the worker reads and drops what the client still sends
    (else the kernel's reset takes the answer away): two such clients held
    both cores of gevent = 2, and a GET waited out their linger."""
    import time

    with app_vassal(tmp_path, "linger", APP, "gevent = 2\nlimit-post = 1K\n", "gevent") as (_, port, log):
        refused = []
        try:
            for _ in range(2):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                refused.append(sock)
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 4096)
                assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
                sock.sendall(b"x" * 4096)  # (and on: it is lingered over)
            started = time.monotonic()
            assert http_get(port, "/") is not None
            assert time.monotonic() - started < 2 * TIME_SCALE
        finally:
            for sock in refused:
                sock.close()


def test_many_clients_bodies_hold_at_most_the_memory_bound(tmp_path):
    """150 clients each send all but the last byte of a 1 MiB body (under
    spool.STREAM_THRESHOLD: the worker's loop reads it before the app runs):
    past 64 MiB in memory (spool.SPOOL_MEMORY) the bodies go to their spool
    files (the worker grew by 150 MiB before). Then they complete and are
    answered."""
    from vassal.spool import SPOOL_MEMORY

    count, size = 150, 1 << 20
    with app_vassal(tmp_path, "many", APP, "socket-timeout = 120\n") as (proc, port, log):
        processes = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        before = sum(p.memory_info().rss for p in processes)
        socks = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                socks.append(sock)
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"m" * (size - 1))
            wait_for(lambda: len(_spool_files(proc)) >= count - SPOOL_MEMORY // size, 30, what="bodies in their files")
            grown = sum(p.memory_info().rss for p in processes) - before
            assert grown < SPOOL_MEMORY + (40 << 20), grown >> 20
            expected = f"{size} {hashlib.sha256(b'm' * size).hexdigest()}".encode()
            for sock in socks:
                sock.sendall(b"m")
                reply = b""
                while not reply.endswith(expected):
                    piece = sock.recv(65536)
                    assert piece, reply[:200]
                    reply += piece
        finally:
            for sock in socks:
                sock.close()
