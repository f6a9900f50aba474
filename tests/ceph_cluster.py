"""A real single-node Ceph cluster for the rados tests and bench/rados.py:
one monitor and one OSD on the memstore object store, no auth, pool size
1, every address on 127.0.0.1 with a free port, every directory (data,
run, logs, admin sockets) under one temp dir, daemons stopped by pid.
Debian's ceph-mon and ceph-osd; every ceph CLI call has a timeout (some
hang without a manager)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil

AVAILABLE = all(shutil.which(tool) for tool in ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rados"))

CONF = """[global]
fsid = {fsid}
mon_host = 127.0.0.1:{port}
public_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
run_dir = {dir}/run
admin_socket = {dir}/run/$name.asok
log_file = {dir}/log/$name.log
pid_file = {dir}/run/$name.pid
mon_data = {dir}/mon/$name
osd_data = {dir}/osd/$name
osd_objectstore = memstore
memstore_device_bytes = 1073741824
ms_bind_ipv6 = false
"""


def _alive(pid: int) -> bool:
    """Running (a daemon's zombie, left to its reaper, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = _free_port()
        self.conf = workdir / "ceph.conf"
        self.pids: dict[str, int] = {}

    def ceph(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(["ceph", "-c", str(self.conf), *args], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def rados(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(["rados", "-c", str(self.conf), *args], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"rados {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def _daemon(self, name: str, argv: list[str]) -> None:
        subprocess.run(argv, check=True, timeout=60, capture_output=True)  # (they daemonize: a pid file each)
        pidfile = self.dir / "run" / f"{name}.pid"
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file")
            time.sleep(0.05)
        self.pids[name] = int(pidfile.read_text())

    def start(self) -> None:
        fsid = str(uuid.uuid4())
        for sub in ("run", "log", "mon", "osd/osd.0"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(fsid=fsid, port=self.port, dir=self.dir))
        monmap = self.dir / "monmap"
        subprocess.run(["monmaptool", "--create", "--add", "a", f"127.0.0.1:{self.port}", "--fsid", fsid, str(monmap)],
                       check=True, timeout=30, capture_output=True)
        subprocess.run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "-c", str(self.conf)],
                       check=True, timeout=60, capture_output=True)
        self._daemon("mon.a", ["ceph-mon", "-i", "a", "-c", str(self.conf)])
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid)
        subprocess.run(["ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", osd_uuid, "-c", str(self.conf)],
                       check=True, timeout=120, capture_output=True)
        self._daemon("osd.0", ["ceph-osd", "-i", "0", "-c", str(self.conf)])
        deadline = time.monotonic() + 60
        while "1 up" not in self.ceph("osd", "stat", timeout=10):
            if time.monotonic() > deadline:
                raise RuntimeError("osd.0 never came up")
            time.sleep(0.2)

    def create_pool(self, name: str) -> None:
        self.ceph("osd", "pool", "create", name, "8")
        self.ceph("osd", "pool", "set", name, "size", "1", "--yes-i-really-mean-it")
        deadline = time.monotonic() + 60
        while True:  # (until its placement groups take writes)
            try:
                self.rados("-p", name, "put", ".probe", "/dev/null", timeout=10)
                self.rados("-p", name, "rm", ".probe", timeout=10)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def signal_osd(self, sig: int) -> None:
        os.kill(self.pids["osd.0"], sig)

    def stop(self) -> None:
        for pid in reversed(list(self.pids.values())):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()
