"""Request bodies past 1 MiB with a Content-Length reach the app as they
arrive (vassal.spool.StreamedBody), tried the way clients really send
them: whole uploads over keep-alive, pipelined requests behind one, an app
that reads only part, a client that goes away or stalls mid-body, Expect:
100-continue, line iteration, the uwsgi protocol and the gevent worker."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import answers, app_vassal, free_port, wait_for

APP = '''
import hashlib, os

def application(env, start_response):
    path, body = env["PATH_INFO"], env["wsgi.input"]
    if path == "/sha":
        digest, count = hashlib.sha256(), 0
        while piece := body.read(100003):
            digest.update(piece)
            count += len(piece)
        out = f"{count} {digest.hexdigest()} {os.getpid()}"
    elif path == "/lines":
        out = str(sum(1 for line in body if line.endswith(b"\\n")))
    elif path == "/partial":
        out = "partial " + str(len(body.read(10)))
    elif path == "/kind":
        out = type(body).__name__
    else:
        out = f"hi {os.getpid()}"
    out = out.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
'''


class Vassal:
    def __init__(self, proc: subprocess.Popen, port: int, uwsgi_port: int, log: Path, mode: str):
        self.proc, self.port, self.uwsgi_port, self.log, self.mode = proc, port, uwsgi_port, log, mode

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(params=["sync", "gevent"])
def vassal(request, tmp_path):
    uwsgi_port = free_port()
    settings = f"uwsgi-socket = 127.0.0.1:{uwsgi_port}\nsocket-timeout = 1\n"
    settings += "gevent = 10\n" if request.param == "gevent" else ""
    with app_vassal(tmp_path, "body", APP, settings, request.param) as (proc, port, log):
        yield Vassal(proc, port, uwsgi_port, log, request.param)


class Answers:
    """Answers with a Content-Length read off one connection, in order."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"closed before {what}: {self.data[:200]!r}"
        self.data += chunk

    def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.data:
            self._more("a whole head")
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
        while len(self.data) < length:
            self._more("the whole body")
        body, self.data = self.data[:length], self.data[length:]
        return head, body


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    return Answers(sock).next()


def test_a_big_upload_arrives_whole_and_the_connection_is_kept(vassal):
    data = os.urandom(20 << 20 | 12345)
    conn = http.client.HTTPConnection("127.0.0.1", vassal.port, timeout=30)
    try:
        conn.request("PUT", "/kind", body=data[:3 << 20])
        resp = conn.getresponse()
        assert resp.read() == b"StreamedBody"  # (not spooled to a file first)
        conn.request("PUT", "/sha", body=data)
        resp = conn.getresponse()
        count, digest, pid = resp.read().decode().split()
        assert (int(count), digest) == (len(data), hashlib.sha256(data).hexdigest())
        assert resp.getheader("Connection") == "keep-alive"
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == f"hi {pid}".encode()  # the same connection, the same worker
    finally:
        conn.close()


def test_small_bodies_are_still_read_before_the_app(vassal):
    conn = http.client.HTTPConnection("127.0.0.1", vassal.port, timeout=10)
    try:
        conn.request("POST", "/kind", body=b"x" * (1 << 20))
        assert conn.getresponse().read() != b"StreamedBody"
    finally:
        conn.close()


def test_a_request_pipelined_behind_a_streamed_body_is_answered(vassal):
    body = os.urandom(2 << 20)
    pipelined = (b"POST /sha HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                 + b"GET /lines HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\na\nb\n"
                 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=10) as sock:
        threading.Thread(target=sock.sendall, args=(pipelined,), daemon=True).start()
        answers_ = Answers(sock)
        _, first = answers_.next()
        _, second = answers_.next()
        head, third = answers_.next()
        assert answers_.data == b"" and sock.recv(10) == b""
    assert first.split()[:2] == [str(len(body)).encode(), hashlib.sha256(body).hexdigest().encode()]
    assert second == b"2" and third.startswith(b"hi ") and b"Connection: close" in head


def test_an_app_that_reads_part_answers_and_closes_without_a_reset(vassal):
    body = b"y" * (8 << 20)
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=10) as sock:
        sender = threading.Thread(target=lambda: _send_quietly(sock, b"POST /partial HTTP/1.1\r\nHost: x\r\n"
                                                               b"Content-Length: %d\r\n\r\n" % len(body) + body), daemon=True)
        sender.start()
        head, answer = read_answer(sock)
        assert answer == b"partial 10"
        assert b"Connection: close" in head  # (the rest of the body cannot be told from a next request)
        sender.join(10)
        rest = b""
        while chunk := sock.recv(65536):  # the server closes, cleanly: no ECONNRESET
            rest += chunk
        assert rest == b""
    assert answers(vassal.port)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_line_iteration_over_a_streamed_body(vassal):
    body = b"".join(b"%05d %s\n" % (i, b"z" * (i % 300)) for i in range(20000))
    assert len(body) > 1 << 20
    conn = http.client.HTTPConnection("127.0.0.1", vassal.port, timeout=10)
    try:
        conn.request("POST", "/lines", body=body)
        assert conn.getresponse().read() == b"20000"
    finally:
        conn.close()


def test_expect_100_continue_with_a_streamed_body(vassal):
    body = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=10) as sock:
        sock.sendall(b"PUT /sha HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        _, answer = read_answer(sock)
    assert answer.split()[1] == hashlib.sha256(body).hexdigest().encode()


def test_a_client_gone_mid_body_is_logged_and_the_worker_serves_on(vassal):
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=10) as sock:
        sock.sendall(b"PUT /sha HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (4 << 20) + b"q" * (600 << 10))
        time.sleep(0.3)
    wait_for(lambda: "request body cut short: the client closed" in vassal.text(), 10, what="the cut body logged")
    assert "error in app" not in vassal.text() and "Traceback" not in vassal.text()
    assert answers(vassal.port)


def test_a_stalled_body_ends_at_the_socket_timeout(vassal):
    # (gevent mode raises socket-timeout to 30 s, as uWSGI does; its worker
    # serves others meanwhile: the stall waits in the hub)
    timeout = 30 if vassal.mode == "gevent" else 1
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=timeout + 10) as sock:
        sock.sendall(b"PUT /sha HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (4 << 20) + b"q" * (300 << 10))
        started = time.monotonic()
        if vassal.mode == "gevent":
            time.sleep(0.3)
            assert answers(vassal.port)
        try:
            leftover = sock.recv(65536)  # the server gives up on us: closed (or reset) with no 500
        except ConnectionResetError:
            leftover = b""
        waited = time.monotonic() - started
    assert b"500" not in leftover
    assert timeout * 0.5 < waited < timeout + 7, waited
    wait_for(lambda: f"the client sent nothing for {timeout}s" in vassal.text(), 5, what="the stall logged")
    assert answers(vassal.port)


def _uwsgi_vars(**variables: str) -> bytes:
    items = b"".join(struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode()
                     for k, v in variables.items())
    return struct.pack("<BHB", 0, len(items), 0) + items


def test_a_streamed_body_over_the_uwsgi_protocol(vassal):
    body = os.urandom(5 << 20)
    packet = _uwsgi_vars(REQUEST_METHOD="PUT", PATH_INFO="/sha", REQUEST_URI="/sha", SERVER_PROTOCOL="HTTP/1.1",
                         CONTENT_LENGTH=str(len(body)), SERVER_NAME="x", SERVER_PORT="80")
    with socket.create_connection(("127.0.0.1", vassal.uwsgi_port), timeout=10) as sock:
        threading.Thread(target=_send_quietly, args=(sock, packet + body), daemon=True).start()
        _, answer = read_answer(sock)
    assert answer.split()[:2] == [str(len(body)).encode(), hashlib.sha256(body).hexdigest().encode()]


def test_an_unread_body_over_the_uwsgi_protocol_is_drained_not_reset(vassal):
    body = b"u" * (3 << 20)
    packet = _uwsgi_vars(REQUEST_METHOD="PUT", PATH_INFO="/partial", REQUEST_URI="/partial",
                         SERVER_PROTOCOL="HTTP/1.1", CONTENT_LENGTH=str(len(body)))
    failures: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(packet + body)
        except OSError as exc:
            failures.append(exc)

    with socket.create_connection(("127.0.0.1", vassal.uwsgi_port), timeout=10) as sock:
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reader = Answers(sock)
        _, answer = reader.next()
        assert answer == b"partial 10"
        sender.join(10)
        while sock.recv(65536):  # a clean end: no ECONNRESET (nginx would say 502)
            pass
    assert failures == []


@pytest.mark.parametrize("length", ["-5", "+5", " 5", "1_0", "5x"])
def test_a_uwsgi_content_length_that_is_not_digits_is_400(vassal, length):
    packet = _uwsgi_vars(REQUEST_METHOD="POST", PATH_INFO="/sha", CONTENT_LENGTH=length)
    with socket.create_connection(("127.0.0.1", vassal.uwsgi_port), timeout=10) as sock:
        sock.sendall(packet + b"12345678901")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 400") or out.startswith(b"Status: 400") or b" 400 " in out.split(b"\r\n")[0], out


def test_a_trickling_upload_does_not_hold_the_worker(vassal):
    if vassal.mode == "gevent":
        pytest.skip("the gevent worker serves others while one waits (its stall limit is 30 s)")
    with socket.create_connection(("127.0.0.1", vassal.port), timeout=10) as sock:
        sock.sendall(b"PUT /sha HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (4 << 20) + b"q" * (300 << 10))
        sock.setblocking(False)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 10:  # a byte per 0.5 s: never a 1 s stall
            try:
                sock.send(b"t")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.5)
        assert closed and time.monotonic() - started < 6
    wait_for(lambda: "the client sent under 16 KiB/s" in vassal.text(), 5, what="the slow body logged")
    assert answers(vassal.port)
