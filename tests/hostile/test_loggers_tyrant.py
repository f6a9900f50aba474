"""The ``logger`` key against a hostile tenant (tyrant mode): a root-owned
file, a symlink to one, a new file in a root-only dir, a root-only unix
socket; none may be written or reached by the tenant's vassal, whose own
file logger is the tenant's."""

from __future__ import annotations

import os
import socket

import pytest

from tests.helpers import wait_for
from tests.hostile.test_tyrant import ENV_APP, info

pytestmark = [pytest.mark.linux_only]


@pytest.mark.parametrize("unshare", ["", "unshare = user,fs\n"])
def test_a_tenant_logger_never_writes_or_connects_as_host_root(start_emperor, hostile_base, tenant, unshare):
    app = hostile_base / "envapp.py"
    app.write_text(ENV_APP)
    app.chmod(0o644)
    secret_dir = hostile_base / "rootonly"
    secret_dir.mkdir(mode=0o700)
    owned = secret_dir / "owned.log"
    owned.write_text("root's\n")
    owned.chmod(0o600)
    world = hostile_base / "world-readable.log"  # (readable, not writable by the tenant)
    world.write_text("root's\n")
    world.chmod(0o644)
    link = tenant.home / "swap.log"
    os.symlink(world, link)
    tenant.own(link)
    sock_path = secret_dir / "root.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    sink.setblocking(False)
    mine = tenant.home / "mine.log"
    try:
        emp = start_emperor("--emperor-tyrant", "--emperor-control-mode", "666",
                            vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
        tenant.write(emp.dir / "lg.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/lg.sock\n{unshare}"
                     f"logger = file:{owned}\nlogger = file:{world}\nlogger = file:{link}\n"
                     f"logger = file:{secret_dir}/new.log\nlogger = rsyslog:{sock_path}\nlogger = socket:{sock_path}\n"
                     f"logger = file:{mine}\n")
        info(tenant.home / "lg.sock")
        wait_for(lambda: mine.exists() and b"ready" in mine.read_bytes(), 20, what="the tenant's own file logger")
        assert mine.stat().st_uid == tenant.uid
        assert owned.read_text() == "root's\n" and world.read_text() == "root's\n"
        assert not (secret_dir / "new.log").exists()
        with pytest.raises(BlockingIOError):
            sink.recv(4096)
    finally:
        sink.close()

