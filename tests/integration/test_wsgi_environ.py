"""The environ of every socket kind, checked by wsgiref.validate around the
app (PEP 3333): SCRIPT_NAME and QUERY_STRING always there, SERVER_NAME the
vassal's host name (never a wildcard address), SERVER_PORT the bound port or
80 on a unix socket, so that wsgiref.util.request_uri rebuilds a real URL;
what nginx sends in its uwsgi params wins."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys

import pytest

from tests.helpers import TEST_TAG, free_port, wait_for
from vassal.uwsgiproto import encode_vars

VALIDATED = '''
import json, socket
from wsgiref.util import request_uri
from wsgiref.validate import validator


def inner(environ, start_response):
    body = environ["wsgi.input"].read(1 << 20)  # (the validator wants a size)
    doc = {k: environ.get(k) for k in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME", "SERVER_PORT",
                                         "HTTP_HOST", "CONTENT_LENGTH")}
    doc["terminated"] = environ.get("wsgi.input_terminated")
    doc["uri"] = request_uri(environ)
    doc["hostname"] = socket.gethostname()
    doc["body"] = len(body)
    out = json.dumps(doc).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]


application = validator(inner)
'''


@pytest.fixture
def vassal_with(tmp_path):
    procs: list[subprocess.Popen] = []
    app = tmp_path / "validated.py"
    app.write_text(VALIDATED)

    def start(socket_line: str, ready) -> None:
        cfg = tmp_path / f"v{len(procs)}.ini"
        cfg.write_text(f"[uwsgi]\nwsgi-file = {app}\n{socket_line}\nprocesses = 1\n")
        log = open(tmp_path / f"v{len(procs)}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTEST_TAG": TEST_TAG}))
        log.close()
        wait_for(ready, 15, what="vassal up")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def http_over(sock: socket.socket, request: bytes) -> dict:
    sock.sendall(request)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out[:300]
    return json.loads(body)


def test_tcp_http_socket_on_a_wildcard_address(vassal_with):
    port = free_port()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=5)

    vassal_with(f"http-socket = 0.0.0.0:{port}", lambda: connect().close() or True)
    with connect() as sock:
        doc = http_over(sock, b"GET /p?q=1 HTTP/1.1\r\nHost: app.example:8000\r\nConnection: close\r\n\r\n")
    assert doc["SERVER_NAME"] == doc["hostname"] == socket.gethostname() and doc["SERVER_PORT"] == str(port)
    assert doc["SCRIPT_NAME"] == "" and doc["QUERY_STRING"] == "q=1"
    assert doc["uri"] == "http://app.example:8000/p?q=1"
    assert doc["terminated"] is True
    with connect() as sock:
        doc = http_over(sock, b"GET /p HTTP/1.0\r\n\r\n")  # no Host: the URL comes from SERVER_NAME/PORT
    assert doc["uri"] == f"http://{socket.gethostname()}:{port}/p" and doc["QUERY_STRING"] == ""


def test_unix_http_socket(vassal_with, tmp_path):
    path = str(tmp_path / "h.sock")

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(path)
        return sock

    vassal_with(f"http-socket = {path}", lambda: connect().close() or True)
    with connect() as sock:
        doc = http_over(sock, b"GET /u HTTP/1.0\r\n\r\n")
    assert doc["SERVER_NAME"] == socket.gethostname() and doc["SERVER_PORT"] == "80"
    assert doc["uri"] == f"http://{socket.gethostname()}/u"


def test_chunked_upload_is_terminated_and_sized(vassal_with):
    port = free_port()
    vassal_with(f"http-socket = 127.0.0.1:{port}", lambda: socket.create_connection(("127.0.0.1", port)).close() or True)
    body = b"".join(b"%x\r\n%s\r\n" % (1000, b"z" * 1000) for _ in range(100)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        doc = http_over(sock, b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    assert doc["terminated"] is True and doc["body"] == 100000 and doc["CONTENT_LENGTH"] == "100000"


def uwsgi_packet(env: dict[str, str]) -> bytes:
    block = encode_vars(env)
    return struct.pack("<BHB", 0, len(block), 0) + block


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_bare_uwsgi_packets_get_the_listeners_name_and_port(vassal_with, tmp_path, kind):
    if kind == "tcp":
        port = free_port()
        line, address, family, expected_port = f"socket = 127.0.0.1:{port}", ("127.0.0.1", port), socket.AF_INET, str(port)
    else:
        path = str(tmp_path / "u.sock")
        line, address, family, expected_port = f"socket = {path}", path, socket.AF_UNIX, "80"

    def connect() -> socket.socket:
        sock = socket.socket(family)
        sock.settimeout(5)
        sock.connect(address)
        return sock

    vassal_with(line, lambda: connect().close() or True)
    with connect() as sock:  # the least a peer can send
        doc = http_over(sock, uwsgi_packet({"REQUEST_METHOD": "GET", "PATH_INFO": "/bare"}))
    assert doc["SERVER_NAME"] == socket.gethostname() and doc["SERVER_PORT"] == expected_port
    assert doc["SCRIPT_NAME"] == "" and doc["QUERY_STRING"] == ""
    with connect() as sock:  # what nginx sends wins
        doc = http_over(sock, uwsgi_packet({"REQUEST_METHOD": "GET", "PATH_INFO": "/n", "SERVER_NAME": "front.example",
                                            "SERVER_PORT": "443", "QUERY_STRING": "a=b", "HTTP_HOST": "front.example"}))
    assert doc["SERVER_NAME"] == "front.example" and doc["SERVER_PORT"] == "443" and doc["uri"] == "http://front.example/n?a=b"


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (apt-get install nginx)")
def test_behind_nginx_its_params_win_and_validate(vassal_with, tmp_path):
    work = tmp_path / "nginx"
    work.mkdir()
    tmp_path.chmod(0o755)
    sock = tmp_path / "app.sock"
    vassal_with(f"socket = {sock}\nchmod-socket = 666", lambda: sock.exists())
    port = free_port()
    (work / "nginx.conf").write_text(f"""
user root; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{ listen 127.0.0.1:{port}; server_name front.example;
    location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass unix:{sock}; }} }} }}
""")
    nginx = subprocess.Popen([NGINX, "-e", str(work / "error.log"), "-p", str(work), "-c", str(work / "nginx.conf"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTEST_TAG": TEST_TAG})
    try:
        def fetch() -> dict | None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    return http_over(conn, b"GET /n?x=1 HTTP/1.1\r\nHost: front.example\r\nConnection: close\r\n\r\n")
            except (OSError, AssertionError):
                return None

        doc = wait_for(fetch, 20, what="nginx -> vassal")
        assert doc["SERVER_NAME"] == "front.example" and doc["SERVER_PORT"] == str(port)
        assert doc["QUERY_STRING"] == "x=1" and doc["SCRIPT_NAME"] == ""
        assert doc["uri"] == "http://front.example/n?x=1"
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(15)
