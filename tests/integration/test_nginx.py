"""A real nginx (Debian's) in front of a vassal's ``socket`` (uwsgi protocol)."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import HELLO, TEST_TAG, free_port, wait_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (apt-get install nginx)")


def get(port: int, path: str = "/", method: str = "GET", body: bytes | None = None, headers: dict | None = None,
        conn: http.client.HTTPConnection | None = None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


@pytest.fixture(params=["unix", "tcp"])
def nginx_vassal(request):
    work = Path(tempfile.mkdtemp(prefix="pyemperor-nginx-"))
    work.chmod(0o755)
    procs: list[subprocess.Popen] = []
    try:
        upstream = f"unix:{work}/app.sock" if request.param == "unix" else f"127.0.0.1:{free_port()}"
        address = upstream[len("unix:"):] if request.param == "unix" else upstream
        cfg = work / "app.ini"
        cfg.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nsocket = {address}\nchmod-socket = 666\nprocesses = 4\n"
                       "env = HELLO_NAME=nginx\nlimit-post = 16M\n")
        with open(work / "vassal.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTEST_TAG": TEST_TAG}))
        port = free_port()
        (work / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 20m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/uwsgi_params;
            uwsgi_pass {upstream};
        }}
    }}
}}
""")
        procs.append(subprocess.Popen([NGINX, "-e", str(work / "error.log"), "-p", str(work), "-c", str(work / "nginx.conf"),
                                       "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTEST_TAG": TEST_TAG}))
        wait_for(lambda: get(port)[0] == 200, 20, what="nginx -> vassal")
        yield port, work
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if proc is procs[0] else signal.SIGQUIT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_get_and_environ(nginx_vassal):
    port, _ = nginx_vassal
    status, body = get(port, "/")
    assert status == 200 and body.startswith(b"Hello, nginx!")
    status, body = get(port, "/stream")
    assert status == 200 and body == b"chunk 0\nchunk 1\nchunk 2\n"
    status, _ = get(port, "/error")
    assert status == 500


def test_post_5mb_and_chunked_upload(nginx_vassal):
    port, _ = nginx_vassal
    payload = os.urandom(5 * 1024 * 1024)
    status, body = get(port, "/echo", method="POST", body=payload)
    assert status == 200 and body == payload

    def chunks():
        for i in range(10):
            yield b"%d-" % i * 1000

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", "/echo", body=chunks(), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"".join(chunks())
    conn.close()


def test_many_keepalive_clients(nginx_vassal):
    port, _ = nginx_vassal

    def client(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        ok = 0
        for _ in range(5):
            status, body = get(port, "/", conn=conn)
            ok += status == 200 and body.startswith(b"Hello")
        conn.close()
        return ok

    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        assert sum(pool.map(client, range(100))) == 500


def test_bad_uwsgi_packets_answered_and_survived(nginx_vassal, request):
    port, work = nginx_vassal
    if request.node.callspec.params["nginx_vassal"] != "unix":
        pytest.skip("raw packets tested on the unix socket")
    for raw in (b"\x05\x00\x00\x00", b"\x00\x08\x00\x00\x01\x00", b"\x00\x04\x00\x00\x05\x00ab"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(work / "app.sock"))
            sock.sendall(raw)
            if raw[1] == 8:
                sock.shutdown(socket.SHUT_WR)
            data = sock.recv(1000)
            assert data == b"" or data.startswith(b"HTTP/1.1 ")
    assert get(port, "/")[0] == 200
