"""The hostile-tenant suite's ground: real tenant users (useradd, removed
after, with whatever they left running), a world-traversable base dir with a
sticky 1777 vassal dir, and a private 0700 home per tenant, as on a shared
hosting box. Every test here plays the tenant's side of DESIGN 3's tyrant
security contract and must fail on code that breaks it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, world_reachable
from tests.linux.test_netrouter import tcp_listener  # noqa: F401  (a fixture the router tests share)

pytestmark = [pytest.mark.linux_only]

TENANT_PREFIX = "pyemt"


@dataclass
class Tenant:
    name: str
    uid: int
    gid: int
    home: Path

    def own(self, path: Path, mode: int | None = None) -> Path:
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def write(self, path: Path, text: str, mode: int = 0o644) -> Path:
        if path.exists():
            # Rewritten in place without O_CREAT: with fs.protected_regular
            # (systemd hosts set it) even root may not O_CREAT-open another
            # user's file in a sticky world-writable dir such as vassals/.
            with open(path, "r+") as handle:
                handle.truncate()
                handle.write(text)
        else:
            path.write_text(text)
        return self.own(path, mode)

    def run(self, *argv: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A command as this tenant (a shell login would give the same ids)."""
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(self.home)}
        return subprocess.run(list(argv), user=self.uid, group=self.gid, extra_groups=[], env=env, cwd="/",
                              capture_output=True, text=True, timeout=timeout, **kw)


def _kill_uid(uid: int) -> None:
    for _ in range(50):
        procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and uid in (p.info["uids"].real, p.info["uids"].effective)]
        if not procs:
            return
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        time.sleep(0.1)


def leftover_tenants() -> list[str]:
    return [p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(TENANT_PREFIX)]


@pytest.fixture
def hostile_base(request) -> Path:
    """World-traversable (tmp_path is 0700): tenants must reach their homes,
    the apps and the shared vassal dir."""
    if os.geteuid() != 0:
        pytest.skip("the hostile-tenant suite needs root (real users, tyrant mode)")
    if not (world_reachable(ROOT) and world_reachable(sys.executable)):
        pytest.skip("the checkout or the interpreter is not reachable by an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="pyemperor-hostile-"))
    base.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    vassals = base / "vassals"
    vassals.mkdir()
    vassals.chmod(0o1777)
    return base


@pytest.fixture
def make_tenant(hostile_base: Path) -> Iterator[Callable[[], Tenant]]:
    made: list[Tenant] = []

    def make() -> Tenant:
        name = f"{TENANT_PREFIX}{uuid.uuid4().hex[:8]}"
        home = hostile_base / name
        subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                        "--home-dir", str(home), name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
        tenant = Tenant(name, entry.pw_uid, entry.pw_gid, home)
        made.append(tenant)
        home.mkdir()
        tenant.own(home, 0o700)
        return tenant

    yield make
    for tenant in made:
        # An emperor torn down after us may respawn a vassal meanwhile: kill
        # what runs, then remove the user even if something came back (the
        # emperor's own teardown stops that).
        _kill_uid(tenant.uid)
        subprocess.run(["userdel", "--force", tenant.name], capture_output=True)


@pytest.fixture
def tenant(make_tenant) -> Tenant:
    return make_tenant()


@pytest.fixture(scope="session", autouse=True)
def no_tenant_left():
    before = set(leftover_tenants())  # (an interrupted run's, or a concurrent suite's: not this session's leak)
    yield
    left = sorted(set(leftover_tenants()) - before)
    assert not left, f"tenant users left behind: {left}"
