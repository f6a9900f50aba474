"""A tenant's vassal against the emperor's lifecycle: what escapes its stop
when the emperor is SIGKILLed is killed by the next emperor, and a hook that
hangs forever is cut off by hook-timeout."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import answers, free_port, wait_for
from tests.hostile.tenant import Tenant

pytestmark = [pytest.mark.linux_only]

CGROUP_ROOT = Path("/sys/fs/cgroup")

ESCAPE_APP = r'''
import os, signal, time

PIDFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grandchild.pid")

def escape():
    """setsid, double fork, SIGTERM ignored: out of the vassal's process
    group and session, holding every fd of the app master (its listening
    socket too)."""
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            with open(PIDFILE + ".new", "w") as handle:
                handle.write(str(os.getpid()))
            os.rename(PIDFILE + ".new", PIDFILE)
            time.sleep(600)
        os._exit(0)
    os.waitpid(child, 0)

if not os.path.exists(PIDFILE):
    escape()

def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
'''


def drop(tenant: Tenant, directory: Path, name: str, text: str) -> Path:
    """The tenant's file, complete and owned before the emperor sees it."""
    staged = tenant.write(directory / f".{name}.staged", text)
    target = directory / name
    os.rename(staged, target)
    return target


def emperor_dirs(pid: int) -> list[Path]:
    """The cgroup dirs emperor ``pid`` made (pyemperor.<pid>, and on v2 the
    leaf pyemperor.<pid>.emperor), in every hierarchy it is in."""
    found: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mount = CGROUP_ROOT / (controllers.removeprefix("name=") if controllers else "")
        own = mount / path.lstrip("/")
        for parent in (own, own.parent):
            for name in (f"pyemperor.{pid}", f"pyemperor.{pid}.emperor"):
                if (parent / name).is_dir() and (parent / name) not in found:
                    found.append(parent / name)
    return found


def procs_below(directory: Path) -> list[int]:
    pids: list[int] = []
    for sub, _, _ in os.walk(directory):
        try:
            pids += [int(p) for p in Path(sub, "cgroup.procs").read_text().split()]
        except OSError:
            pass
    return pids


@pytest.fixture
def stale() -> Iterator[tuple[list[Path], list[int]]]:
    """Cgroup dirs and processes a test expects the next emperor to clean:
    removed here if it did not (also when the test fails)."""
    dirs: list[Path] = []
    pids: list[int] = []
    yield dirs, pids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)] + [p for d in dirs if d.exists() for p in procs_below(d)]
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for directory in dirs:
            for sub, _, _ in os.walk(directory, topdown=False) if directory.exists() else ():
                try:
                    os.rmdir(sub)
                except OSError:
                    pass
        if not any(d.exists() for d in dirs):
            break
        time.sleep(0.05)


@pytest.fixture
def own_cgroup() -> Iterator[None]:
    """This test's emperors in cgroups of their own: an emperor cleans dead
    emperors' leftovers beside its own cgroup, so any emperor started on the
    machine meanwhile (another test's) would clean ours first, and ours would
    clean theirs."""
    moved: list[tuple[Path, Path]] = []
    name = f"pyemperor-test-{os.getpid()}-{time.monotonic_ns()}"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else None
        else:
            mount = CGROUP_ROOT / controllers if {"pids", "memory", "cpu"} & set(controllers.split(",")) else None
        home = mount / path.lstrip("/") if mount else None
        if home is None or not (home / "cgroup.procs").exists():
            continue
        child = home / name
        child.mkdir()
        moved.append((home, child))
        (child / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield
    finally:
        for home, _ in moved:
            (home / "cgroup.procs").write_text(str(os.getpid()))
        deadline = time.monotonic() + 10
        for _, child in moved:
            while child.exists():
                try:
                    child.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_9_of_the_emperor_leaves_nothing_to_the_next(tenant: Tenant, hostile_base: Path, own_cgroup, start_emperor, stale) -> None:
    dirs, pids = stale
    vassals = hostile_base / "vassals"
    app = tenant.write(tenant.home / "escape.py", ESCAPE_APP)
    port = free_port()
    emp = start_emperor("--emperor-tyrant", vassal_dir=vassals)
    # memory-limit: the vassal has dirs in a second v1 hierarchy too.
    drop(tenant, vassals, "escape.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\nmemory-limit = 256M\n")
    wait_for(lambda: answers(port), 20, what="the vassal answering")
    grandchild = int(wait_for(lambda: (tenant.home / "grandchild.pid").read_text(), 10, what="the grandchild's pid"))
    pids.append(grandchild)
    old = emp.proc.pid
    dirs += emperor_dirs(old)
    assert dirs, "the emperor made no cgroup"
    zygote = [c.pid for c in psutil.Process(old).children() if "zygote" in " ".join(c.cmdline())]
    top = emp.vassal("escape.ini")["pid"]
    pids += [*zygote, top]

    # The whole emperor dies at once, the vassal's top process with it (the
    # OOM killer, systemd's KillMode=process...): the top, which would kill
    # what descends from it on its way out, is stopped first so that it
    # cannot, and the grandchild is orphaned to init.
    os.kill(top, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(top).status() == psutil.STATUS_STOPPED, 5, what="the top process stopped")
    emp.proc.kill()
    emp.proc.wait(10)
    for pid in [*zygote, top]:  # (the zygote has its parent-death signal; made sure of)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # What the next emperor meets: the grandchild alive, in the old cgroup,
    # holding the port.
    wait_for(lambda: gone(top), 5, what="the top process gone")
    time.sleep(0.3)
    assert not gone(grandchild)
    assert any(grandchild in procs_below(d) for d in dirs)

    emp2 = start_emperor("--emperor-tyrant", vassal_dir=vassals)
    emp2.wait_state("escape.ini", "ready", 20)
    assert answers(port)
    assert wait_for(lambda: gone(grandchild), 5, what="the grandchild killed")
    left = [str(d) for d in dirs if d.exists()]
    assert not left, f"stale cgroups of emperor {old} left: {left}"
    log = emp2.log_text()
    assert "stale cgroup" in log and f"pyemperor.{old}" in log and f"dead emperor {old}" in log, log


@pytest.mark.parametrize("hook", ["exec-pre-app = sleep 1000", "hook-pre-app = wait_for_file:/nonexistent/never 100000"])
def test_hung_hook_is_cut_off_by_hook_timeout(hook: str, tenant: Tenant, hostile_base: Path, start_emperor) -> None:
    vassals = hostile_base / "vassals"
    app = tenant.write(tenant.home / "hello.py", ESCAPE_APP.replace("if not os.path.exists(PIDFILE):\n    escape()\n", ""))
    emp = start_emperor("--emperor-tyrant", vassal_dir=vassals)
    started = time.monotonic()
    drop(tenant, vassals, "hung.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{free_port()}\n{hook}\nhook-timeout = 1\n")
    v = wait_for(lambda: (x := emp.vassal("hung.ini")) and x["last_exit"] and x, 10, what="the vassal failing")
    assert v["last_exit"]["reason"] == "hook", v
    assert time.monotonic() - started < 8
    key = hook.split(" = ")[0]
    lines = [line for line in emp.log_text().splitlines() if key in line and "hook-timeout = 1" in line]
    assert lines, f"no log line names {key} and the timeout:\n{emp.log_text()}"


def test_exec_hook_timeout_kills_its_process_group(tmp_path: Path) -> None:
    """What the hook's shell started goes with it (here, no cgroup would
    catch it later): a backgrounded child that outlives the shell's kill."""
    from bedrock.config import Entry
    from vassal import hooks

    pidfile = tmp_path / "sleeper"
    command = f"sleep 1000 & echo $! > {pidfile}; wait"
    hook = hooks.Hook("pre-app", "exec", command, Entry("exec-pre-app", command, "t.ini", 1))
    started = time.monotonic()
    with pytest.raises(hooks.HookError, match=r"timed out after 0.5s \(hook-timeout = 0.5\)"):
        hooks.run_hook(hook, 0.5)
    assert time.monotonic() - started < 3
    sleeper = int(pidfile.read_text())
    try:
        wait_for(lambda: gone(sleeper), 2, what="the hook's background child killed")
    finally:
        try:
            os.kill(sleeper, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_wait_action_obeys_hook_timeout() -> None:
    from bedrock.config import Entry
    from vassal import hooks

    hook = hooks.Hook("pre-app", "wait_for_file", "/nonexistent/never 100000", Entry("hook-pre-app", "wait_for_file:/nonexistent/never 100000", "t.ini", 1))
    started = time.monotonic()
    with pytest.raises(hooks.HookError, match="hook-timeout = 0.3"):
        hooks.run_hook(hook, 0.3)
    assert time.monotonic() - started < 2
    # Its own, shorter timeout still wins with its own message.
    hook = hooks.Hook("pre-app", "wait_for_file", "/nonexistent/never 0.2", Entry("hook-pre-app", "wait_for_file:/nonexistent/never 0.2", "t.ini", 1))
    with pytest.raises(hooks.HookError, match="did not appear within 0.2s"):
        hooks.run_hook(hook, 30)
