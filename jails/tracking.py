"""Tracking every process of a vassal, so that stopping it leaves nothing.

A process group is not enough (``setsid`` escapes it), so each vassal gets a
cgroup: on cgroup v2 in the unified tree, on v1 in the ``pids`` hierarchy
(any mounted v1 hierarchy works for tracking). Vassal cgroups live under the
emperor's own cgroup, in a directory named after the emperor's pid so that
two emperors never share one. Where no cgroup is writable (no root, no
cgroupfs) tracking falls back to the vassal's session and process group.

Nothing here blocks: ``kill`` signals what is there, and the caller polls
``is_empty`` from a timer.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

CGROUP_ROOT = "/sys/fs/cgroup"
V1_TRACKING_HIERARCHIES = ("pids", "memory", "cpu,cpuacct", "cpu", "systemd")


def _own_cgroup(hierarchy: str | None) -> str | None:
    """Our cgroup path in ``hierarchy`` (None: the v2 unified tree)."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if hierarchy is None and controllers == "":
            return path
        names = controllers.split(",")
        if hierarchy is not None and (controllers == hierarchy or hierarchy in names or f"name={hierarchy}" in names):
            return path
    return None


def detect() -> tuple[str, str] | None:
    """(mount dir, our cgroup path in it) of the tree to track vassals in."""
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        own = _own_cgroup(None)
        if own is not None:
            return CGROUP_ROOT, own
    for hierarchy in V1_TRACKING_HIERARCHIES:
        mount = os.path.join(CGROUP_ROOT, hierarchy)
        if os.path.isfile(os.path.join(mount, "cgroup.procs")):
            own = _own_cgroup(hierarchy.split(",")[0])
            if own is not None:
                return mount, own
    return None


@dataclass
class CgroupTree:
    """The emperor's directory of vassal cgroups."""

    base: str
    unified: bool

    @classmethod
    def create(cls, label: str) -> CgroupTree | None:
        found = detect()
        if found is None:
            return None
        mount, own = found
        unified = mount == CGROUP_ROOT
        base = os.path.join(mount, own.lstrip("/"), label)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            return None
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            _rmdir(base)
            return None
        return cls(base, unified)

    def vassal(self, name: str) -> VassalCgroup:
        safe = name.replace("/", "_")
        if safe.startswith("."):
            safe = "_" + safe
        return VassalCgroup(os.path.join(self.base, safe))

    def remove(self) -> None:
        try:
            children = [e.path for e in os.scandir(self.base) if e.is_dir()]
        except OSError:
            children = []
        for child in children:
            _rmdir(child)
        _rmdir(self.base)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


@dataclass
class VassalCgroup:
    path: str

    def prepare(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into this cgroup."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as handle:
            handle.write(str(pid or os.getpid()))

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as handle:
                return [int(line) for line in handle.read().split()]
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return []
            raise

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process in the cgroup; the count signalled."""
        kill_file = os.path.join(self.path, "cgroup.kill")
        if sig == signal.SIGKILL and os.path.exists(kill_file):
            try:
                with open(kill_file, "w") as handle:
                    handle.write("1")
                return len(self.pids())
            except OSError:
                pass
        count = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                count += 1
            except ProcessLookupError:
                pass
        return count

    def is_empty(self) -> bool:
        return not self.pids()

    def remove(self) -> bool:
        return _rmdir(self.path)


@dataclass
class ProcessGroupTracker:
    """Fallback without cgroups: the vassal's session leader is its top
    process, which ``setsid``s, so its process group holds what did not
    deliberately escape."""

    pgid: int

    def kill(self, sig: int = signal.SIGKILL) -> int:
        try:
            os.killpg(self.pgid, sig)
            return 1
        except (ProcessLookupError, PermissionError):
            return 0

    def is_empty(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return False
        except (ProcessLookupError, PermissionError):
            return True
