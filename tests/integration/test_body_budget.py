"""body-spool-limit, tried as a client who wants to exhaust a worker: over
the uwsgi protocol (it was not charged at all there: partial bodies on a
few connections grew the worker's memory without bound), with an Expect
whose announced length can never fit (it got 100 Continue, then a 413
once the body was sent), and in gevent mode, where a partial head or body
held one of the N cores until it ended (N slow clients starved every other
client of the worker)."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import pytest

from tests.helpers import TIME_SCALE, app_vassal, free_port, http_get, wait_for
from vassal.uwsgiproto import encode_vars

APP = '''
def application(env, start_response):
    data = env["wsgi.input"].read()
    out = b"%d" % len(data)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
'''

LIMIT = 200_000


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout * TIME_SCALE)
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _uwsgi_packet(length: int) -> bytes:
    block = encode_vars({"REQUEST_METHOD": "POST", "PATH_INFO": "/up", "SERVER_PROTOCOL": "HTTP/1.1",
                         "CONTENT_LENGTH": str(length), "CONTENT_TYPE": "application/octet-stream"})
    return struct.pack("<BHB", 0, len(block), 0) + block


@pytest.fixture(params=["sync", "gevent"])
def uwsgi_vassal(request, tmp_path):
    uwsgi_port = free_port()
    # (socket-timeout: the held-back body waits out the others' refusals, ten seconds in an emulated guest)
    settings = f"socket = 127.0.0.1:{uwsgi_port}\nbody-spool-limit = {LIMIT}\nsocket-timeout = 60\n"
    with app_vassal(tmp_path, "budget", APP, settings, request.param) as (proc, port, log):
        yield uwsgi_port, port, log


def test_a_uwsgi_body_over_the_limit_is_refused_at_its_head(uwsgi_vassal):
    uwsgi_port, _, _ = uwsgi_vassal
    with socket.create_connection(("127.0.0.1", uwsgi_port), timeout=10) as sock:
        sock.sendall(_uwsgi_packet(LIMIT + 100_000))
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") or answer.startswith(b"Status: 413"), answer[:200]


def test_partial_uwsgi_bodies_share_the_limit_and_give_it_back(uwsgi_vassal):
    """Each body fits alone, not all at once: the one that finds no room
    gets 503; once the others' connections go, a whole upload works."""
    uwsgi_port, _, log = uwsgi_vassal
    size = 150_000
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", uwsgi_port), timeout=10)) for _ in range(3)]
        answers: list[bytes | None] = []
        for sock in socks:
            with contextlib.suppress(OSError):  # (refused, the connection may be closed under the send)
                sock.sendall(_uwsgi_packet(size) + b"x" * (size - 1000))  # (its end held back)
            time.sleep(0.2 * TIME_SCALE)
        for sock in socks:
            sock.settimeout(0.5 * TIME_SCALE)
            try:
                answers.append(sock.recv(200))
            except TimeoutError:
                answers.append(None)  # (still waiting for its body's end)
            except ConnectionResetError:
                answers.append(b"")  # (the refusal, lost to the reset of what it did not read)
        # (each fits alone: the refused ones are 503, not 413)
        assert all(a is None or a == b"" or b" 503 " in a for a in answers), answers
        assert answers[1:] and all(a is not None for a in answers[1:]), answers
        assert answers[0] is None  # (the first body fits: it waits for its end)
        socks[0].sendall(b"x" * 1000)
        assert _read_all(socks[0]).endswith(b"%d" % size)
    wait_for(lambda: "body-spool-limit" in log.read_text(errors="replace"), 10, what="the refusal logged")
    with socket.create_connection(("127.0.0.1", uwsgi_port), timeout=10) as sock:
        sock.sendall(_uwsgi_packet(size) + b"y" * size)
        assert _read_all(sock).endswith(b"%d" % size)


@pytest.mark.parametrize("mode", ["sync", "gevent"])
def test_an_expect_that_cannot_fit_gets_413_before_any_100_continue(tmp_path, mode):
    with app_vassal(tmp_path, "expect", APP, f"body-spool-limit = {LIMIT}\n", mode) as (_, port, _log):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"100 Continue" not in answer
        assert http_get(port, "/") is not None


def test_slow_clients_do_not_take_gevents_cores(tmp_path):
    """gevent = 2: two clients stalled mid-body and one mid-head hold
    connections, not cores; another client's GET is answered at once."""
    with app_vassal(tmp_path, "cores", APP, "gevent = 2\n", "gevent") as (_, port, _log):
        with contextlib.ExitStack() as stack:
            for _ in range(2):
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
            head = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            head.sendall(b"G")
            time.sleep(0.3 * TIME_SCALE)
            started = time.monotonic()
            assert http_get(port, "/", timeout=5 * TIME_SCALE) is not None
            assert time.monotonic() - started < 2 * TIME_SCALE
