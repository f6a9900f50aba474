"""The vassal's app server on http-socket, run with ``vassal FILE`` in the foreground."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import TEST_TAG, TIME_SCALE, answers, free_port, hello_ini, http_get, wait_for


class VassalProc:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send raw bytes, return everything until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            out = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                out += chunk
            return out


@pytest.fixture
def run_vassal(tmp_path):
    started: list[VassalProc] = []

    def start(extra: str = "", processes: int = 1, app: str | None = None, wait: bool = True, preexec=None) -> VassalProc:
        port = free_port()
        cfg = tmp_path / f"v{len(started)}.ini"
        text = hello_ini(port, extra=extra, processes=processes)
        if app is not None:
            text = text.replace(text.splitlines()[1], f"wsgi-file = {app}")
        cfg.write_text(text)
        log = tmp_path / f"v{len(started)}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=handle, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTEST_TAG": TEST_TAG}, preexec_fn=preexec)
        v = VassalProc(proc, port, log)
        started.append(v)
        if wait:
            wait_for(lambda: answers(port) or proc.poll() is not None, 15, what="vassal answering")
        return v

    yield start
    for v in started:
        if v.proc.poll() is None:
            v.proc.send_signal(signal.SIGTERM)
            try:
                v.proc.wait(15)
            except subprocess.TimeoutExpired:
                v.proc.kill()
                v.proc.wait()


def responses(data: bytes) -> list[bytes]:
    return [b"HTTP/1.1" + part for part in data.split(b"HTTP/1.1")[1:]]


def test_keepalive_and_pipelining(run_vassal):
    v = run_vassal()
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    out = v.raw(req * 3 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    parts = responses(out)
    assert len(parts) == 4
    assert all(p.startswith(b"HTTP/1.1 200 OK") for p in parts)
    assert b"Connection: close" in parts[-1]
    assert b"Connection: keep-alive" in parts[0]


def test_chunked_request_body(run_vassal):
    v = run_vassal()
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    out = v.raw(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b"hello world")


def test_content_length_body(run_vassal):
    v = run_vassal()
    status, body = http_get(v.port, "/echo", method="POST", body=b"x" * 100000)
    assert status == 200 and body == b"x" * 100000


def test_streaming_response_is_chunked(run_vassal):
    v = run_vassal()
    out = v.raw(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in out
    assert out.endswith(b"0\r\n\r\n")
    status, body = http_get(v.port, "/stream")
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"


def test_http10_closes(run_vassal):
    v = run_vassal()
    out = v.raw(b"GET /stream HTTP/1.0\r\n\r\n")
    assert b"Connection: close" in out and b"chunked" not in out
    assert out.endswith(b"chunk 2\n")


def test_head_has_no_body(run_vassal):
    v = run_vassal()
    out = v.raw(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Content-Length:" in head and body == b""


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_malformed_gets_400(run_vassal, request_bytes):
    v = run_vassal()
    out = v.raw(request_bytes)
    assert out.startswith(b"HTTP/1.1 400"), out
    assert answers(v.port)  # the worker lives on


def test_unknown_major_version_gets_505(run_vassal):
    v = run_vassal()
    assert v.raw(b"GET / HTTP/9.9\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 505")


def test_huge_header_431(run_vassal):
    v = run_vassal(extra="buffer-size = 4096\n")
    out = v.raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


def test_expect_continue(run_vassal):
    v = run_vassal()
    with socket.create_connection(("127.0.0.1", v.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"ping")
        assert sock.recv(1000).endswith(b"ping")


def test_expect_continue_behind_pipelined_requests(run_vassal):
    """A 100 Continue due while earlier pipelined requests are answered goes
    after their answers, and only if the body is still to come: one that
    came whole in the same packet gets its answer with no 100 anywhere."""
    v = run_vassal()
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    out = v.raw(get + post + b"ping", timeout=1.0)  # (kept alive: read until quiet)
    assert out.count(b"HTTP/1.1 200") == 2 and out.endswith(b"ping") and b"100 Continue" not in out
    with socket.create_connection(("127.0.0.1", v.port), timeout=5) as sock:
        sock.sendall(get + post)  # (the body waits for the go-ahead)
        seen = b""
        while b"100 Continue" not in seen:
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk
        assert seen.index(b"HTTP/1.1 200") < seen.index(b"HTTP/1.1 100 Continue")  # the GET's answer first
        sock.sendall(b"ping")
        while not seen.endswith(b"ping"):
            chunk = sock.recv(65536)
            assert chunk, seen
            seen += chunk


def test_app_error_500_and_traceback(run_vassal):
    v = run_vassal()
    status, _ = http_get(v.port, "/error")
    assert status == 500
    wait_for(lambda: "RuntimeError: this app fails on purpose" in v.text(), what="traceback logged")
    assert answers(v.port)


def test_dead_worker_respawned(run_vassal):
    v = run_vassal(processes=2)
    top = psutil.Process(v.proc.pid)
    master = top.children()[0]
    workers = master.children()
    assert len(workers) == 2
    workers[0].kill()
    wait_for(lambda: len(master.children()) == 2 and workers[0].pid not in [w.pid for w in master.children()], what="worker respawned")
    assert answers(v.port)


def test_sighup_graceful_reload(run_vassal):
    v = run_vassal()
    first = answers(v.port)
    v.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (b := answers(v.port)) and b != first, what="new worker")
    assert v.proc.poll() is None


def test_app_load_failure_exit_code(run_vassal, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise ImportError('broken on purpose')\n")
    v = run_vassal(app=str(bad), wait=False)
    assert v.proc.wait(15) == 3
    assert "broken on purpose" in v.text()


def test_sigterm_stops_everything(run_vassal):
    v = run_vassal(processes=3)
    procs = [psutil.Process(v.proc.pid), *psutil.Process(v.proc.pid).children(recursive=True)]
    v.proc.send_signal(signal.SIGTERM)
    assert v.proc.wait(10) == 0
    time.sleep(0.2)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def test_large_body_spooled(run_vassal):
    v = run_vassal()
    payload = os.urandom(3 * 1024 * 1024)
    status, body = http_get(v.port, "/echo", method="POST", body=payload, timeout=20)
    assert status == 200 and body == payload


WORKERS_APP = '''
import os, time
loaded_in = os.getpid()

def application(env, start_response):
    path = env["PATH_INFO"]
    if path == "/sleep":
        time.sleep(60)
    elif path == "/grow":
        global hoard
        hoard = bytearray(80 * 1024 * 1024)
        hoard[::4096] = b"x" * len(hoard[::4096])
    body = b"%d %d" % (os.getpid(), loaded_in)
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def workers_app(tmp_path):
    app = tmp_path / "workers_app.py"
    app.write_text(WORKERS_APP)
    return str(app)


def pids(port: int) -> tuple[int, int]:
    status, body = http_get(port, "/")
    worker, loaded = body.split()
    return int(worker), int(loaded)


def test_harakiri_kills_stuck_worker(run_vassal, workers_app):
    v = run_vassal(app=workers_app, extra="harakiri = 2\n")
    first, _ = pids(v.port)
    with pytest.raises(OSError):
        http_get(v.port, "/sleep", timeout=20)  # the worker dies under it
    wait_for(lambda: "HARAKIRI: worker 1" in v.text() and "'GET /sleep'" in v.text(), 10, what="harakiri logged")
    second, _ = wait_for(lambda: pids(v.port), 10, what="a new worker")
    assert second != first


def test_max_requests_recycles(run_vassal, workers_app):
    v = run_vassal(app=workers_app, extra="max-requests = 3\n")
    seen = [pids(v.port)[0] for _ in range(7)]  # one more was served by the readiness check
    assert [seen.count(p) for p in dict.fromkeys(seen)][:2] == [2, 3]
    assert "max-requests 3 reached, recycling" in v.text()


def test_reload_on_rss(run_vassal, workers_app):
    v = run_vassal(app=workers_app, extra="reload-on-rss = 60\n")
    first, _ = pids(v.port)
    assert http_get(v.port, "/grow")[0] == 200
    wait_for(lambda: "reload-on-rss, recycling it" in v.text(), 10, what="recycled for RSS")
    assert wait_for(lambda: (p := pids(v.port)[0]) != first and p, 10, what="new worker")


def test_lazy_apps_load_per_worker(run_vassal, workers_app, tmp_path):
    v = run_vassal(app=workers_app, extra="lazy-apps = true\n", processes=2)
    worker, loaded = pids(v.port)
    assert worker == loaded  # loaded in the worker itself
    eager = run_vassal(app=workers_app, processes=2)
    worker, loaded = pids(eager.port)
    assert worker != loaded  # loaded once in the master
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('no')\n")
    failing = run_vassal(app=str(bad), extra="lazy-apps = true\n", wait=False)
    assert failing.proc.wait(20) == 3


def test_logto_with_encoders_all_processes(run_vassal, tmp_path):
    logfile = tmp_path / "app.log"
    v = run_vassal(extra=f"logto = {logfile}\nlog-encoder = format {{\"m\": \"${{msg}}\"}}\nlog-encoder = nl\n"
                         "attach-daemon = sh -c 'echo from-daemon; sleep 600'\n", processes=2)
    wait_for(lambda: "from-daemon" in logfile.read_text(), 10, what="daemon line")
    http_get(v.port, "/error")
    wait_for(lambda: "this app fails on purpose" in logfile.read_text(), 10, what="worker traceback")
    lines = logfile.read_text().splitlines()
    assert all(line.startswith('{"m": "') and line.endswith('"}') for line in lines), lines[:5]
    text = logfile.read_text()
    assert "master" in text and "worker" in text and "ready" in text
    # logrotate: move the file away, SIGUSR2, a new file appears.
    logfile.rename(tmp_path / "app.log.1")
    v.proc.send_signal(signal.SIGUSR2)

    def reopened() -> bool:
        http_get(v.port, "/error")  # (again until the reopen has happened)
        return logfile.exists() and "fails on purpose" in logfile.read_text()

    wait_for(reopened, 10, interval=0.3, what="reopened log file")


LOAD_CLIENT = r'''
import http.client, json, sys, time
port, seconds, rate = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ok = failed = 0
errors = []
start = time.monotonic()
n = 0
while time.monotonic() - start < seconds:
    n += 1
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status == 200 and body.startswith(b"Hello"):
            ok += 1
        else:
            failed += 1
            errors.append(resp.status)
    except Exception as exc:
        failed += 1
        errors.append(repr(exc))
    delay = start + n / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
'''


def test_graceful_reload_under_load_drops_nothing(run_vassal, tmp_path):
    v = run_vassal(processes=2)
    client = tmp_path / "load.py"
    client.write_text(LOAD_CLIENT)
    load = subprocess.Popen([sys.executable, str(client), str(v.port), "4", "200"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    v.proc.send_signal(signal.SIGHUP)
    time.sleep(1.2)
    v.proc.send_signal(signal.SIGHUP)
    out, _ = load.communicate(timeout=60)
    result = json.loads(out)
    assert result["failed"] == 0, result
    assert result["ok"] >= 600 / TIME_SCALE  # (800 sent at 200/s here; an emulated guest sends fewer)
    assert v.text().count("ready (pid") >= 1 and v.text().count("app master generation 3 ready") == 1


def test_smart_attach_daemon(run_vassal, tmp_path):
    import psutil

    pidfile = tmp_path / "d.pid"
    v = run_vassal(extra=f"smart-attach-daemon = {pidfile} sh -c 'sleep 600 & echo $! > {pidfile}'\n")
    first = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="pidfile"))
    assert psutil.pid_exists(first)
    v.proc.send_signal(signal.SIGHUP)  # a graceful reload keeps it, same pid
    wait_for(lambda: "app master generation 2 ready" in v.text(), 10, what="reloaded")
    time.sleep(1.5)
    assert int(pidfile.read_text()) == first and psutil.pid_exists(first)
    os.kill(first, signal.SIGKILL)
    second = int(wait_for(lambda: (p := pidfile.read_text().strip()) and int(p) != first and p, 10, what="restarted daemon"))
    assert psutil.pid_exists(second)
    v.proc.send_signal(signal.SIGTERM)
    v.proc.wait(15)
    wait_for(lambda: not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE, 10,
             what="daemon stopped with the vassal")


CHEAPER_APP = '''
import os, time
hoard = []

def application(env, start_response):
    if env["PATH_INFO"] == "/slow":
        time.sleep(1.5)
    elif env["PATH_INFO"] == "/grow":
        hoard.append(bytearray(120 * 1024 * 1024))
        hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def worker_count(v) -> int:
    import psutil

    master = psutil.Process(v.proc.pid).children()[0]
    return len(master.children())


def test_cheaper_grows_and_shrinks(run_vassal, tmp_path):
    import threading

    app = tmp_path / "cheaper_app.py"
    app.write_text(CHEAPER_APP)
    v = run_vassal(app=str(app), extra="cheaper = 1\ncheaper-step = 1\n", processes=4)
    assert worker_count(v) == 1
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                http_get(v.port, "/slow", timeout=10)
            except OSError:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: worker_count(v) == 4, 20, what="grown to 4 workers")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert "cheaper: +1 worker(s)" in v.text()
    wait_for(lambda: worker_count(v) == 1, 30, what="shrunk back to 1 worker")
    assert "idle for 3s" in v.text()


def test_cheaper_rss_hard_limit(run_vassal, tmp_path):
    app = tmp_path / "cheaper_app.py"
    app.write_text(CHEAPER_APP)
    v = run_vassal(app=str(app), extra="cheaper = 1\ncheaper-initial = 2\ncheaper-rss-limit-hard = 150M\n", processes=2)
    wait_for(lambda: worker_count(v) == 2, 10, what="two workers")
    for _ in range(2):
        try:
            http_get(v.port, "/grow", timeout=10)
        except OSError:
            pass
    wait_for(lambda: "cheaper-rss-limit-hard" in v.text(), 10, what="hard limit decision")
    assert "cheaper: -1 worker" in v.text()


VALIDATED_APP = '''
import os
import re
from wsgiref.validate import validator

DATA = os.environ["DATA_FILE"]


def raw(environ, start_response):
    if environ["PATH_INFO"] == "/file":
        f = open(DATA, "rb")
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 65536)
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body) + 2))])
    return [b"ok", body]


validated = validator(raw)


def application(environ, start_response):
    # /plain/...: without the validator, which hides wsgi.file_wrapper's object.
    if environ["PATH_INFO"].startswith("/plain"):
        environ["PATH_INFO"] = environ["PATH_INFO"][len("/plain"):]
        return raw(environ, start_response)
    return validated(environ, start_response)
'''


def test_wsgi_compliance_and_file_wrapper(run_vassal, tmp_path):
    data = tmp_path / "data.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    data.write_bytes(payload)
    app = tmp_path / "validated.py"
    app.write_text(VALIDATED_APP)
    v = run_vassal(app=str(app), extra=f"env = DATA_FILE={data}\n")
    status, body = http_get(v.port, "/", method="POST", body=b"abc")
    assert status == 200 and body == b"okabc", v.text()[-2000:]
    status, body = http_get(v.port, "/file", timeout=20)
    assert status == 200 and body == payload
    out = v.raw(b"GET /plain/file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = out.split(b"\r\n\r\n", 1)[0]
    assert b"Content-Length: %d" % len(payload) in head and b"chunked" not in head  # sendfile path
    assert out.split(b"\r\n\r\n", 1)[1] == payload
    assert "AssertionError" not in v.text()


def test_access_log_lines(run_vassal):
    v = run_vassal()
    http_get(v.port, "/stream?x=1")
    wait_for(lambda: '"GET /stream?x=1 HTTP/1.1" 200 24 ' in v.text(), 5, what="access log line")
    quiet = run_vassal(extra="disable-logging = true\n")
    http_get(quiet.port, "/quiet")
    time.sleep(0.3)
    assert "/quiet" not in quiet.text()


def test_memory_report_and_attached_daemon_restart(run_vassal, tmp_path):
    import psutil

    marker = tmp_path / "daemon.pid"
    v = run_vassal(extra=f"memory-report = true\nattach-daemon = sh -c 'echo $$ > {marker}; exec sleep 600'\n")
    http_get(v.port, "/")
    wait_for(lambda: re.search(r'"GET / HTTP/1.1" 200 \d+ [\d.]+ms rss=\d+MB', v.text()), 5, what="memory report")
    first = int(wait_for(lambda: marker.exists() and marker.read_text().strip(), 10, what="daemon up"))
    os.kill(first, signal.SIGKILL)
    second = int(wait_for(lambda: (p := marker.read_text().strip()) and int(p) != first and p, 10, what="daemon restarted"))
    assert psutil.pid_exists(second)


@pytest.fixture
def env_vassal(run_vassal, tmp_path):
    from tests.http_requests import ENV_APP

    app = tmp_path / "envapp.py"
    app.write_text(ENV_APP)
    return run_vassal(extra="buffer-size = 8192\nlimit-post = 16384\n", app=str(app))


@pytest.fixture(scope="module")
def table_vassal(tmp_path_factory):
    """One environ-echoing vassal for every row of the request tables."""
    from tests.http_requests import ENV_APP

    base = tmp_path_factory.mktemp("table")
    (base / "envapp.py").write_text(ENV_APP)
    port = free_port()
    cfg = base / "table.ini"
    text = hello_ini(port, extra="buffer-size = 8192\nlimit-post = 16384\n", processes=2)
    cfg.write_text(text.replace(text.splitlines()[1], f"wsgi-file = {base / 'envapp.py'}"))
    log = base / "table.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTEST_TAG": TEST_TAG})
    v = VassalProc(proc, port, log)
    try:
        wait_for(lambda: answers(port) or proc.poll() is not None, 15, what="table vassal answering")
        yield v
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send_in_pieces(port: int, data: bytes, seed: int, timeout: float = 5.0) -> bytes:
    """``data`` in pieces of 1-64 bytes, each its own segment (TCP_NODELAY,
    a pause between), then everything until the server closes."""
    import random

    rng = random.Random(seed)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        at = 0
        try:
            while at < len(data):
                size = rng.randint(1, 64)
                sock.sendall(data[at:at + size])
                at += size
                time.sleep(0.0005)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: the answer is what counts
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _table_ids(table):
    return [row[0] for row in table]


from tests.http_requests import INVALID, VALID  # noqa: E402


def _closing(raw: bytes) -> bytes:
    return raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1) if b"\r\n\r\n" in raw else raw


@pytest.mark.parametrize("split", [False, True], ids=["whole", "pieces"])
@pytest.mark.parametrize("name,raw,expected", VALID, ids=_table_ids(VALID))
def test_valid_request_table(table_vassal, name, raw, expected, split):
    raw = _closing(raw)
    out = send_in_pieces(table_vassal.port, raw, seed=len(raw)) if split else table_vassal.raw(raw)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), (name, out[:300])
    doc = json.loads(body)
    for key, value in expected.items():
        if value is None:
            assert key not in doc, (name, key, doc.get(key))
        else:
            assert doc.get(key) == value, (name, key, doc.get(key))


@pytest.mark.parametrize("split", [False, True], ids=["whole", "pieces"])
@pytest.mark.parametrize("name,raw,status", INVALID, ids=_table_ids(INVALID))
def test_invalid_request_table(table_vassal, name, raw, status, split):
    out = send_in_pieces(table_vassal.port, raw, seed=len(raw)) if split else table_vassal.raw(raw)
    assert out.startswith(f"HTTP/1.1 {status}".encode()), (name, out[:200])
    assert b"Connection: close" in out.partition(b"\r\n\r\n")[0]
    assert answers(table_vassal.port)  # the worker lives on
    assert "Traceback" not in table_vassal.text()  # a client's error is not the server's


def test_a_refused_upload_is_answered_not_reset(run_vassal):
    """After 413 the worker reads and drops the rest of the body (lingering
    close): closing with it unread made the kernel reset the connection, and
    http.client saw ConnectionResetError, never the 413."""
    import http.client

    v = run_vassal(extra="limit-post = 100000\n")
    conn = http.client.HTTPConnection("127.0.0.1", v.port, timeout=20)
    try:
        conn.request("POST", "/echo", body=b"x" * 5_000_000)
        resp = conn.getresponse()
        assert resp.status == 413
    finally:
        conn.close()
    assert answers(v.port)


def test_a_head_trickled_byte_by_byte_gets_408(run_vassal):
    """Any byte refreshed the idle timer: a slowloris head lived forever."""
    v = run_vassal(extra="http-head-timeout = 2\nhttp-keepalive = 15\n")
    with socket.create_connection(("127.0.0.1", v.port), timeout=20) as sock:
        started = time.monotonic()
        out = b""
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                out += sock.recv(4096)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if out:
                break
        assert out.startswith(b"HTTP/1.1 408"), out
        assert time.monotonic() - started < 10 * TIME_SCALE
    assert answers(v.port)


def test_out_of_fds_the_worker_pauses_accepting_and_lives(run_vassal, tmp_path):
    """EMFILE on accept crashed the worker (and dropped what it held)."""
    import resource

    v = run_vassal(wait=False, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)))
    wait_for(lambda: answers(v.port), 15, what="vassal up")
    held = []
    try:
        for _ in range(80):
            sock = socket.create_connection(("127.0.0.1", v.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\n")  # a head that never ends
            held.append(sock)
        wait_for(lambda: "pausing accepts" in v.text(), 10, what="the pause logged")
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: answers(v.port), 15, what="answering again")
    assert "worker crashed" not in v.text() and "Traceback" not in v.text()
