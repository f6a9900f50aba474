"""cgroup v2: the emperor leaves its own (delegated) cgroup for a leaf, so
the vassals' parent can be given controllers, and comes back at exit. This
machine mounts v1 only: a directory stands in for the v2 tree, and the
writes to cgroup.procs are checked."""

from __future__ import annotations

from jails import tracking


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
