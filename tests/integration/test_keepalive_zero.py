"""``http-keepalive = 0`` (no wait between requests), sync and gevent: the
first request on a connection is still waited for (as long as a head is)
and answered, and the answer says ``Connection: close`` and closes, rather
than promise a keep-alive the worker will not keep. Before, the sync worker
dropped a request 50 ms behind its connect unanswered, and gevent waited
with a timeout of 0 (a non-blocking socket) and dropped every one."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import HELLO, free_port, standalone_vassal


def _get(port: int, delay: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        time.sleep(delay)  # (a request that follows its connect a little later, as over any real network)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # (keep-alive asked for)
        data = b""
        while chunk := sock.recv(65536):  # (the server closes: no keep-alive)
            data += chunk
        return data


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("mode", ["sync", "gevent"])
def test_no_keepalive_still_answers_the_first_request_and_says_close(tmp_path, mode):
    if mode == "gevent":
        pytest.importorskip("gevent", reason="gevent is not installed")
    port = free_port()
    ini = tmp_path / "ka0.ini"
    ini.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                   "http-keepalive = 0\n" + ("gevent = 4\n" if mode == "gevent" else ""))
    log = tmp_path / "ka0.log"
    with standalone_vassal(ini, log, lambda: "ready" in log.read_text(errors="replace") and _connects(port)):
        for delay in (0.0, 1.2):  # (1.2 s: past the worker's idle sweep, inside http-head-timeout)
            answer = _get(port, delay)
            assert answer.startswith(b"HTTP/1.1 200 "), (delay, answer[:200])
            assert b"\r\nConnection: close\r\n" in answer.split(b"\r\n\r\n", 1)[0] + b"\r\n"
