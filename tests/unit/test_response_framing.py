"""The server holds an answer to the length its head says: a body that
grows past Content-Length is cut and the connection closed (what follows
would be read as the next answer), one that falls short closes it too,
and HEAD never reads a file."""

from __future__ import annotations

import socket

from vassal.http import FileWrapper, _Response, send_body


def _pair():
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    return ours, theirs


def _received(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(0.5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def test_a_body_past_its_content_length_is_cut_and_closes():
    ours, theirs = _pair()
    response = _Response(ours, True, False, True)
    response.start_response("200 OK", [("Content-Length", "5")])
    send_body(response, iter([b"hello", b"HTTP/1.1 200 OK\r\n\r\nSMUGGLED"]))
    response.finish()
    assert _received(theirs).endswith(b"\r\n\r\nhello") and not response.keep_alive


def test_a_body_short_of_its_content_length_closes():
    ours, theirs = _pair()
    response = _Response(ours, True, False, True)
    response.start_response("200 OK", [("Content-Length", "10")])
    send_body(response, iter([b"short"]))
    response.finish()
    assert not response.keep_alive


def test_an_exact_body_keeps_the_connection():
    ours, theirs = _pair()
    response = _Response(ours, True, False, True)
    response.start_response("200 OK", [("Content-Length", "5")])
    send_body(response, [b"hello"])
    response.finish()
    assert response.keep_alive


def test_head_never_reads_a_file():
    class Untouchable:
        def read(self, size):
            raise AssertionError("read for HEAD")

        def fileno(self):
            raise AssertionError("sendfile for HEAD")

    ours, theirs = _pair()
    response = _Response(ours, True, True, True)
    response.start_response("200 OK", [("Content-Length", "3000000000")])
    send_body(response, FileWrapper(Untouchable()))
    response.finish()
    assert b"Content-Length: 3000000000" in _received(theirs) and response.keep_alive
