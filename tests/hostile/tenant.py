"""A tenant of the hostile suite: a real user with a private home, and the
few things a test does as it (own a file, write one, run a command)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.helpers import ROOT

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
            return self.own(path, mode)
        # Made whole and the tenant's under a dot name, then renamed into
        # place: as a tenant's own editor would, the emperor never sees a
        # root-owned or half-written file (a slow guest's emperor saw it
        # root's before the chown, and counted it against root's quota).
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(text)
        self.own(staging, mode)
        os.rename(staging, path)
        return path

    def run(self, *argv: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A command as this tenant (a shell login would give the same ids)."""
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(self.home)}
        return subprocess.run(list(argv), user=self.uid, group=self.gid, extra_groups=[], env=env, cwd="/",
                              capture_output=True, text=True, timeout=timeout, **kw)


def kill_uid(uid: int) -> None:
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
