"""Shared fixtures: a real emperor on a temp dir, free ports, HTTP helpers,
and a leak check at session end (no process, cgroup or socket left)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "apps" / "hello.py"
CGROUP_ROOT = Path("/sys/fs/cgroup")
TEST_TAG = f"pyemperor-test-{os.getpid()}"
# How much slower than a developer's machine this one is (an emulated guest:
# 4-5): every wait_for bound is stretched by it. Tests wait on conditions;
# the bound only says when to give up.
TIME_SCALE = float(os.environ.get("PYEMPEROR_TIME_SCALE", "1") or 1)

try:
    from hypothesis import settings as _hypothesis_settings

    # Hypothesis's 200 ms per-example deadline is a clock, not a property.
    _hypothesis_settings.register_profile("pyemperor", deadline=None)
    _hypothesis_settings.load_profile("pyemperor")
except ImportError:
    pass


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


@pytest.fixture
def start_emperor(tmp_path: Path) -> Iterator[Callable[..., EmperorProc]]:
    started: list[EmperorProc] = []

    def start(*extra: str, vassal_dir: Path | None = None, wait: bool = True, control_dir: Path | None = None) -> EmperorProc:
        directory = vassal_dir or (tmp_path / "vassals")
        directory.mkdir(exist_ok=True)
        control = (control_dir or tmp_path) / f"control-{uuid.uuid4().hex[:8]}.sock"
        log = tmp_path / f"emperor-{len(started)}.log"
        handle = open(log, "wb")
        proc = subprocess.Popen(
            # PYTEST_TAG passed on so that the leak check finds the vassals' processes too.
            [sys.executable, "-m", "emperor", "--control", str(control), "--emperor-throttle", "200", "--emperor-curse-tolerance", "3",
             "--vassal-env-pass", "PYTEST_TAG", *extra, str(directory)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTEST_TAG": TEST_TAG},
        )
        handle.close()
        emp = EmperorProc(directory, control, log, proc)
        started.append(emp)
        if wait:
            wait_for(lambda: control.exists() or proc.poll() is not None, 10, what="control socket")
            if proc.poll() is not None:
                raise AssertionError(f"emperor exited with {proc.returncode}:\n{emp.log_text()}")
        return emp

    yield start
    for emp in started:
        emp.stop()


def _leftover_processes() -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            env = proc.info.get("environ") or {}
        except psutil.Error:
            continue
        if env.get("PYTEST_TAG") == TEST_TAG and proc.pid != os.getpid():
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            found.append(f"{proc.pid} {' '.join(proc.info.get('cmdline') or [])}")
    return found


def _someone_elses(entry: Path) -> bool:
    """A cgroup of an emperor that is alive and not ours (another suite or
    a person running one on this machine): not this session's leak."""
    if entry.name.startswith("pyemperor-") and entry.name.endswith(".scope"):
        pid = entry.name[len("pyemperor-"):-len(".scope")]  # v2: one started outside a delegated unit
    else:
        pid = entry.name.split(".")[1]
    if not pid.isdigit():
        return False
    try:
        return psutil.Process(int(pid)).environ().get("PYTEST_TAG") != TEST_TAG
    except psutil.Error:
        return False


def _leftover_cgroups() -> list[str]:
    found: list[str] = []
    if not CGROUP_ROOT.exists():
        return found
    # v2: one tree; v1: one per hierarchy (and no cgroup.controllers at the top).
    unified = (CGROUP_ROOT / "cgroup.controllers").exists()
    trees = [CGROUP_ROOT] if unified else [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    for tree in trees:
        # os.walk goes on past a dir removed under it (systemd trimming a scope).
        for directory, subdirs, _ in os.walk(tree, onerror=lambda exc: None):
            for name in subdirs:
                if name.startswith("pyemperor.") or (name.startswith("pyemperor-") and name.endswith(".scope")):
                    entry = Path(directory) / name
                    if not _someone_elses(entry):
                        found.append(str(entry))
    return found


# Mounts the system makes once for itself and keeps: iproute2 bind-mounts
# /run/netns onto itself at the first `ip netns add` on a machine, so a fresh
# machine gains it during the suite. Namespaces inside it are still checked.
SYSTEM_MOUNTS = {"/run/netns"}


def _mounts() -> set[str]:
    # psutil: /proc/self/mountinfo on Linux, getmntinfo(3) on FreeBSD.
    return {part.mountpoint for part in psutil.disk_partitions(all=True)} - SYSTEM_MOUNTS


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except OSError:
        return set()


def pytest_collection_modifyitems(config, items):
    """Tests of Linux kernel features (namespaces, cgroups, tun, netns) are
    marked linux_only and skipped elsewhere; the rest of the behavioural suite
    runs unchanged on FreeBSD (vagrant/freebsd)."""
    if sys.platform.startswith("linux"):
        return
    skip = pytest.mark.skip(reason="Linux kernel feature (runs on Linux)")
    for item in items:
        if item.get_closest_marker("linux_only"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def leak_check():
    before = set(_leftover_cgroups())
    mounts_before, netns_before = _mounts(), _netns()
    yield
    assert _mounts() <= mounts_before, f"mounts left behind: {sorted(_mounts() - mounts_before)}"
    assert _netns() <= netns_before, f"netns left behind: {sorted(_netns() - netns_before)}"
    deadline = time.monotonic() + 5
    while (procs := _leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    # (systemd collects an emptied transient scope a moment after its emperor left)
    while (cgroups := sorted(set(_leftover_cgroups()) - before)) and time.monotonic() < deadline + 5:
        time.sleep(0.1)
    for line in procs:
        kill_tree(int(line.split()[0]))
    assert not procs, f"processes left behind: {procs}"
    assert not cgroups, f"cgroups left behind: {cgroups}"
