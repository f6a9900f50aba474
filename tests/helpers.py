"""Helpers the tests share (conftest.py keeps the fixtures and the leak
check): paths, free ports, HTTP clients, waiting on a condition, a running
emperor as a test sees it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "apps" / "hello.py"
CGROUP_ROOT = Path("/sys/fs/cgroup")
TEST_TAG = f"pyemperor-test-{os.getpid()}"
# How much slower than a developer's machine this one is (an emulated guest:
# 4-5): every wait_for bound is stretched by it. Tests wait on conditions;
# the bound only says when to give up.
TIME_SCALE = float(os.environ.get("PYEMPEROR_TIME_SCALE", "1") or 1)

def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # the thing may not be there yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def world_reachable(path: str | os.PathLike) -> bool:
    """Whether an unprivileged user can reach ``path`` (every dir above it
    has the others' x bit): where tests drop privileges, the checkout and
    the interpreter must be."""
    path = os.path.abspath(path)
    while path != "/":
        if not os.stat(path).st_mode & 0o001:
            return False
        path = os.path.dirname(path)
    return True


def open_fd_targets(pid: int) -> list[str]:
    """What ``pid``'s open fds point at (``pipe:[N]``, paths, ...). The
    process keeps running while we look: an fd closed between the listing
    and its readlink is simply not open any more."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return targets


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this session (the
    kernel may offer a just-closed port again)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def http_get(port: int, path: str = "/", timeout: float = 5.0, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def answers(port: int, path: str = "/") -> bytes | None:
    try:
        status, body = http_get(port, path, timeout=2.0)
    except OSError:
        return None
    return body if status == 200 else None


def hello_ini(port: int, extra: str = "", processes: int = 1) -> str:
    return (
        "[uwsgi]\n"
        f"wsgi-file = {HELLO}\n"
        f"http-socket = 127.0.0.1:{port}\n"
        f"processes = {processes}\n"
        "env = HELLO_NAME=%n\n"
        f"{extra}"
    )


class EmperorProc:
    def __init__(self, vassal_dir: Path, control: Path, log: Path, proc: subprocess.Popen):
        self.dir = vassal_dir
        self.control = control
        self.log = log
        self.proc = proc

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "emperor.ctl", "--control", str(self.control), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"emperorctl {args} failed ({result.returncode}): {result.stderr}")
        return result

    def status(self) -> dict:
        return json.loads(self.ctl("--json", "status").stdout)

    def vassal(self, name: str) -> dict | None:
        for v in self.status()["vassals"]:
            if v["name"] == name:
                return v
        return None

    def wait_state(self, name: str, state: str, timeout: float = 15.0) -> dict:
        return wait_for(lambda: (v := self.vassal(name)) and v["state"] == state and v, timeout, what=f"{name} {state}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc.pid)
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def standalone_vassal(ini: Path, log: Path, ready: Callable[[], object]) -> Iterator[subprocess.Popen]:
    """``vassal INI`` run by itself (no emperor), its output in ``log``,
    waited for until ``ready()`` (or its exit: then the log is the error),
    and stopped with SIGTERM (killed after 15 s) however the test ends."""
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "vassal", str(ini)], stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTEST_TAG": TEST_TAG})
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 20, what="the vassal ready")
        assert proc.poll() is None, log.read_text(errors="replace")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def app_vassal(tmp_path: Path, name: str, app: str, settings: str = "", mode: str = "sync",
               ) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """A standalone vassal of one worker (``mode`` sync, or gevent with 4
    cores unless ``settings`` says how many) serving the WSGI source
    ``app`` on a free loopback port: (process, port, log)."""
    if mode == "gevent":
        import pytest

        pytest.importorskip("gevent", reason="gevent is not installed (pip install .[gevent]; .ci/run does)")
        if "gevent =" not in settings:
            settings += "gevent = 4\n"
    source = tmp_path / f"{name}.py"
    source.write_text(app)
    port = free_port()
    ini = tmp_path / f"{name}.ini"
    ini.write_text(f"[uwsgi]\nwsgi-file = {source}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n{settings}")
    log = tmp_path / f"{name}.log"
    with standalone_vassal(ini, log, lambda: answers(port)) as proc:
        yield proc, port, log


def unix_http_get(path: str, timeout: float = 5.0) -> bytes | None:
    """GET / over a unix socket: the body of a 200 answer, else None."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else None


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
