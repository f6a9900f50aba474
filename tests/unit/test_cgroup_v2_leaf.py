"""cgroup v2: the emperor leaves its own (delegated) cgroup for a leaf, so
the vassals' parent can be given controllers, and comes back at exit. This
machine mounts v1 only: a directory stands in for the v2 tree, and the
writes to cgroup.procs are checked."""

from __future__ import annotations

import os
import signal

import pytest

from jails import cgroup_home, tracking
from tests.helpers import wait_for


def fake_cgroupfs(monkeypatch):
    """A new dir gets its cgroup.procs, as in a cgroupfs."""
    real_makedirs = tracking.os.makedirs

    def makedirs(path, exist_ok=False):
        real_makedirs(path, exist_ok=exist_ok)
        open(f"{path}/cgroup.procs", "a").close()

    monkeypatch.setattr(tracking.os, "makedirs", makedirs)


def test_emperor_moves_into_a_leaf_and_back(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    own = root / "system.slice" / "pyemperor.service"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")  # (as Delegate=yes gives)
    monkeypatch.setattr(tracking, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(tracking, "_own_cgroup", lambda hierarchy: "/system.slice/pyemperor.service")
    fake_cgroupfs(monkeypatch)
    (own / "cgroup.procs").write_text("")
    tree = tracking.CgroupTree.create("pyemperor.42")
    assert tree is not None and tree.unified
    assert tree.base == str(own / "pyemperor.42")
    assert tree.own_leaf == str(own / "pyemperor.42.emperor")
    assert (own / "pyemperor.42.emperor" / "cgroup.procs").read_text() == "0"  # "0": the writing process moves
    for leaf in (own / "pyemperor.42", own / "pyemperor.42.emperor"):
        (leaf / "cgroup.procs").unlink()  # (a real cgroupfs dir is empty to rmdir)
    tree.remove()
    assert (own / "cgroup.procs").read_text() == "0"  # back home at exit
    assert not (own / "pyemperor.42.emperor").exists() and not (own / "pyemperor.42").exists()


def test_root_cgroup_needs_no_leaf(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "cgroup.procs").write_text("")
    monkeypatch.setattr(tracking, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(tracking, "_own_cgroup", lambda hierarchy: "/")
    fake_cgroupfs(monkeypatch)
    tree = tracking.CgroupTree.create("pyemperor.7")
    assert tree is not None and tree.own_leaf is None


# --- limits carried over to a zygote spare's cgroup ----------------------------

def test_limit_files_cover_every_limit_written(tmp_path):
    """copy_limits gives a spare's cgroup what LimitGroups.apply wrote: a limit
    file apply learns to write must be listed, or spawns through the spare
    would run without it."""
    for unified in (True, False):
        written: list[str] = []
        directory = tmp_path / f"v{2 if unified else 1}"
        directory.mkdir()
        (directory / "memory.swap.max").write_text("max\n")
        groups = tracking.LimitGroups({c: str(directory) for c in ("memory", "pids", "cpu")}, unified)
        real_write = groups._write

        def record(controller, name, value, real_write=real_write, written=written):
            written.append(name)
            real_write(controller, name, value)

        groups._write = record  # type: ignore[method-assign]
        groups.apply(tracking.Limits(memory=64 << 20, pids=16, cpu=0.5))
        assert written and set(written) <= set(tracking.LIMIT_FILES), (unified, written)
        order = [n for n in tracking.LIMIT_FILES if n in written]
        assert order == [n for n in dict.fromkeys(written)], "LIMIT_FILES must keep apply's order"


def test_copy_limits_overwrites_every_value(tmp_path):
    configured, spare = tmp_path / "vassal", tmp_path / ".spare-1-1"
    for directory in (configured, spare):
        directory.mkdir()
    (configured / "pids.max").write_text("16\n")
    (configured / "cpu.max").write_text("max 100000\n")
    (spare / "pids.max").write_text("max\n")
    (spare / "cpu.max").write_text("20000 100000\n")  # left by an earlier vassal's copy
    tracking.copy_limits(str(configured), str(spare))
    assert (spare / "pids.max").read_text() == "16"
    assert (spare / "cpu.max").read_text() == "max 100000"
    assert not (spare / "memory.max").exists()


# --- leftovers of SIGKILLed emperors --------------------------------------------

def test_looks_like_emperor():
    looks = tracking._looks_like_emperor
    assert looks(["/opt/pyemperor/bin/emperor", "/etc/vassals"])
    assert looks(["/opt/pyemperor/bin/python", "/opt/pyemperor/bin/emperor", "--emperor-pidfile", "/run/p"])
    assert looks(["python3", "-P", "-m", "emperor", "--control", "c.sock", "d"])
    assert looks(["python3", "-memperor.cli"])
    assert not looks(["python3", "-P", "-m", "emperor.zygote", "5"])
    assert not looks(["python3", "-m", "vassal", "--ini", "/srv/emperor"])
    assert not looks(["sleep", "30"])
    assert not looks([])


def _alive_pids(monkeypatch):
    """As the kernel does: cgroup.procs lists no process that has died."""
    import os

    def pids(self):
        try:
            listed = [int(p) for p in open(os.path.join(self.path, "cgroup.procs")).read().split()]
        except FileNotFoundError:
            return []
        alive = []
        for pid in listed:
            try:
                state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                alive.append(pid)
        return alive

    monkeypatch.setattr(tracking.VassalCgroup, "pids", pids)

    def rmdir(path: str) -> bool:  # a cgroupfs dir goes with its interface files
        if not os.path.isdir(path):
            return True
        for entry in os.scandir(path):
            if entry.is_file():
                os.unlink(entry.path)
        try:
            os.rmdir(path)
        except OSError:
            return False
        return True

    monkeypatch.setattr(tracking, "_rmdir", rmdir)


def test_stale_cgroups_of_dead_emperors_are_killed_and_removed(tmp_path, monkeypatch):
    import os
    import subprocess

    root = tmp_path / "cgroup"
    own = root / "system.slice" / "pyemperor.service"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.procs").write_text("")
    monkeypatch.setattr(tracking, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(tracking, "_own_cgroup", lambda hierarchy: "/system.slice/pyemperor.service")
    fake_cgroupfs(monkeypatch)
    _alive_pids(monkeypatch)
    tree = tracking.CgroupTree.create(f"pyemperor.{os.getpid()}")
    assert tree is not None

    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # no such process any more
    escaped = subprocess.Popen(["sleep", "30"])  # a dead emperor's vassal's grandchild
    live_emperor = subprocess.Popen(["emperor", "30"], executable="/bin/sleep")
    live_vassal = subprocess.Popen(["sleep", "30"])
    reused = subprocess.Popen(["sleep", "30"])  # a pid reused by something else
    ours_stale = subprocess.Popen(["sleep", "30"])  # an earlier emperor that had our pid
    # An emperor embedded in another program: not named like one, but the
    # parent of the vassal in its tree.
    pidfile = tmp_path / "embedded-vassal"
    embedded = subprocess.Popen(["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"])
    procs = [escaped, live_emperor, live_vassal, reused, ours_stale, embedded]
    try:
        embedded_vassal = int(wait_for(lambda: pidfile.read_text().strip(), 5, what="the embedded emperor's vassal"))

        def cgroup(path, *pids):
            path.mkdir(parents=True, exist_ok=True)
            (path / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
            return path

        cgroup(own / f"pyemperor.{dead}" / "app.ini", escaped.pid)
        (own / f"pyemperor.{dead}" / "cgroup.kill").write_text("")
        cgroup(own / f"pyemperor.{dead}")
        cgroup(own / f"pyemperor.{dead}.emperor")
        cgroup(own / f"pyemperor.{live_emperor.pid}" / "app.ini", live_vassal.pid)
        cgroup(own / f"pyemperor.{reused.pid}" / "app.ini")
        cgroup(own / f"pyemperor.{os.getpid()}" / "old.ini", ours_stale.pid)
        cgroup(own / f"pyemperor.{embedded.pid}" / "app.ini", embedded_vassal)
        cgroup(own / "unrelated" / "pyemperor.1")
        lines: list[str] = []
        tracking.reap_stale(tree, lines.append)

        assert escaped.wait(2) == -9 and ours_stale.wait(2) == -9
        assert live_emperor.poll() is None and live_vassal.poll() is None and reused.poll() is None and embedded.poll() is None
        os.kill(embedded_vassal, 0)
        assert sorted(p.name for p in own.iterdir() if p.is_dir()) == sorted(
            [f"pyemperor.{live_emperor.pid}", f"pyemperor.{embedded.pid}", f"pyemperor.{os.getpid()}", f"pyemperor.{os.getpid()}.emperor", "unrelated"])
        assert not (own / f"pyemperor.{os.getpid()}" / "old.ini").exists()
        assert (own / f"pyemperor.{live_emperor.pid}" / "app.ini").is_dir()
        assert any(f"pyemperor.{dead} of dead emperor {dead} (killed 1 process(es): {escaped.pid})" in line for line in lines), lines
        assert any(f"pyemperor.{reused.pid} of dead emperor {reused.pid}" in line for line in lines), lines
        assert not any(f"pyemperor.{live_emperor.pid}" in line for line in lines), lines
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_a_sigkill_bars_forks_until_the_next_prepare(tmp_path):
    """Read-then-signal loses to a fork loop (one filled the host's pid
    space): a SIGKILL of a vassal's cgroup first sets pids.max to 0, and the
    next spawn's prepare() lifts it; a cgroup without pids.max gets none."""
    import signal

    from jails.tracking import VassalCgroup

    group = VassalCgroup(str(tmp_path / "v"))
    group.prepare()
    assert not (tmp_path / "v" / "pids.max").exists()  # not the pids controller's: nothing made
    (tmp_path / "v" / "pids.max").write_text("max")
    (tmp_path / "v" / "cgroup.procs").write_text("")
    group.kill(signal.SIGKILL)
    assert (tmp_path / "v" / "pids.max").read_text() == "0"
    group.prepare()
    assert (tmp_path / "v" / "pids.max").read_text().startswith("max")


# --- a home of its own when started outside a delegated cgroup -----------------

def _stand_in(tmp_path, procs: str, controllers: str):
    root = tmp_path / "cgroup"
    own = root / "user.slice" / "session-1.scope"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.controllers").write_text(controllers)
    (own / "cgroup.procs").write_text(procs)
    return root, own


def test_a_shared_cgroup_is_not_a_home(tmp_path):
    root, _ = _stand_in(tmp_path, "42\n77\n", "cpu memory pids\n")
    why = cgroup_home.problem(str(root), "/user.slice/session-1.scope", 42)
    assert why == "/user.slice/session-1.scope is not delegated and holds 1 other process(es)"


def test_a_cgroup_without_the_controllers_is_not_a_home(tmp_path):
    root, _ = _stand_in(tmp_path, "42\n", "memory pids\n")
    why = cgroup_home.problem(str(root), "/user.slice/session-1.scope", 42)
    assert why == "/user.slice/session-1.scope is not delegated and lacks the cpu controller(s)"


def test_a_delegated_cgroup_is_a_home_whatever_it_holds(tmp_path):
    root, own = _stand_in(tmp_path, "42\n77\n", "")
    try:
        os.setxattr(own, "trusted.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"no trusted xattrs on {tmp_path}: {exc}")
    assert cgroup_home.problem(str(root), "/user.slice/session-1.scope", 42) is None
    assert cgroup_home.find(str(root), "/user.slice/session-1.scope", 42).own == "/user.slice/session-1.scope"


def test_without_systemd_the_home_is_below_the_root(tmp_path, monkeypatch):
    root, _ = _stand_in(tmp_path, "42\n77\n", "cpu memory pids\n")
    real_isdir = os.path.isdir
    monkeypatch.setattr(cgroup_home.os.path, "isdir", lambda p: False if p == "/run/systemd/system" else real_isdir(p))
    home = cgroup_home.find(str(root), "/user.slice/session-1.scope", 42)
    assert home.own == "/"
    assert home.how == "a cgroup below the root (/user.slice/session-1.scope is not delegated and holds 1 other process(es))"


def test_dead_emperors_scopes_are_swept_too(tmp_path):
    slice_ = tmp_path / "system.slice"
    for name in ("pyemperor-10.scope", "pyemperor-11.scope", "ssh.service", "pyemperor-12.service"):
        (slice_ / name).mkdir(parents=True)
    found = cgroup_home.stale_scopes(str(tmp_path), "/system.slice/pyemperor-10.scope")
    assert found == [str(slice_ / "pyemperor-11.scope")]
    assert cgroup_home.stale_scopes(str(tmp_path), "/system.slice/pyemperor.service") == []
