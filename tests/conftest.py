"""Shared fixtures: a real emperor on a temp dir, and a leak check at
session end (no process, cgroup, mount, netns or socket left). The helpers
the tests import are in tests/helpers.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import CGROUP_ROOT, ROOT, TEST_TAG, EmperorProc, kill_tree, wait_for

try:
    from hypothesis import settings as _hypothesis_settings

    # Hypothesis's 200 ms per-example deadline is a clock, not a property.
    _hypothesis_settings.register_profile("pyemperor", deadline=None)
    _hypothesis_settings.load_profile("pyemperor")
except ImportError:
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


@pytest.fixture
def tcp_listener():
    """A TCP server on the host's router address that greets every client."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello from the host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


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


def _semaphores() -> set[str]:
    """SysV semaphore sets of the host's IPC namespace (thunder-lock's ipcsem)."""
    try:
        with open("/proc/sysvipc/sem") as handle:
            return {line.split()[1] for line in handle.readlines()[1:] if line.split()}
    except OSError:
        return set()


# Where a test lives says where it runs (pyroute2's split by platform and
# kind): unit/ in process anywhere; integration/ real processes on Linux and
# FreeBSD; linux/, hostile/ and guest/ Linux kernel features; freebsd/ the
# FreeBSD backend against fakes, anywhere.
LINUX_DIRS = ("linux", "hostile", "guest")


def pytest_collection_modifyitems(config, items):
    """Tests of Linux kernel features (namespaces, cgroups, tun, netns) are
    linux_only, by directory or by marker, and skipped elsewhere; the rest
    of the behavioural suite runs unchanged on FreeBSD (vagrant/freebsd)."""
    for item in items:
        if Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0] in LINUX_DIRS:
            item.add_marker(pytest.mark.linux_only)
    if sys.platform.startswith("linux"):
        return
    skip = pytest.mark.skip(reason="Linux kernel feature (runs on Linux)")
    for item in items:
        if item.get_closest_marker("linux_only"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def leak_check():
    before = set(_leftover_cgroups())
    mounts_before, netns_before, sems_before = _mounts(), _netns(), _semaphores()
    yield
    assert _mounts() <= mounts_before, f"mounts left behind: {sorted(_mounts() - mounts_before)}"
    assert _netns() <= netns_before, f"netns left behind: {sorted(_netns() - netns_before)}"
    assert _semaphores() <= sems_before, f"semaphore sets left behind (ipcs -s): {sorted(_semaphores() - sems_before)}"
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
