"""Request bodies the worker's own loop reads (a Content-Length up to
spool.STREAM_THRESHOLD, or chunked, of any size) from a client on a slow
uplink: a steady one that takes longer than http-head-timeout is read to
its end in both modes (gevent cut it at http-head-timeout from the head's
first byte, with a 408 naming the head); one that trickles under
spool.MIN_BODY_RATE is still cut in gevent mode, where it would hold one of
the N cores."""

from __future__ import annotations

import hashlib
import socket
import struct
import time

import pytest

from tests.helpers import TIME_SCALE, app_vassal, free_port, standalone_vassal, wait_for

APP = '''
import hashlib

def application(env, start_response):
    data = env["wsgi.input"].read()
    out = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
'''

HEAD_TIMEOUT = 2


@pytest.fixture(params=["sync", "gevent"])
def vassal(request, tmp_path):
    with app_vassal(tmp_path, "slowbody", APP, f"http-head-timeout = {HEAD_TIMEOUT}\nsocket-timeout = 1\n",
                    request.param) as (_, port, log):
        yield request.param, port, log


def _read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _expected(total: int) -> bytes:
    return f"{total} {hashlib.sha256(b'a' * total).hexdigest()}".encode()


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_steady_body_slower_than_the_head_timeout_is_read_whole(vassal, framing):
    _, port, log = vassal
    piece, pieces, pause = 32 << 10, 12, 0.25  # 384 KiB over 3 s: 128 KiB/s, past the 2 s head timeout
    total = piece * pieces
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if framing == "chunked":
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        else:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % total)
        for _ in range(pieces):
            time.sleep(pause)
            sock.sendall((b"%x\r\n%s\r\n" % (piece, b"a" * piece)) if framing == "chunked" else b"a" * piece)
        if framing == "chunked":
            sock.sendall(b"0\r\n\r\n")
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), (answer[:200], log.read_text()[-2000:])
    assert answer.endswith(_expected(total)), answer[-200:]


def test_a_body_trickled_under_the_minimum_rate_is_cut(vassal):
    """Also in the sync worker, whose loop holds no core while a small body
    comes in but holds its memory and its share of body-spool-limit (a
    byte per keep-alive timeout held them for ever)."""
    mode, port, log = vassal
    # 1 KiB each 0.5 s (2 KiB/s, under 16 KiB/s): the first socket-timeout
    # (1 s here, raised to 30 s in gevent mode) is credit, then the rate rules.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        started = time.monotonic()
        cut = False
        while time.monotonic() - started < 60 * TIME_SCALE:
            try:
                sock.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")
            except OSError:
                cut = True
                break
            sock.settimeout(0.5)
            try:
                got = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                cut = True
                break
            assert b"200 OK" not in got
            cut = True
            break
        elapsed = time.monotonic() - started
    assert cut, f"a body trickled at 2 KiB/s held a {mode} worker for 60 s"
    if mode == "gevent":
        assert 25 < elapsed < 45 * TIME_SCALE, elapsed
    else:
        assert 0.9 < elapsed < 10 * TIME_SCALE, elapsed
    wait_for(lambda: "request body cut short: the client sent under 16 KiB/s" in log.read_text(errors="replace"),
             10, what="the cut logged")


@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_a_stalled_body_the_sync_loop_reads_is_cut_at_socket_timeout(vassal, framing):
    mode, port, log = vassal
    if mode != "sync":
        pytest.skip("gevent's stall limit is at least 30 s (covered by the trickle test)")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if framing == "chunked":
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
        else:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        started = time.monotonic()
        answer = _read_answer(sock, 20 * TIME_SCALE)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert 0.9 < elapsed < 5 * TIME_SCALE, elapsed  # (socket-timeout = 1; http-keepalive, 15 s, was the only bound)
    assert "request body cut short: the client sent nothing for 1s" in log.read_text(errors="replace")


def test_a_sync_worker_busy_in_an_app_is_not_a_client_stalling(tmp_path):
    """While the sync worker runs one request's app, another client's body
    waits unread in the kernel: that wait is not the client's stall."""
    slow_app = APP.replace("def application(env, start_response):",
                           "import time\n\ndef application(env, start_response):\n"
                           "    if env['PATH_INFO'] == '/slow':\n        time.sleep(3)")
    with app_vassal(tmp_path, "busy", slow_app, "socket-timeout = 1\n") as (_, port, log):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as upload, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            upload.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
            time.sleep(0.3)
            slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)  # (the worker is in /slow's app, for 3 s)
            upload.sendall(b"cd")
            assert _read_answer(slow).startswith(b"HTTP/1.1 200 ")
            answer = _read_answer(upload)
        assert answer.startswith(b"HTTP/1.1 200 "), (answer[:200], log.read_text(errors="replace")[-1500:])
        assert answer.endswith(f"4 {hashlib.sha256(b'abcd').hexdigest()}".encode())


BIG_APP = '''
BODY = b"x" * (64 << 20)

def application(env, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    if env["PATH_INFO"] == "/pieces":
        return (BODY[at:at + (1 << 20)] for at in range(0, len(BODY), 1 << 20))
    return [BODY]  # (one send of head and body)
'''


@pytest.mark.parametrize("mode", ["sync", "gevent"])
@pytest.mark.parametrize("path", ["/whole", "/pieces"])
def test_an_answer_cut_by_the_client_is_logged_with_what_went(tmp_path, mode, path):
    """A client that resets after the first bytes of a 64 MiB answer: the
    access line keeps the status (as nginx's does) and counts the pieces that
    were sent before the cut (not the one in flight), not the whole body."""
    import re

    if mode == "gevent":
        pytest.importorskip("gevent", reason="gevent is not installed")
    app = tmp_path / "big.py"
    app.write_text(BIG_APP)
    port = free_port()
    ini = tmp_path / "big.ini"
    ini.write_text(f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                   + ("gevent = 4\n" if mode == "gevent" else ""))
    log = tmp_path / "big.log"
    with standalone_vassal(ini, log, lambda: "ready (pid" in log.read_text(errors="replace")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # (close: a reset)
        line = wait_for(lambda: re.search(rf'"GET {path} HTTP/1.1" 200 (\d+) ', log.read_text(errors="replace")), 30,
                        what="the access line")
        assert int(line.group(1)) < 63 << 20  # (what the kernel took before the reset, at most)
