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
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from bedrock.proc import kill_quietly
from jails import cgroup_home

CGROUP_ROOT = "/sys/fs/cgroup"
V1_TRACKING_HIERARCHIES = ("pids", "memory", "cpu,cpuacct", "cpu", "systemd")


def join_cgroups(procs_files: list[str]) -> None:
    """This process into each cgroup whose cgroup.procs file is named."""
    for procs in procs_files:
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))


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
    # v2: where the emperor moved itself (see leave_for_leaf), and from where.
    own_leaf: str | None = None
    own_dir: str | None = None
    # v2: the cgroup it was started in, to go back to at exit.
    started_in: str | None = None
    # Where the tree is and why, for the start line (v2: see cgroup_home).
    how: str = ""

    @classmethod
    def create(cls, label: str) -> CgroupTree | None:
        found = detect()
        if found is None:
            return None
        mount, own = found
        unified = mount == CGROUP_ROOT
        started_in = now = own
        how = ""
        if unified:
            home = cgroup_home.find(mount, own)
            own, how = home.own, home.how
            now = _own_cgroup(None)  # (a transient scope has moved us)
        base = os.path.join(mount, own.lstrip("/"), label)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            return None
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            _rmdir(base)
            return None
        tree = cls(base, unified, how=how)
        if unified and now != "/":
            tree.started_in = os.path.join(mount, started_in.lstrip("/"))
            tree.leave_for_leaf(os.path.join(mount, own.lstrip("/")), label)
        return tree

    def leave_for_leaf(self, own_dir: str, label: str) -> None:
        """cgroup v2 lets a cgroup hand controllers (memory, pids, cpu) to
        its children only if it holds no process itself: the emperor moves
        from its own cgroup (a delegated systemd service's) into a leaf
        beside the vassals', so that limits can be enabled. Best effort: if
        it fails, limits fail later with a message naming the cgroup."""
        leaf = os.path.join(own_dir, f"{label}.emperor")
        try:
            os.makedirs(leaf, exist_ok=True)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as handle:
                handle.write("0")
        except OSError:
            _rmdir(leaf)
            return
        self.own_leaf, self.own_dir = leaf, own_dir

    def vassal(self, name: str) -> VassalCgroup:
        safe = name.replace("/", "_")
        if safe.startswith("."):
            safe = "_" + safe
        return VassalCgroup(os.path.join(self.base, safe))

    def remove(self) -> None:
        """At emperor exit (blocking is fine then): whatever is left in a
        child cgroup (a zygote's spare) is killed before the dirs go."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                children = [e.path for e in os.scandir(self.base) if e.is_dir()]
            except OSError:
                children = []
            for child in children:
                group = VassalCgroup(child)
                while not group.is_empty() and time.monotonic() < deadline:
                    group.kill(signal.SIGKILL)
                    time.sleep(0.01)
                _rmdir(child)
            # A spare being made as we go may add a dir: look again.
            if _rmdir(self.base) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if self.own_leaf is not None and self.own_dir is not None:
            # Back where we were started, so the leaf can go (and a transient
            # scope of ours, now empty, is collected by systemd at once).
            for home in dict.fromkeys(d for d in (self.started_in, self.own_dir) if d):
                try:
                    with open(os.path.join(home, "cgroup.procs"), "w") as handle:
                        handle.write("0")
                    break
                except OSError:
                    continue
            _rmdir(self.own_leaf)


# --- leftovers of dead emperors -------------------------------------------------

# The dirs an emperor makes beside its own cgroup: its vassals' tree, and on v2
# the leaf it moves itself into (see CgroupTree.leave_for_leaf).
EMPEROR_DIR = re.compile(r"pyemperor\.(\d+)(\.emperor)?")
STALE_KILL_SECONDS = 2.0


def _looks_like_emperor(argv: list[str]) -> bool:
    """``emperor ...``, ``python [opts] .../bin/emperor ...`` or ``python
    [opts] -m emperor ...``; a zygote (``-m emperor.zygote``) is not one."""
    if not argv:
        return False
    if os.path.basename(argv[0]) == "emperor":
        return True
    words = iter(argv[1:])
    for word in words:
        if word == "-m":
            return next(words, "") in ("emperor", "emperor.cli", "emperor.__main__")
        if word.startswith("-m"):
            return word[2:] in ("emperor", "emperor.cli", "emperor.__main__")
        if word in ("-c", "-W", "-X", "--check-hash-based-pycs"):
            next(words, "")
            continue
        if not word.startswith("-"):
            return os.path.basename(word) == "emperor"
    return False


def emperor_alive(pid: int) -> bool:
    """Whether ``pid`` may be the emperor that named a ``pyemperor.<pid>``
    dir. A pid that exists but runs something else was reused after that
    emperor died; anything we cannot read counts as alive, so that a live
    emperor's vassals are never killed by mistake."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    state = stat[stat.rfind(b")") + 2:][:1]
    if state in (b"Z", b"X"):
        return False  # killed, not yet reaped by its parent
    argv = [word.decode("utf-8", "replace") for word in cmdline.split(b"\0") if word]
    if _looks_like_emperor(argv):
        return True
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            # v2: an emperor (embedded in another program, say) in its own leaf.
            return f"/pyemperor.{pid}.emperor\n" in handle.read()
    except OSError:
        return False


def _parent_of_any(pid: int, path: str) -> bool:
    """Whether ``pid`` is the parent of a process in ``path``'s subtree: the
    vassals of a live emperor are its children (it is their subreaper),
    those of a dead one were re-parented when it died."""
    for directory in _subtree(path):
        for child in VassalCgroup(directory).pids():
            try:
                with open(f"/proc/{child}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) > 1 and fields[1] == str(pid).encode():
                return True
    return False


def _subtree(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (rmdir order)."""
    found: list[str] = []
    for directory, _, _ in os.walk(path, topdown=False):
        found.append(directory)
    return found


def _kill_subtree(path: str, killed: set[int]) -> bool:
    """SIGKILL what is in ``path``'s subtree; True once it is empty."""
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        try:
            with open(kill_file, "w") as handle:
                handle.write("1")  # v2: the kernel kills the whole subtree, forks in flight included
        except OSError:
            pass
    empty = True
    for directory in _subtree(path):
        for pid in VassalCgroup(directory).pids():
            empty = False
            if kill_quietly(pid, signal.SIGKILL):
                killed.add(pid)
    return empty


def _stale_parents(tree: CgroupTree) -> list[str]:
    """Where dead emperors' dirs can be: beside our own vassals' tree, and on
    v1 beside our dirs in the limit hierarchies."""
    parents = [os.path.dirname(tree.base)]
    if tree.unified:
        own = os.path.dirname(tree.base)[len(CGROUP_ROOT):] or "/"
        parents += cgroup_home.stale_scopes(CGROUP_ROOT, own)  # dead emperors' transient scopes
    else:
        for controller, hierarchy in V1_LIMIT_HIERARCHIES.items():
            own = _own_cgroup(controller)
            if own is not None:
                parents.append(os.path.join(CGROUP_ROOT, hierarchy, own.lstrip("/")))
    found: list[str] = []
    for parent in parents:
        real = os.path.realpath(parent)
        if real not in found and os.path.isdir(real):
            found.append(real)
    return found


def reap_stale(tree: CgroupTree | None, log: Callable[[str], None], seconds: float = STALE_KILL_SECONDS) -> None:
    """At emperor start: an emperor that was SIGKILLed left its cgroups, and
    whatever escaped its vassals' stop (a setsid'd, SIGTERM-ignoring
    grandchild keeping a port) still runs in them. Kill it all and remove
    the dirs, for every ``pyemperor.<pid>`` of a dead emperor beside ours;
    in our own dir (a dead emperor had our pid: containers restart with the
    same one) only what is below it. Bounded by ``seconds``: what will not
    die by then is logged and left."""
    if tree is None:
        return
    ours = os.getpid()
    doomed: dict[str, int] = {}  # dir -> the dead emperor's pid
    for parent in _stale_parents(tree):
        try:
            entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            match = EMPEROR_DIR.fullmatch(entry.name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid != ours:
                if not emperor_alive(pid) and not _parent_of_any(pid, entry.path):
                    doomed[entry.path] = pid
            elif match.group(2) is None:  # (our own leaf holds us: never touched)
                try:
                    doomed.update((e.path, pid) for e in os.scandir(entry.path) if e.is_dir(follow_symlinks=False))
                except OSError:
                    pass
    if not doomed:
        return
    killed: dict[str, set[int]] = {path: set() for path in doomed}
    deadline = time.monotonic() + seconds
    pending = list(doomed)
    while True:
        pending = [path for path in pending if not _kill_subtree(path, killed[path])]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for path, pid in doomed.items():
        what = f"stale cgroup {path} of dead emperor {pid}"
        if killed[path]:
            what += f" (killed {len(killed[path])} process(es): {' '.join(map(str, sorted(killed[path])))})"
        if path in pending:
            log(f"{what}: still not empty after {seconds:g}s, left in place")
        elif all([_rmdir(directory) for directory in _subtree(path)]):
            log(f"removed {what}")
        else:
            log(f"{what}: emptied but cannot be removed")


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
        # A kill of the previous instance may have left forks barred (kill()).
        self._set_pids_max("max")

    def _set_pids_max(self, value: str) -> bool:
        try:
            fd = os.open(os.path.join(self.path, "pids.max"), os.O_WRONLY | os.O_TRUNC)  # never made: only the controller's own
        except OSError:
            return False  # no pids controller here
        try:
            os.write(fd, value.encode())
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

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
        if sig == signal.SIGKILL:
            # Without cgroup.kill, killing is read-then-signal: a fork loop
            # outruns it (one filled the host's pid space). No more forks,
            # then the kill; the next prepare() lifts the bar.
            self._set_pids_max("0")
        count = 0
        for pid in self.pids():
            count += kill_quietly(pid, sig)
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


# --- resource limits ----------------------------------------------------------

V1_LIMIT_HIERARCHIES = {"memory": "memory", "pids": "pids", "cpu": "cpu"}
CPU_PERIOD_US = 100000


class LimitError(Exception):
    pass


@dataclass
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpu: float | None = None  # cores

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory, self.pids, self.cpu))


@dataclass
class LimitGroups:
    """A vassal's limit cgroups: one dir on v2, one per controller on v1."""

    dirs: dict[str, str]  # controller -> cgroup dir
    unified: bool
    oom_baseline: int = 0

    def procs_files(self) -> list[str]:
        return sorted({os.path.join(d, "cgroup.procs") for d in self.dirs.values()})

    def _write(self, controller: str, name: str, value: str) -> None:
        path = os.path.join(self.dirs[controller], name)
        try:
            with open(path, "w") as handle:
                handle.write(value)
        except OSError as exc:
            raise LimitError(f"cannot set {path} to {value}: {exc.strerror}") from None

    def apply(self, limits: Limits) -> None:
        if limits.memory is not None:
            if self.unified:
                self._write("memory", "memory.max", str(limits.memory))
                if os.path.exists(os.path.join(self.dirs["memory"], "memory.swap.max")):
                    self._write("memory", "memory.swap.max", "0")
                # An OOM kill takes the whole vassal, not one random process.
                self._write("memory", "memory.oom.group", "1")
            else:
                self._write("memory", "memory.limit_in_bytes", str(limits.memory))
        if limits.pids is not None:
            self._write("pids", "pids.max", str(limits.pids))
        if limits.cpu is not None:
            quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
            if self.unified:
                self._write("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}")
            else:
                self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
                self._write("cpu", "cpu.cfs_quota_us", str(quota))
        self.oom_baseline = self.oom_kills()

    def oom_kills(self) -> int:
        """The kernel's count of OOM kills in this vassal's memory cgroup."""
        directory = self.dirs.get("memory")
        if directory is None:
            return 0
        name = "memory.events" if self.unified else "memory.oom_control"
        try:
            with open(os.path.join(directory, name)) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            pass
        return 0

    def oom_eventfd(self) -> int | None:
        """v1: an eventfd that becomes readable when the cgroup hits OOM."""
        directory = self.dirs.get("memory")
        if self.unified or directory is None or not hasattr(os, "eventfd"):
            return None
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(directory, "cgroup.event_control"), "w") as handle:
                handle.write(f"{efd} {control}")
        except OSError:
            os.close(efd)
            return None
        finally:
            os.close(control)
        return efd

    def remove(self) -> None:
        for directory in set(self.dirs.values()):
            _rmdir(directory)


# Every file LimitGroups.apply writes, in its order (v1 wants the cpu period
# before the quota): what a cgroup standing in for a configured one must be
# given (a zygote spare's, see emperor/zygote.py Spare.take).
LIMIT_FILES = (
    "memory.max", "memory.swap.max", "memory.oom.group", "memory.limit_in_bytes",
    "pids.max",
    "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.max",
)


def copy_limits(source: str, target: str) -> None:
    """Give cgroup ``target`` the limits of ``source`` (a sibling, so the same
    files exist in both). Every value is written, defaults too: ``target``
    keeps nothing of an earlier copy. Raises OSError."""
    for name in LIMIT_FILES:
        try:
            with open(os.path.join(source, name)) as handle:
                value = handle.read().strip()
        except FileNotFoundError:
            continue  # not a controller of this hierarchy (v1) or not enabled here (v2)
        with open(os.path.join(target, name), "w") as handle:
            handle.write(value)


def limit_groups(tree: CgroupTree, name: str, limits: Limits) -> LimitGroups:
    """Create (or reuse) the cgroups that hold ``limits`` for vassal ``name``."""
    wanted = [c for c, v in (("memory", limits.memory), ("pids", limits.pids), ("cpu", limits.cpu)) if v is not None]
    vassal_dir = tree.vassal(name).path
    if tree.unified:
        parent = os.path.dirname(tree.base)
        for directory in (parent, tree.base):
            control = os.path.join(directory, "cgroup.subtree_control")
            try:
                with open(control) as handle:
                    missing = [c for c in wanted if c not in handle.read().split()]
                # A write takes the kernel's cgroup lock and walks the subtree
                # even when nothing changes: only for what is not enabled yet.
                if missing:
                    with open(control, "w") as handle:
                        handle.write(" ".join(f"+{c}" for c in missing))
            except OSError as exc:
                raise LimitError(f"cannot enable the {', '.join(wanted)} controller(s) in {directory}: {exc.strerror}"
                                 " (the emperor needs a delegated cgroup; see the systemd unit)") from None
        return LimitGroups({c: vassal_dir for c in wanted}, True)
    dirs: dict[str, str] = {}
    label = os.path.basename(tree.base)
    leaf = os.path.basename(vassal_dir)
    for controller in wanted:
        mount = os.path.join(CGROUP_ROOT, V1_LIMIT_HIERARCHIES[controller])
        if not os.path.isfile(os.path.join(mount, "cgroup.procs")):
            raise LimitError(f"{controller}-limit: no cgroup v1 {controller} hierarchy at {mount}")
        own = _own_cgroup(controller)
        if own is None:
            raise LimitError(f"{controller}-limit: this process is in no {controller} cgroup")
        directory = os.path.join(mount, own.lstrip("/"), label, leaf)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise LimitError(f"cannot create {directory}: {exc.strerror}") from None
        dirs[controller] = directory
    return LimitGroups(dirs, False)


def remove_v1_bases(label: str) -> None:
    """At emperor exit: the per-emperor dirs in the v1 limit hierarchies."""
    for controller, hierarchy in V1_LIMIT_HIERARCHIES.items():
        own = _own_cgroup(controller)
        if own is None:
            continue
        base = os.path.join(CGROUP_ROOT, hierarchy, own.lstrip("/"), label)
        if os.path.isdir(base):
            for entry in os.scandir(base):
                if entry.is_dir():
                    _rmdir(entry.path)
            _rmdir(base)
