"""A tenant's limits (memory-limit, pids-limit, cpu-limit) bind before any of
its code runs, whichever way the vassal was spawned: through the zygote's
spare intermediate child (whose pre-made cgroup takes the place of the one
the emperor configured) or through a fresh intermediate child (the spare not
ready yet: a burst of files). The app reads the limit files of the cgroups
named in its own /proc/self/cgroup, at import and at request time, and tries
to fork or allocate past them."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers import answers, free_port, http_get, wait_for
from tests.hostile.tenant import Tenant

pytestmark = [pytest.mark.linux_only]

LIMITS_APP = r'''
import json, os, time

def cgroup_dirs():
    """controller -> the dir of our own cgroup for it (v2: the one dir)."""
    unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    dirs = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in ("pids", "memory", "cpu"):
                if unified and controllers == "":
                    dirs[name] = "/sys/fs/cgroup" + path
                elif not unified and name in controllers.split(","):
                    dirs[name] = f"/sys/fs/cgroup/{controllers}{path}"
    return unified, dirs

def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as exc:
        return f"error: {exc}"

def limits():
    unified, dirs = cgroup_dirs()
    files = {"pids": ["pids.max"],
             "memory": ["memory.max"] if unified else ["memory.limit_in_bytes"],
             "cpu": ["cpu.max"] if unified else ["cpu.cfs_quota_us", "cpu.cfs_period_us"]}
    return {"unified": unified, "dirs": dirs,
            "values": {name: [read(os.path.join(dirs[name], f)) for f in files[name]] for name in dirs}}

def fork_many(count):
    """How many children exist at once before fork fails (they wait on a pipe)."""
    r, w = os.pipe()
    children = []
    for _ in range(count):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        children.append(pid)
    os.close(w)
    os.close(r)
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return len(children)

def hog(megabytes):
    chunks = [b"\x01" * (1 << 20) for _ in range(megabytes)]  # touched, not just reserved
    return len(chunks)

def burn(seconds):
    start, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        pass
    return time.process_time() - cpu

AT_IMPORT = {"limits": limits()}
if os.environ.get("FORK_AT_IMPORT"):
    AT_IMPORT["forked"] = fork_many(int(os.environ["FORK_AT_IMPORT"]))
if os.environ.get("ALLOC_AT_IMPORT"):
    AT_IMPORT["allocated"] = hog(int(os.environ["ALLOC_AT_IMPORT"]))

def application(environ, start_response):
    path, arg = environ["PATH_INFO"], environ.get("QUERY_STRING") or "0"
    if path == "/fork":
        result = fork_many(int(arg))
    elif path == "/alloc":
        result = hog(int(arg))
    elif path == "/burn":
        result = burn(float(arg))
    else:
        result = {"import": AT_IMPORT, "now": limits()}
    body = json.dumps(result).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''

SPARE = re.compile(r"\.spare-(\d+)-(\d+)")
MEMORY = 64 * 1024 * 1024
PIDS = 16
CPU_QUOTA = 20000  # of 100000 us: cpu-limit = 0.2


def spare(base: Path) -> tuple[int, int] | None:
    """The zygote's ready spare under the vassals' tree: (zygote pid, number)."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return None
    for entry in entries:
        match = SPARE.fullmatch(entry.name)
        if match and (entry / "cgroup.procs").read_text().split():
            return int(match.group(1)), int(match.group(2))
    return None


def wait_spare(base: Path, timeout: float = 3.0) -> tuple[int, int] | None:
    """None where the zygote keeps no spare (cgroup v2 today)."""
    try:
        found = wait_for(lambda: spare(base), timeout, what="a ready spare")
    except AssertionError:
        return None
    time.sleep(0.1)  # for the zygote to read the spare's "ready"
    return found


class Vassals:
    def __init__(self, emp, tenant: Tenant, app: Path):
        self.emp, self.tenant, self.app = emp, tenant, app
        self.ports: dict[str, int] = {}

    def drop(self, name: str, extra: str) -> None:
        """The tenant's file, complete and owned before the emperor sees it."""
        port = free_port()
        self.ports[name] = port
        text = f"[uwsgi]\nwsgi-file = {self.app}\nhttp-socket = 127.0.0.1:{port}\n{extra}"
        staged = self.tenant.write(self.emp.dir / f".{name}.staged", text)
        os.rename(staged, self.emp.dir / f"{name}.ini")

    def get(self, name: str, path: str = "/limits", timeout: float = 30.0):
        status, body = http_get(self.ports[name], path, timeout=timeout)
        assert status == 200, (name, path, status, body)
        return json.loads(body)


def spawn_on_both_paths(vassals: Vassals, base: Path, kind: str, extra: str, wait=None) -> dict[str, str]:
    """Two vassals one at a time with the spare ready, then a burst of three
    (the spare taken by the first, the others spawned fresh). Returns how each
    was spawned as far as can be told: spare, fresh, or burst."""
    wait = wait or (lambda name: wait_for(lambda: answers(vassals.ports[name]), 30, what=f"{name} answering"))
    paths: dict[str, str] = {}
    patience = 3.0  # for the first spare; none then means the zygote keeps none
    for index in range(2):
        name = f"{kind}-one-{index}"
        before = wait_spare(base, patience)
        patience = 10.0 if before else 0.0
        vassals.drop(name, extra)
        wait(name)
        # A taken spare's dir became the vassal's.
        paths[name] = "spare" if before and not (base / f".spare-{before[0]}-{before[1]}").exists() else "fresh"
    before = wait_spare(base, patience)
    burst = [f"{kind}-burst-{index}" for index in range(3)]
    for name in burst:
        vassals.drop(name, extra)
    for name in burst:
        wait(name)
        paths[name] = "burst"
    if before:
        now = wait_spare(base, 10) or before
        taken = now[1] - before[1] if now[0] == before[0] else 1
        assert taken < len(burst), f"every vassal of the burst took a spare ({taken}): the fresh path went untested"
    return paths


@pytest.fixture
def limited(tenant: Tenant, hostile_base: Path, start_emperor):
    app = tenant.write(tenant.home / "limits.py", LIMITS_APP)
    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals")
    base = Path(emp.status()["emperor"]["tracking"])
    return emp, base, Vassals(emp, tenant, app)


def own_values(doc: dict, kind: str, base: Path, name: str) -> list[str]:
    """The vassal's limit values, from the cgroup its own /proc/self/cgroup names."""
    directory = doc["dirs"].get(kind)
    assert directory, f"{name}: no {kind} cgroup in /proc/self/cgroup: {doc}"
    assert os.path.basename(directory) == f"{name}.ini", f"{name}: {kind} cgroup {directory} is not the vassal's own"
    return doc["values"][kind]


def expected(kind: str, unified: bool) -> list[str]:
    if kind == "pids":
        return [str(PIDS)]
    if kind == "memory":
        return [str(MEMORY)]
    return [f"{CPU_QUOTA} 100000"] if unified else [str(CPU_QUOTA), "100000"]


EXTRA = {
    "pids": f"pids-limit = {PIDS}\nenv = FORK_AT_IMPORT=60\n",
    "memory": "memory-limit = 64M\n",
    "cpu": "cpu-limit = 0.2\n",
}


@pytest.mark.parametrize("kind", ["pids", "memory", "cpu"])
def test_limit_binds_on_every_spawn_path(kind: str, limited) -> None:
    emp, base, vassals = limited
    paths = spawn_on_both_paths(vassals, base, kind, EXTRA[kind])
    if spare(base) is not None and (kind == "pids" or base.joinpath("cgroup.controllers").exists()):
        # Where the tracking cgroup is the only one (v1 pids-limit, v2),
        # one-at-a-time spawns keep the fast path.
        assert "spare" in paths.values(), f"no vassal took the zygote's spare: {paths}"
    for name, path in paths.items():
        doc = vassals.get(name)
        for when in ("import", "now"):
            limits = doc[when]["limits"] if when == "import" else doc[when]
            assert own_values(limits, kind, base, name) == expected(kind, limits["unified"]), f"{name} ({path} path), at {when}: {limits}"
        if kind == "pids":
            assert doc["import"]["forked"] < PIDS, f"{name} ({path} path) forked {doc['import']['forked']} at import"
            assert vassals.get(name, "/fork?60") < PIDS, f"{name} ({path} path): fork bomb at request time"
        elif kind == "cpu":
            used = vassals.get(name, "/burn?1")
            assert used < 0.6, f"{name} ({path} path) used {used:.2f}s of CPU in 1s with cpu-limit = 0.2"
        else:
            try:
                http_get(vassals.ports[name], "/alloc?200", timeout=20)
            except OSError:
                pass
            v = wait_for(lambda n=name: (x := emp.vassal(f"{n}.ini")) and x["last_exit"] and x, 20, what=f"{name} OOM-killed")
            assert v["last_exit"]["reason"] == "oom", f"{name} ({path} path) allocated 200M under memory-limit = 64M: {v}"


def test_memory_limit_binds_at_import(limited) -> None:
    """An app that allocates past its memory-limit while being imported is
    OOM-killed as a whole, on either spawn path: it never serves."""
    emp, base, vassals = limited

    def oom(name: str) -> None:
        v = wait_for(lambda: (x := emp.vassal(f"{name}.ini")) and x["last_exit"] and x, 30, what=f"{name} exit")
        assert v["last_exit"]["reason"] == "oom", f"{name}: {v}"
        assert not answers(vassals.ports[name]), f"{name} serves after allocating 200M at import under memory-limit = 64M"

    spawn_on_both_paths(vassals, base, "hog", "memory-limit = 64M\nenv = ALLOC_AT_IMPORT=200\n", wait=oom)
