"""Interoperability with the real uWSGI (``pip install uwsgi``), both ways:
a uWSGI instance as our vassal (``emperor-wrapper``), and our ``vassal``
under a uWSGI emperor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import HELLO, TEST_TAG, answers, free_port, kill_tree, wait_for

BIN = Path(sys.executable).parent
UWSGI = shutil.which("uwsgi", path=str(BIN)) or shutil.which("uwsgi")
VASSAL = shutil.which("vassal", path=str(BIN))

pytestmark = [pytest.mark.uwsgi, pytest.mark.skipif(UWSGI is None, reason="uWSGI is not installed (pip install uwsgi)")]


def uwsgi_ini(port: int) -> str:
    return f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nwsgi-file = {HELLO}\nmaster = true\nprocesses = 1\n"


def test_uwsgi_as_our_vassal(start_emperor):
    emp = start_emperor("--emperor-wrapper", UWSGI)
    port = free_port()
    (emp.dir / "u.ini").write_text(uwsgi_ini(port))
    wait_for(lambda: answers(port), 20, what="uWSGI vassal answering")
    v = wait_for(lambda: (x := emp.vassal("u.ini")) and x["state"] == "ready" and x["loyal"] and x, 20, what="ready and loyal")
    assert v["wrapped"] is True
    pid = v["pid"]
    assert "uwsgi" in " ".join(psutil.Process(pid).cmdline())
    os.utime(emp.dir / "u.ini")  # uWSGI reloads itself on byte 1, keeping its pid
    wait_for(lambda: "received message 1 from emperor" in emp.log_text(), 10, what="reload byte delivered")
    v = emp.wait_state("u.ini", "ready")
    assert v["pid"] == pid
    wait_for(lambda: answers(port), 20, what="answering after reload")
    os.unlink(emp.dir / "u.ini")
    wait_for(lambda: emp.vassal("u.ini") is None, 20, what="uWSGI vassal removed")
    assert answers(port) is None


@pytest.fixture
def uwsgi_emperor(tmp_path):
    procs = []

    def start(vassal_dir: Path) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / "uwsgi-emperor.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                [UWSGI, "--emperor", str(vassal_dir), "--emperor-wrapper", VASSAL, "--emperor-freq", "1"],
                stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path,
                env={**os.environ, "PYTEST_TAG": TEST_TAG},
            )
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait(5)


def test_our_vassal_under_uwsgi_emperor(uwsgi_emperor, tmp_path):
    vassals = tmp_path / "uvassals"
    vassals.mkdir()
    port = free_port()
    cfg = vassals / "ours.ini"
    cfg.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nwsgi-file = {HELLO}\nprocesses = 1\n")
    proc, log = uwsgi_emperor(vassals)
    first = wait_for(lambda: answers(port), 20, what="our vassal answering under uWSGI")
    wait_for(lambda: "vassal ours.ini is now loyal" in log.read_text(), 10, what="uWSGI sees loyalty")
    emperor = psutil.Process(proc.pid)
    top = [c for c in emperor.children() if "ours.ini" in " ".join(c.cmdline())]
    assert len(top) == 1
    top_pid = top[0].pid
    os.utime(cfg, (os.stat(cfg).st_atime, os.stat(cfg).st_mtime + 5))
    wait_for(lambda: "reload the uwsgi instance ours.ini" in log.read_text(), 10, what="uWSGI sends reload")
    second = wait_for(lambda: (b := answers(port)) and b != first and b, 15, what="new worker after reload")
    assert second != first
    assert psutil.pid_exists(top_pid)  # the top process kept its pid across the reload
    tree = [top_pid, *[p.pid for p in psutil.Process(top_pid).children(recursive=True)]]
    os.unlink(cfg)
    wait_for(lambda: "removed uwsgi instance ours.ini" in log.read_text(), 15, what="uWSGI removes the vassal")
    wait_for(lambda: answers(port) is None, 10, what="port closed")
    for pid in tree:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
