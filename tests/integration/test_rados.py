"""rados-mount against a real single-node Ceph cluster (tests/ceph_cluster.py:
a monitor and a memstore OSD started for this module, stopped by pid):
GET/HEAD/404 and their headers, PUT of 0 bytes, 1 MiB and 64 MiB read back
byte-identical (and their sizes as `rados stat` says), DELETE, MKCOL,
OPTIONS, 405s, a mountpoint other than /, the app beside the mount, two
workers both serving, a cluster that is down at start, a stopped OSD."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import ceph_cluster
from tests.helpers import HELLO, free_port, kill_tree, wait_for

VASSAL = Path(sys.executable).parent / "vassal"


def _has_rados() -> bool:
    return subprocess.run([sys.executable, "-c", "import rados"], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.linux_only,
    pytest.mark.skipif(not ceph_cluster.AVAILABLE, reason="ceph-mon/ceph-osd are not installed (apt-get install ceph-mon ceph-osd)"),
    pytest.mark.skipif(not _has_rados(), reason="python3-rados is not importable from this Python"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ceph = ceph_cluster.Cluster(tmp_path_factory.mktemp("ceph"))
    try:
        ceph.start()
        ceph.create_pool("web")
        yield ceph
    finally:
        ceph.stop()


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):
    """One vassal, two workers: the pool at /store with every flag, again
    read-only at /ro/files, and the hello app for paths under no mount."""
    work = tmp_path_factory.mktemp("rados-vassal")
    port = free_port()
    ini = work / "rados.ini"
    ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\nwsgi-file = {HELLO}\n"
                   f"rados-mount = mountpoint=/store,pool=web,config={cluster.conf},allow_put=1,allow_delete=1,allow_mkcol=1\n"
                   f"rados-mount = mountpoint=/ro/files,pool=web,config={cluster.conf}\n")
    log = work / "vassal.log"
    proc = subprocess.Popen([str(VASSAL), str(ini)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: request(port, "GET", "/hello")[0] == 200, 30, what="the rados vassal")
        yield port, log
    finally:
        kill_tree(proc.pid)
        proc.wait(10)


def test_get_head_and_404(served, cluster):
    port, _ = served
    cluster.rados("-p", "web", "put", "page.html", str(HELLO))
    status, headers, body = request(port, "GET", "/store/page.html")
    assert status == 200 and body == HELLO.read_bytes()
    assert headers["Content-Type"] == "text/html" and headers["Content-Length"] == str(len(body))
    assert headers["Last-Modified"].endswith(" GMT")
    status, headers, body = request(port, "HEAD", "/ro/files/page.html")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(HELLO.stat().st_size)
    assert request(port, "GET", "/store/missing")[0] == 404
    assert request(port, "GET", "/hello")[2].startswith(b"Hello")  # (no mount here: the app)


@pytest.mark.parametrize("size", [0, 1 << 20, 64 << 20])
def test_put_reads_back_byte_identical(served, cluster, size):
    port, _ = served
    data = os.urandom(size)
    name = f"blob-{size}"
    assert request(port, "PUT", f"/store/{name}", data)[0] == 201
    assert f"size {size}" in cluster.rados("-p", "web", "stat", name)
    status, headers, body = request(port, "GET", f"/store/{name}")
    assert status == 200 and int(headers["Content-Length"]) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    # A shorter PUT replaces it whole.
    assert request(port, "PUT", f"/store/{name}", b"short")[0] == 201
    assert request(port, "GET", f"/store/{name}")[2] == b"short"


def test_delete_mkcol_options_and_405s(served, cluster):
    port, _ = served
    request(port, "PUT", "/store/doomed", b"x")
    assert request(port, "DELETE", "/store/doomed")[0] == 200
    assert request(port, "GET", "/store/doomed")[0] == 404
    assert request(port, "DELETE", "/store/doomed")[0] == 404
    assert request(port, "MKCOL", "/store/newpool")[0] == 201
    assert "newpool" in cluster.ceph("osd", "pool", "ls")
    assert request(port, "MKCOL", "/store/newpool")[0] == 405
    status, headers, _ = request(port, "OPTIONS", "/store/anything")
    assert status == 200 and headers["Dav"] == "1" and headers["Allow"] == "OPTIONS, GET, HEAD, PUT, DELETE, MKCOL"
    assert request(port, "OPTIONS", "/ro/files/x")[1]["Allow"] == "OPTIONS, GET, HEAD"
    for method in ("PUT", "DELETE", "MKCOL"):
        assert request(port, method, "/ro/files/x", b"")[0] == 405
    assert request(port, "PATCH", "/store/x", b"")[0] == 405


def test_a_put_cut_short_leaves_no_half_object(served, cluster):
    port, log = served
    assert request(port, "PUT", "/store/cut", b"the old one")[0] == 201
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PUT /store/cut HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (8 << 20))
        sock.sendall(os.urandom(3 << 20))
    wait_for(lambda: "request body cut short: the client closed" in log.read_text(), 20, what="the cut upload logged")
    wait_for(lambda: request(port, "GET", "/store/cut")[0] == 404, 20, what="the half object removed")
    assert request(port, "GET", "/hello")[0] == 200


def raw_status(port: int, head: bytes, body: bytes = b"") -> int:
    """The status of a request whose method and target are these bytes
    (http.client would quote a path that is not ASCII)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_object_names_a_client_sends(served, cluster):
    """A name that is not UTF-8 (a client's %ff: python3-rados cannot pass
    it) or holds a NUL (where librados would cut it: another object) is a
    400, not a 500 with a traceback per request; UTF-8 names are objects like
    any other; MKCOL makes only plain pool names."""
    port, log = served
    seen = len(log.read_bytes())
    for method in (b"GET", b"HEAD", b"PUT", b"DELETE", b"MKCOL"):
        assert raw_status(port, method + b" /store/caf%ff", b"x" if method == b"PUT" else b"") == 400
        assert raw_status(port, method + b" /store/a%00b", b"x" if method == b"PUT" else b"") == 400
    assert request(port, "GET", "/store/a")[0] == 404  # (no object "a" made by the NUL)
    assert raw_status(port, b"PUT /store/caf%C3%A9", b"utf8") == 201
    assert "café" in cluster.rados("-p", "web", "ls").split("\n")
    assert request(port, "GET", "/store/caf%C3%A9")[2] == b"utf8"
    for bad in (b"..%2Fx", b"a/b", b"x" * 129, b".hidden"):
        assert raw_status(port, b"MKCOL /store/" + bad) == 403
    assert b"Traceback" not in log.read_bytes()[seen:]


def test_two_workers_both_serve(served, cluster):
    port, log = served
    cluster.rados("-p", "web", "put", "shared.txt", str(HELLO))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: request(port, "GET", "/store/shared.txt")[0], range(200)))
    assert answers == [200] * 200
    pids = {line.split("]")[0].rsplit(" ", 1)[-1] for line in log.read_text().splitlines() if "/store/shared.txt" in line}
    assert len(pids) == 2, pids


def test_a_cluster_down_at_start_fails_app_load(tmp_path):
    conf = tmp_path / "down.conf"
    conf.write_text(f"[global]\nmon_host = 127.0.0.1:{free_port()}\nauth_client_required = none\n")
    ini = tmp_path / "down.ini"
    ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\n"
                   f"rados-mount = mountpoint=/,pool=web,config={conf},timeout=2\n")
    out = subprocess.run([str(VASSAL), str(ini)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"app-load failed: rados-mount /: cannot reach the cluster of {conf}" in text
    assert "Traceback" not in text


def test_a_stopped_osd_times_out_with_504_and_the_worker_recovers(cluster, tmp_path):
    cluster.rados("-p", "web", "put", "slow.txt", str(HELLO))
    port = free_port()
    ini = tmp_path / "slow.ini"
    ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                   f"rados-mount = mountpoint=/,pool=web,config={cluster.conf},timeout=3,allow_put=1\n")
    proc = subprocess.Popen([str(VASSAL), str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: request(port, "GET", "/slow.txt")[0] == 200, 30, what="the vassal")
        cluster.signal_osd(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert request(port, "GET", "/slow.txt")[0] == 504
            assert time.monotonic() - started < 15
            started = time.monotonic()  # (writes in flight time out too, and the upload is answered)
            assert request(port, "PUT", "/slow-put", os.urandom(6 << 20))[0] == 504
            assert time.monotonic() - started < 25
        finally:
            cluster.signal_osd(signal.SIGCONT)
        wait_for(lambda: request(port, "GET", "/slow.txt")[0] == 200, 60, what="serving again")
    finally:
        kill_tree(proc.pid)
        proc.wait(10)
