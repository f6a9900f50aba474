"""The shipped unit, started for real by systemd on the unified cgroup v2
hierarchy: limits land in the vassal's own cgroup, an OOM takes the whole
vassal, a fork bomb stays inside, ``systemctl reload`` and ``stop`` behave.
And an emperor started by hand outside a delegated unit gets a scope.

Only in the guest of vagrant/linux/guest-check.sh (PYEMPEROR_GUEST_CHECK=1):
these tests install and restart pyemperor.service, which a developer's host
should not have done to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, answers, free_port, http_get, wait_for

pytestmark = [
    pytest.mark.linux_only,
    pytest.mark.skipif(os.environ.get("PYEMPEROR_GUEST_CHECK") != "1",
                       reason="only in the guest of vagrant/linux/guest-check.sh (restarts pyemperor.service)"),
]

UNIT = "pyemperor.service"
UNIT_FILE = Path("/etc/systemd/system") / UNIT
DROPIN = Path("/etc/systemd/system/pyemperor.service.d/zz-guest-check.conf")
CONTROL = "/run/emperor/control.sock"
CGROUP = Path("/sys/fs/cgroup")
EMPEROR = Path(sys.executable).parent / "emperor"

APP = '''
import os

def application(environ, start_response):
    path = environ["PATH_INFO"]
    body = str(os.getpid()).encode()
    if path == "/cgroup":
        with open("/proc/self/cgroup") as handle:
            body = handle.read().encode()
    elif path == "/hog":
        hoard = []
        while True:
            hoard.append(b"x" * (1 << 20))  # written, so really resident
    elif path == "/forkbomb":
        count = 0
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                import time
                time.sleep(5)
                os._exit(0)
            count += 1
        body = str(count).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def systemctl(*args: str) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"systemctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def show(prop: str) -> str:
    return systemctl("show", "-p", prop, "--value", UNIT).strip()


def status() -> dict:
    done = subprocess.run([str(Path(sys.executable).parent / "emperorctl"), "--control", CONTROL, "--json", "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def vassal(name: str) -> dict | None:
    return next((v for v in status()["vassals"] if v["name"] == name), None)


def cgroup_of(port: int) -> Path:
    """The v2 cgroup that the vassal's worker names in /proc/self/cgroup."""
    code, body = http_get(port, "/cgroup", timeout=30)
    assert code == 200
    line = next(x for x in body.decode().splitlines() if x.startswith("0::"))
    return CGROUP / line[3:].lstrip("/")


def vassal_ini(app: Path, port: int, extra: str = "") -> str:
    return f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n{extra}"


def beside_a_neighbour(vassals: Path, app: Path, name: str, extra: str) -> tuple[int, int]:
    """Vassal ``name`` with ``extra`` and a plain neighbour, both answering:
    (its port, the neighbour's)."""
    port, neighbour = free_port(), free_port()
    (vassals / "neighbour.ini").write_text(vassal_ini(app, neighbour))
    (vassals / name).write_text(vassal_ini(app, port, extra))
    wait_for(lambda: answers(port) and answers(neighbour), 90, what=f"{name} and its neighbour")
    return port, neighbour


def remove_all(vassals: Path) -> None:
    for path in vassals.glob("*.ini"):
        path.unlink()
    wait_for(lambda: not status()["vassals"], 60, what="vassals gone")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """pyemperor.service from contrib/, on a vassal dir of this module."""
    base = tmp_path_factory.mktemp("unit")
    vassals = base / "vassals"
    vassals.mkdir()
    app = base / "app.py"
    app.write_text(APP)
    was_active = subprocess.run(["systemctl", "is-active", "-q", UNIT]).returncode == 0
    saved = UNIT_FILE.read_bytes() if UNIT_FILE.exists() else None
    shutil.copy(ROOT / "contrib" / "systemd" / UNIT, UNIT_FILE)
    DROPIN.parent.mkdir(exist_ok=True)
    DROPIN.write_text(f"[Service]\nExecStart=\nExecStart={EMPEROR} --emperor-pidfile /run/pyemperor.pid {vassals}\n")
    try:
        systemctl("daemon-reload")
        systemctl("restart", UNIT)
        wait_for(lambda: os.path.exists(CONTROL) and status(), 60, what="the emperor under systemd")
        yield vassals, app
    finally:
        subprocess.run(["systemctl", "stop", UNIT], timeout=120)
        DROPIN.unlink(missing_ok=True)
        if saved is not None:
            UNIT_FILE.write_bytes(saved)
        subprocess.run(["systemctl", "daemon-reload"], timeout=60)
        if was_active:
            subprocess.run(["systemctl", "start", UNIT], timeout=120)


def test_the_emperor_moves_into_a_leaf_of_its_delegated_unit(service):
    pid = int(show("MainPID"))
    assert pid > 0
    unit_cgroup = show("ControlGroup")
    with open(f"/proc/{pid}/cgroup") as handle:
        assert handle.read() == f"0::{unit_cgroup}/pyemperor.{pid}.emperor\n"
    assert status()["emperor"]["tracking"] == str(CGROUP / unit_cgroup.lstrip("/") / f"pyemperor.{pid}")
    journal = subprocess.run(["journalctl", "-u", UNIT, "-b", "--no-pager", "-o", "cat"], capture_output=True, text=True).stdout
    assert f"in its delegated cgroup {unit_cgroup}" in journal


def test_limits_are_exactly_in_the_cgroup_the_vassal_names(service):
    vassals, app = service
    port = free_port()
    (vassals / "limited.ini").write_text(vassal_ini(app, port, "memory-limit = 96M\npids-limit = 48\ncpu-limit = 0.5\n"))
    wait_for(lambda: answers(port), 90, what="the limited vassal")
    own = cgroup_of(port)
    assert own.name == "limited.ini"
    assert (own / "memory.max").read_text().strip() == str(96 << 20)
    assert (own / "memory.swap.max").read_text().strip() == "0"
    assert (own / "memory.oom.group").read_text().strip() == "1"
    assert (own / "pids.max").read_text().strip() == "48"
    assert (own / "cpu.max").read_text().strip() == "50000 100000"
    (vassals / "limited.ini").unlink()
    wait_for(lambda: vassal("limited.ini") is None, 60, what="the limited vassal gone")
    assert not own.exists()


def test_a_memory_hog_is_oom_killed_as_a_group_and_the_neighbour_answers(service):
    vassals, app = service
    hog, neighbour = beside_a_neighbour(vassals, app, "hog.ini", "memory-limit = 160M\n")
    group = cgroup_of(hog)
    before = {int(p) for p in (group / "cgroup.procs").read_text().split()}
    assert len(before) >= 3  # top, master, two workers (and more)
    first = vassal("hog.ini")["pid"]
    try:
        http_get(hog, "/hog", timeout=60)
    except OSError:
        pass
    v = wait_for(lambda: (x := vassal("hog.ini")) and x["last_exit"] and x, 60, what="the OOM reported")
    assert v["last_exit"]["reason"] == "oom"
    # The whole group went, not one random process of it.
    for pid in before:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert answers(neighbour)
    wait_for(lambda: (x := vassal("hog.ini"))["state"] == "ready" and x["pid"] != first, 90, what="the hog respawned")
    assert answers(neighbour)
    remove_all(vassals)


def test_a_fork_bomb_is_contained(service):
    vassals, app = service
    bomb, neighbour = beside_a_neighbour(vassals, app, "bomb.ini", "pids-limit = 24\n")
    group = cgroup_of(bomb)
    code, body = http_get(bomb, "/forkbomb", timeout=60)
    assert code == 200 and 0 < int(body) < 24
    assert int((group / "pids.current").read_text()) <= 24
    assert "max" in (group / "pids.events").read_text()
    assert answers(neighbour)
    remove_all(vassals)
    assert not group.exists()


def test_systemctl_reload_reloads_every_vassal(service):
    vassals, app = service
    ports = {f"r{i}.ini": free_port() for i in range(3)}
    for name, port in ports.items():
        (vassals / name).write_text(vassal_ini(app, port))
    for port in ports.values():
        wait_for(lambda p=port: answers(p), 90, what="vassals up")
    # Every process of a vassal before the reload; a reloaded one answers
    # from a worker that is not among them.
    before = {name: set((cgroup_of(port) / "cgroup.procs").read_text().split()) for name, port in ports.items()}
    main_pid = show("MainPID")
    systemctl("reload", UNIT)
    for name, port in ports.items():
        wait_for(lambda p=port, n=name: http_get(p)[1].decode() not in before[n], 90, what=f"{name} reloaded")
    assert show("MainPID") == main_pid  # the emperor itself stays
    remove_all(vassals)


def test_systemctl_stop_leaves_no_process_and_no_cgroup(service):
    vassals, app = service
    ports = [free_port() for _ in range(2)]
    for i, port in enumerate(ports):
        (vassals / f"s{i}.ini").write_text(vassal_ini(app, port, "pids-limit = 32\nmemory-limit = 128M\n"))
    for port in ports:
        wait_for(lambda p=port: answers(p), 90, what="vassals up")
    unit_cgroup = CGROUP / show("ControlGroup").lstrip("/")
    pids = [int(p) for d in unit_cgroup.rglob("cgroup.procs") for p in d.read_text().split()]
    assert len(pids) >= 1 + 2 * 4
    emperor = int(show("MainPID"))
    systemctl("stop", UNIT)
    assert show("ActiveState") == "inactive"
    assert show("Result") == "success"  # stopped by the emperor itself, nothing left to SIGKILL
    assert not unit_cgroup.exists()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} outlived the unit"
    for port in ports:
        assert not answers(port)
    assert not list(CGROUP.rglob(f"pyemperor.{emperor}*"))


def test_an_emperor_started_by_hand_gets_a_delegated_scope(tmp_path):
    """As an operator starting it from an ssh session: our cgroup (this test
    run's unit) holds other processes and is not delegated."""
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    app = tmp_path / "app.py"
    app.write_text(APP)
    port = free_port()
    (vassals / "limited.ini").write_text(vassal_ini(app, port, "memory-limit = 80M\npids-limit = 40\ncpu-limit = 0.25\n"))
    control = tmp_path / "control.sock"
    log = tmp_path / "emperor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(EMPEROR), "--control", str(control), str(vassals)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: answers(port), 90, what="the vassal of a hand-started emperor")
        with open(f"/proc/{proc.pid}/cgroup") as handle:
            where = handle.read().strip()
        scope = f"pyemperor-{proc.pid}.scope"
        assert where.endswith(f"/{scope}/pyemperor.{proc.pid}.emperor"), where
        assert f"a transient systemd scope {scope} with Delegate=yes" in log.read_text()
        own = cgroup_of(port)
        assert (own / "memory.max").read_text().strip() == str(80 << 20)
        assert (own / "pids.max").read_text().strip() == "40"
        assert (own / "cpu.max").read_text().strip() == "25000 100000"
        scope_dir = (CGROUP / where[3:].lstrip("/")).parent
    finally:
        proc.terminate()
        proc.wait(60)
    wait_for(lambda: not scope_dir.exists(), 30, what="the scope collected by systemd")
    assert subprocess.run(["systemctl", "is-active", "-q", scope]).returncode != 0
