"""The hostile-tenant suite's ground: real tenant users (useradd, removed
after, with whatever they left running), a world-traversable base dir with a
sticky 1777 vassal dir, and a private 0700 home per tenant, as on a shared
hosting box. Every test here plays the tenant's side of DESIGN 3's tyrant
security contract and must fail on code that breaks it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, world_reachable
from tests.hostile.tenant import TENANT_PREFIX, Tenant, kill_uid, leftover_tenants

pytestmark = [pytest.mark.linux_only]

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
        kill_uid(tenant.uid)
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
