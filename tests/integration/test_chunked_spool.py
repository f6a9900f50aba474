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

from tests.helpers import app_vassal, http_get, wait_for

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


def _spool_files(proc) -> list[str]:
    """The anonymous spool files the vassal's processes hold open."""
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
                    found.append(target)
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
        wait_for(lambda: _spool_files(proc), 10, what="the first body spooled")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            second.sendall(_head())
            answer, _ = _flood_until_answered(second, 8 * LIMIT)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
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
