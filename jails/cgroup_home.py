"""Where the emperor keeps its vassals' cgroups on cgroup v2.

On the unified hierarchy a cgroup can hand controllers (memory, pids, cpu)
to children only if nothing else lives in it and the cgroup above has them
too. Under ``pyemperor.service`` (``Delegate=yes``) the emperor's own cgroup
is such a place. Started by hand from an ssh session, a cron job or a test
runner, it sits in a cgroup that systemd owns and that holds other
processes: there it gets a home of its own first, a transient systemd scope
with ``Delegate=yes`` (systemd enables the controllers on the way), or
without systemd a cgroup below the root.

Only at start: this may wait (a few hundred ms) for systemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

# What limits need; any of them the kernel lacks is simply not asked for.
CONTROLLERS = ("memory", "pids", "cpu")
SCOPE_PREFIX = "pyemperor-"
SCOPE_WAIT_SECONDS = 10.0


@dataclass
class Home:
    own: str  # our cgroup path (as /proc/self/cgroup names it) to build below
    how: str  # for the start line


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def _delegated_by_systemd(directory: str) -> bool:
    """systemd (since 251) marks the cgroups it delegates with an xattr."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(directory, name) == b"1":
                return True
        except OSError:
            continue
    return False


def wanted_controllers(mount: str) -> set[str]:
    return set(CONTROLLERS) & set(_read(os.path.join(mount, "cgroup.controllers")).split())


def problem(mount: str, own: str, pid: int) -> str | None:
    """Why ``own`` cannot hold the vassals' cgroups (None: it can)."""
    directory = os.path.join(mount, own.lstrip("/"))
    if _delegated_by_systemd(directory):
        return None
    others = [p for p in _read(os.path.join(directory, "cgroup.procs")).split() if p != str(pid)]
    if others:
        return f"{own} is not delegated and holds {len(others)} other process(es)"
    missing = wanted_controllers(mount) - set(_read(os.path.join(directory, "cgroup.controllers")).split())
    if missing:
        return f"{own} is not delegated and lacks the {', '.join(sorted(missing))} controller(s)"
    return None


def _own_unified(pid: int) -> str | None:
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _busctl_scope(name: str, pid: int) -> str | None:
    """Ask systemd for a transient scope holding ``pid``; None or the error."""
    # (root's, not from a PATH that the emperor's caller chose)
    busctl = next((p for p in ("/usr/bin/busctl", "/bin/busctl") if os.path.exists(p)), None) or shutil.which("busctl")
    if busctl is None:
        return "no busctl"
    call = [
        "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
        "StartTransientUnit", "ssa(sv)a(sa(sv))", name, "fail",
        "4", "PIDs", "au", "1", str(pid), "Delegate", "b", "true",
        "CollectMode", "s", "inactive-or-failed",
        "Description", "s", f"pyemperor emperor {pid} (started outside a delegated unit)",
        "0",
    ]
    errors = []
    # The system bus, or (no dbus-daemon) systemd's own socket, root only.
    for address in ([], ["--address=unix:path=/run/systemd/private"]):
        try:
            done = subprocess.run([busctl, *address, "--allow-interactive-authorization=no", "call", *call],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        if done.returncode == 0:
            return None
        errors.append(done.stderr.strip() or f"busctl exit {done.returncode}")
    return "; ".join(errors)


def find(mount: str, own: str, pid: int | None = None) -> Home:
    """A cgroup the emperor (``pid``, default ours) can build below."""
    pid = pid or os.getpid()
    if own == "/":
        return Home(own, "the root cgroup")
    why = problem(mount, own, pid)
    if why is None:
        return Home(own, f"its delegated cgroup {own}")
    if os.path.isdir("/run/systemd/system") and os.geteuid() == 0:  # (only root may ask for one)
        name = f"{SCOPE_PREFIX}{pid}.scope"
        error = _busctl_scope(name, pid)
        if error is None:
            deadline = time.monotonic() + SCOPE_WAIT_SECONDS
            while time.monotonic() < deadline:
                now = _own_unified(pid)
                if now is not None and now.endswith("/" + name):
                    return Home(now, f"a transient systemd scope {name} with Delegate=yes ({why})")
                time.sleep(0.02)
            error = f"not moved into {name} within {SCOPE_WAIT_SECONDS:g}s"
        why = f"{why}; no systemd scope: {error}"
    # No systemd (or it refused): a cgroup of our own below the root, which
    # may enable any controller for its children.
    return Home("/", f"a cgroup below the root ({why})")


def stale_scopes(mount: str, own: str) -> list[str]:
    """Scopes of other emperors beside ours (for the dead-emperor sweep)."""
    if not os.path.basename(own).startswith(SCOPE_PREFIX):
        return []
    parent = os.path.dirname(os.path.join(mount, own.lstrip("/")))
    found = []
    try:
        for entry in os.scandir(parent):
            if (entry.name.startswith(SCOPE_PREFIX) and entry.name.endswith(".scope")
                    and entry.path != os.path.join(mount, own.lstrip("/")) and entry.is_dir(follow_symlinks=False)):
                found.append(entry.path)
    except OSError:
        pass
    return found
