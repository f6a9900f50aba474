"""The gevent worker's send timeout is a progress timeout: a client that
reads slowly but steadily gets the whole answer, one that stops reading
is cut after the timeout. Real sockets, the real gevent hub."""

import socket
import threading
import time

import pytest

from tests.helpers import TIME_SCALE

pytest.importorskip("gevent")


def _pair(timeout: float):
    from vassal.gevent_socket import ProgressSocket

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    green = ProgressSocket.adopt(ours)
    green.settimeout(timeout)
    return green, theirs


def test_slow_steady_reader_gets_everything_past_the_timeout():
    green, theirs = _pair(timeout=0.5 * TIME_SCALE)
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    got = bytearray()

    def read_slowly():
        # ~2.5 MiB/s: the whole send takes well over the 0.5 s timeout,
        # but no single wait for room comes near it.
        while len(got) < len(payload):
            chunk = theirs.recv(256 * 1024)
            if not chunk:
                break
            got.extend(chunk)
            time.sleep(0.1)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    started = time.monotonic()
    try:
        green.sendall(payload)
        took = time.monotonic() - started
    finally:
        reader.join(30)
        green.close()
        theirs.close()
    assert bytes(got) == payload
    assert took > 1.0  # (it did outlast the timeout, several times over)


def test_reader_that_stops_is_cut_after_the_timeout():
    green, theirs = _pair(timeout=0.5 * TIME_SCALE)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            green.sendall(b"x" * (16 << 20))  # far more than both buffers hold
    finally:
        green.close()
        theirs.close()
    assert time.monotonic() - started < 5 * TIME_SCALE


def test_accept_gives_our_socket():
    from vassal.gevent_socket import ProgressSocket

    listener = ProgressSocket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        conn, peer = listener.accept()
        try:
            assert type(conn) is ProgressSocket and peer == client.getsockname()
            conn.sendall(b"hello")
            assert client.recv(5) == b"hello"
        finally:
            conn.close()
            client.close()
    finally:
        listener.close()
