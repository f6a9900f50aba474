"""gevent mode (issue 14 part 1) under a real emperor: N requests at once
in one worker (idle keep-alive connections beside them, not in their place), uWSGI 1.9.16's shutdown (a reload waits for the requests
in hand, not for the app's own greenlets; atexit runs), the old
behaviour with gevent-wait-for-hub (killed at worker-reload-mercy), no
request lost by naive keep-alive clients across reloads, and the
validation and missing-package errors."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TEST_TAG, answers, free_port, hello_ini, http_get, wait_for
from tests.integration.test_reload_keepalive import naive_clients_across_reloads

pytest.importorskip("gevent", reason="gevent is not installed (pip install .[gevent]; .ci/run does)")

APP = '''
import os, gevent, gevent.event, uwsgi

MARKS = {marks!r}
arrived = [0]
everyone = gevent.event.Event()
started = []

def forever():
    while True:
        gevent.sleep(0.5)

def bye():
    with open(os.path.join(MARKS, f"atexit.{{os.getpid()}}"), "w") as handle:
        handle.write("bye")

uwsgi.atexit = bye

def application(env, start_response):
    if not started:
        started.append(gevent.spawn(forever))  # never ends: the app's, not the server's
    path = env["PATH_INFO"]
    body = f"pid {{os.getpid()}}".encode()
    if path == "/barrier":
        arrived[0] += 1
        if arrived[0] == {barrier}:
            everyone.set()
        body = b"together" if everyone.wait(10) else b"alone"
    elif path == "/slow":
        with open(os.path.join(MARKS, "slow-started"), "w") as handle:
            handle.write(str(os.getpid()))
        gevent.sleep(3)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def gevent_vassal(start_emperor, tmp_path: Path):
    emp = start_emperor()
    marks = tmp_path / "marks"
    marks.mkdir()
    app = tmp_path / "geventapp.py"
    app.write_text(APP.format(marks=str(marks), barrier=10))

    def start(extra: str = "", processes: int = 1) -> int:
        port = free_port()
        (emp.dir / "g.ini").write_text(f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\n"
                                       f"processes = {processes}\ngevent = 10\n{extra}")
        wait_for(lambda: answers(port), 20, what="the gevent vassal answering")
        return port

    start.emp = emp  # type: ignore[attr-defined]
    start.marks = marks  # type: ignore[attr-defined]
    return start


def test_ten_requests_run_at_once_in_one_worker(gevent_vassal):
    port = gevent_vassal()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers_ = list(pool.map(lambda _: http_get(port, "/barrier", timeout=20), range(10)))
    assert answers_ == [(200, b"together")] * 10


def test_idle_keepalive_connections_do_not_hold_the_cores(gevent_vassal):
    """gevent = 10 serves ten requests at once, not ten connections: twelve
    idle keep-alive clients (a browser keeps six per site) leave the cores
    free, and still get their next answer on the same connection. Before,
    they held all ten until their keep-alive ran out (15 s)."""
    import socket

    port = gevent_vassal()
    idle = []
    try:
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            idle.append(sock)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers_ = list(pool.map(lambda _: http_get(port, "/barrier", timeout=20), range(10)))
        assert answers_ == [(200, b"together")] * 10  # (all ten cores at once, beside the idle twelve)
        assert time.monotonic() - started < 5
        for sock in idle:
            sock.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in idle:
            sock.close()


def slow_request_across_a_reload(gevent_vassal, port: int) -> tuple[int, str, int]:
    """A 3 s request, a reload while it runs: (its status, its body, the old worker's pid)."""
    emp, marks = gevent_vassal.emp, gevent_vassal.marks
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http_get, port, "/slow", 20)
        wait_for(lambda: (marks / "slow-started").exists(), 10, what="the slow request started")
        old = int((marks / "slow-started").read_text())
        before = emp.log_text().count("ready (pid")
        emp.ctl("reload", "g.ini")
        status, body = slow.result(30)
    wait_for(lambda: emp.log_text().count("ready (pid") > before, 20, what="the new generation")
    return status, body.decode(), old


def test_a_reload_waits_for_requests_not_for_the_apps_greenlets(gevent_vassal):
    port = gevent_vassal("worker-reload-mercy = 20\n")
    status, body, old = slow_request_across_a_reload(gevent_vassal, port)
    assert (status, body) == (200, f"pid {old}")
    # The app's never-ending greenlet did not hold the old worker: it left
    # at once, normally, with its atexit hook run.
    wait_for(lambda: (gevent_vassal.marks / f"atexit.{old}").exists(), 5, what="the old worker's atexit")
    wait_for(lambda: not _alive(old), 5, what="the old worker gone")
    log = gevent_vassal.emp.log_text()
    assert "worker-reload-mercy" not in log
    assert answers(port) and answers(port) != f"pid {old}".encode()


def test_wait_for_hub_lingers_until_the_mercy_kill(gevent_vassal):
    port = gevent_vassal("gevent-wait-for-hub = true\nworker-reload-mercy = 4\n")
    status, body, old = slow_request_across_a_reload(gevent_vassal, port)
    assert (status, body) == (200, f"pid {old}")
    time.sleep(0.3)
    assert _alive(old)  # joined the hub: the app's greenlet keeps it there
    wait_for(lambda: "worker-reload-mercy): killing it" in gevent_vassal.emp.log_text(), 10, what="the mercy kill logged")
    wait_for(lambda: not _alive(old), 5, what="the old worker killed")
    assert not (gevent_vassal.marks / f"atexit.{old}").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_naive_keepalive_clients_see_no_error_across_reloads(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "ka.ini").write_text(hello_ini(port, processes=2, extra="gevent = 50\nreload-mercy = 20\ndisable-logging = true\n"))
    wait_for(lambda: answers(port), 20, what="vassal up")
    naive_clients_across_reloads(emp, "ka.ini", port)


def test_gevent_1_is_a_validation_error(tmp_path):
    cfg = tmp_path / "one.ini"
    cfg.write_text("[uwsgi]\nwsgi-file = app.py\ngevent = 1\n")
    out = subprocess.run([sys.executable, "-m", "vassal", "--check", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{cfg}:3" in out.stderr and "gevent" in out.stderr and "at least 2" in out.stderr


def test_without_gevent_the_app_fails_to_load_naming_the_package(tmp_path):
    fake = tmp_path / "nogevent" / "gevent"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named gevent')\n")
    port = free_port()
    cfg = tmp_path / "g.ini"
    cfg.write_text(hello_ini(port, extra="gevent = 4\n"))
    out = subprocess.run([sys.executable, "-m", "vassal", str(cfg)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(fake.parent), "PYTEST_TAG": TEST_TAG})
    assert out.returncode == 3, out.stderr  # app-load
    assert "needs the gevent package" in out.stderr and "pip install gevent" in out.stderr
