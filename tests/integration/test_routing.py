"""Internal routing in a real vassal, over real sockets: raw requests on
one keep-alive connection through routed and unrouted answers, a bare
``break`` closing with nothing, ``donotlog`` leaving no access line,
``static`` sent with sendfile (and for HEAD), the same rules on the uwsgi
protocol, and a vassal with a bad rule refused at start, its line named."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, kill_tree, wait_for

VASSAL = Path(sys.executable).parent / "vassal"

APP = '''
def application(env, start_response):
    body = ("app " + env["PATH_INFO"]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def read_answer(stream) -> tuple[str, dict, bytes]:
    """One HTTP answer (Content-Length framed) off a socket's file."""
    status = stream.readline().decode("latin-1").rstrip("\r\n")
    if not status:
        raise ConnectionError("closed")
    headers = {}
    while (line := stream.readline().decode("latin-1").rstrip("\r\n")):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = b"" if status.startswith("HTTP/1.1 304") else stream.read(int(headers.get("content-length", 0)))
    return status, headers, body


@pytest.fixture
def vassal(tmp_path, request):
    def start(rules: str, extra: str = "") -> tuple[int, Path]:
        port = free_port()
        (tmp_path / "app.py").write_text(APP)
        ini = tmp_path / "routed.ini"
        ini.write_text(f"[uwsgi]\nwsgi-file = {tmp_path}/app.py\nhttp-socket = 127.0.0.1:{port}\n{extra}{rules}")
        log = tmp_path / "vassal.log"
        proc = subprocess.Popen([str(VASSAL), str(ini)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        request.addfinalizer(lambda: (kill_tree(proc.pid), proc.wait(10)))

        def up():
            assert proc.poll() is None, log.read_text()
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True

        wait_for(up, 20, what="the routed vassal")
        return port, log

    return start


def test_keep_alive_across_routed_answers_and_a_bare_break_closes(vassal, tmp_path):
    (tmp_path / "page.txt").write_bytes(b"x" * 200_000)
    port, log = vassal(f"route = ^/r/(.*) redirect:/new/$1\nroute = ^/gone return:410\nroute = ^/quiet donotlog:\n"
                       f"route = ^/page static:{tmp_path}/page.txt\nroute = ^/drop break:\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /r/a HTTP/1.1\r\nHost: h\r\n\r\nGET /gone HTTP/1.1\r\nHost: h\r\n\r\n"
                     b"GET /quiet HTTP/1.1\r\nHost: h\r\n\r\nGET /page HTTP/1.1\r\nHost: h\r\n\r\n"
                     b"HEAD /page HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        stream = sock.makefile("rb")
        first = read_answer(stream)
        assert first[0] == "HTTP/1.1 302 Found" and first[1]["location"] == "/new/a"
        assert read_answer(stream)[::2] == ("HTTP/1.1 410 Gone", b"Gone")
        assert read_answer(stream)[::2] == ("HTTP/1.1 200 OK", b"app /quiet")
        page = read_answer(stream)
        assert page[0] == "HTTP/1.1 200 OK" and page[2] == b"x" * 200_000 and page[1]["content-type"] == "text/plain"
        assert stream.readline() == b"HTTP/1.1 200 OK\r\n"  # (HEAD: a length, no body)
        head = {}
        while (line := stream.readline()) != b"\r\n":
            head[line.partition(b":")[0].lower()] = line.partition(b":")[2].strip()
        assert head[b"content-length"] == b"200000"
        assert read_answer(stream)[::2] == ("HTTP/1.1 200 OK", b"app /after")
        sock.sendall(b"GET /drop HTTP/1.1\r\nHost: h\r\n\r\n")
        assert stream.read() == b""  # closed, nothing said
    wait_for(lambda: '"GET /after' in log.read_text(), 10, what="the access log")
    text = log.read_text()
    assert '"GET /gone HTTP/1.1" 410' in text and '"GET /quiet' not in text
    assert '"GET /drop HTTP/1.1" 444' in text
    assert "Traceback" not in text


def test_the_same_rules_on_the_uwsgi_protocol(vassal, tmp_path):
    sock_path = tmp_path / "app.sock"
    port, _ = vassal("route = ^/gone return:410\nroute = ^/ addheader:X-Routed: yes\n", extra=f"socket = {sock_path}\n")

    def uwsgi_request(path: str) -> bytes:
        env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "REQUEST_URI": path, "QUERY_STRING": "",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "h"}
        block = b"".join(struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode()
                         for k, v in env.items())
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(sock_path))
            conn.sendall(struct.pack("<BHB", 0, len(block), 0) + block)
            out = b""
            while chunk := conn.recv(65536):
                out += chunk
            return out

    gone = uwsgi_request("/gone")
    assert gone.startswith(b"HTTP/1.1 410 Gone\r\n") and gone.endswith(b"\r\n\r\nGone")
    other = uwsgi_request("/x")
    assert b"\r\nX-Routed: yes\r\n" in other and other.endswith(b"app /x")


def test_a_bad_rule_stops_the_vassal_naming_its_line(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text(f"[uwsgi]\nwsgi-file = {tmp_path}/app.py\nhttp-socket = 127.0.0.1:{free_port()}\n"
                   "route = ^/a last:\nroute = ^/b cachestore:key=x\n")
    out = subprocess.run([str(VASSAL), "--check", str(ini)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"{ini}:5: key 'route': the routing action 'cachestore' is a uWSGI action pyemperor does not build" in out.stderr + out.stdout
