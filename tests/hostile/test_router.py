"""A hostile tenant against the netrouter (issue 10, items 14 and 15).

Address theft: a tenant's vassal declaring a neighbour's address, or the
router's own, must be refused (the first owner keeps it, the host still
reaches it); a brokered connection without an address must not claim one by
spoofing; "the same vassal reconnecting" is the same registered name for
brokered connections and the same process only for plain peers; in tyrant
mode the operator's tuntap-router-tenant-range bounds what a tenant may
declare. Router memory: idle connections cost no receive buffer, and their
number is capped.

Addresses from 198.19.16.0/20 only (apart from tests/linux's subnets, which
may run at the same time), on devices these tests create; nothing is routed
off the machine."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from netrouter.client import claim_packet
from netrouter.wire import BROKER, FrameBuffer, frame
from tests.helpers import ROOT, TEST_TAG, wait_for
from tests.hostile.tenant import Tenant
from tests.net_helpers import NET_APP, host_ping, http, local_route

pytestmark = [pytest.mark.linux_only,
              pytest.mark.skipif(not os.path.exists("/dev/net/tun") or os.geteuid() != 0, reason="needs root and /dev/net/tun")]

# A spoofer: its device gets an address the emperor never registered for it
# (its own as-root hook, run as root of its namespaces), and its app keeps
# sending from it.
SPOOF_APP = NET_APP + '''

import sys, threading, time

def _spoof_forever():
    while True:
        try:
            spoof(os.environ["SPOOF_AS"], os.environ["SPOOF_TO"])
        except OSError as exc:
            print("spoofer:", exc, file=sys.stderr, flush=True)
        time.sleep(0.1)

threading.Thread(target=_spoof_forever, daemon=True).start()
'''


def subnet(index: int) -> str:
    """198.19.(16 + index): one /24 per test."""
    return f"198.19.{16 + index}"


# --- helpers -----------------------------------------------------------------------------
def router_doc(emp) -> dict:
    return json.loads(emp.ctl("--json", "router").stdout)


def owners(doc: dict) -> dict[str | None, str]:
    return {c["address"]: c["vassal"] for c in doc["connections"] if c["address"]}


def vassal_ini(app: Path, address: str | None, name: str, gateway: str, router: Path, extra: str = "") -> str:
    """tests/linux's vassal, with the address optional (a vassal may have none)."""
    text = ("[uwsgi]\n"
            f"wsgi-file = {app}\n"
            "unshare = net,fs\n"
            f"tuntap-device = uwsgi0 {router}\n"
            f"env = ME={name}\n")
    if address:
        text += (f"http-socket = {address}:8080\n"
                 f"net-iface = uwsgi0 {address}/24\n"
                 f"net-route = default {gateway}\n")
    else:
        text += "http-socket = 127.0.0.1:0\n"
    return text + extra


@pytest.fixture
def apps(hostile_base: Path) -> Path:
    directory = hostile_base / "apps"
    directory.mkdir()
    directory.chmod(0o755)
    for name, text in (("net.py", NET_APP), ("spoof.py", SPOOF_APP)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o644)
    return directory


def drop(tenant: Tenant, directory: Path, name: str, text: str) -> Path:
    """The tenant's file, complete and owned before the emperor sees it."""
    staged = tenant.write(directory / f".{name}.staged", text)
    target = directory / name
    os.rename(staged, target)
    return target


@contextlib.contextmanager
def emperor_network(start_emperor, index: int, sock_dir: Path, *extra: str, tyrant: bool = False,
                    vassal_dir: Path | None = None) -> Iterator[tuple]:
    """An emperor with a router whose device has HOST/24, HOST being
    ``subnet(index)``.1: (emperor, HOST, router socket). Tyrant mode only
    where a test needs it: here /dev/net/tun may be 0600, and a tenant's
    vassal (root of a user namespace mapped to the tenant) cannot open it;
    the router's side of things is the same for any vassal. The device goes
    even if the emperor dies without removing it."""
    host = f"{subnet(index)}.1"
    device = f"pe{random.randint(0, 0xFFFFFF):06x}"
    args = ["--tuntap-router", f"{device} {sock_dir / 'router.sock'}",
            "--exec-as-root", f"ip addr add {host}/24 dev {device}", "--exec-as-root", f"ip link set {device} up"]
    if tyrant:
        args += ["--emperor-tyrant", "--emperor-control-mode", "666", "--vassal-env-pass", "PYTEST_TAG"]
    emp = None
    try:
        emp = start_emperor(*args, *extra, vassal_dir=vassal_dir, control_dir=sock_dir if tyrant else None)
        wait_for(lambda: router_doc(emp)["running"], 10, what="the router")
        yield emp, host, sock_dir / "router.sock"
    finally:
        if emp is not None:
            emp.stop()
        subprocess.run(["ip", "link", "del", device], capture_output=True)


def connected(emp, name: str, timeout: float = 20) -> dict:
    """The router connection brokered for vassal ``name`` once it exists."""
    return wait_for(lambda: next((c for c in router_doc(emp)["connections"] if c["vassal"] == name), None), timeout,
                    what=f"a router connection for {name}")


# --- address theft, through the emperor ------------------------------------------------
def test_neighbours_address_cannot_be_stolen(start_emperor, apps: Path, tmp_path: Path) -> None:
    """A second vassal declaring a running vassal's address is refused: the
    host still reaches the first (it reached the thief before)."""
    with emperor_network(start_emperor, 0, tmp_path) as (emp, host, router):
        address = f"{subnet(0)}.2"
        (emp.dir / "victim.ini").write_text(vassal_ini(apps / "net.py", address, "victim", host, router))
        assert wait_for(lambda: http(address), 30, what="the victim over the router") == "hello from victim"
        (emp.dir / "thief.ini").write_text(vassal_ini(apps / "net.py", address, "thief", host, router))
        emp.wait_state("thief.ini", "ready", 30)
        theirs = connected(emp, "thief.ini")
        assert theirs["address"] is None
        doc = router_doc(emp)
        assert owners(doc)[address] == "victim.ini"
        assert doc["refused"]["claims"] >= 1
        for _ in range(5):
            assert http(address) == "hello from victim"
        assert host_ping(address)
        assert wait_for(lambda: f"refused {address} to thief.ini" in emp.log_text(), 5, what="the refusal logged")


def test_router_own_address_cannot_be_claimed(start_emperor, apps: Path, tmp_path: Path, tcp_listener: int) -> None:
    """A vassal declaring the router's address would get every other
    vassal's traffic to the host (it did): refused, the host stays reachable."""
    with emperor_network(start_emperor, 1, tmp_path) as (emp, host, router):
        address = f"{subnet(1)}.2"
        (emp.dir / "thief.ini").write_text(vassal_ini(apps / "net.py", host, "thief", host, router))
        emp.wait_state("thief.ini", "ready", 30)
        assert connected(emp, "thief.ini")["address"] is None
        (emp.dir / "neighbour.ini").write_text(vassal_ini(apps / "net.py", address, "neighbour", host, router))
        assert wait_for(lambda: http(address), 30, what="the neighbour over the router") == "hello from neighbour"
        assert http(address, f"/ping?host={host}") is True
        assert http(address, f"/connect?host={host}&port={tcp_listener}") == "hello from the host"
        doc = router_doc(emp)
        assert host not in owners(doc)
        assert doc["refused"]["claims"] >= 1
        assert f"refused {host} to thief.ini" in emp.log_text()


def test_brokered_vassal_without_address_cannot_claim_by_spoofing(start_emperor, apps: Path, tmp_path: Path) -> None:
    """Brokered connections all carry the emperor's pid: a vassal registered
    without an address, sending from a neighbour's, took the neighbour's
    address over by the "same process reconnecting" rule. Now its packets
    are spoofed drops and the neighbour keeps its address."""
    with emperor_network(start_emperor, 2, tmp_path) as (emp, host, router):
        address = f"{subnet(2)}.2"
        (emp.dir / "victim.ini").write_text(vassal_ini(apps / "net.py", address, "victim", host, router))
        assert wait_for(lambda: http(address), 30, what="the victim over the router") == "hello from victim"
        before = router_doc(emp)["drops"]["spoofed"]
        (emp.dir / "spoofer.ini").write_text(vassal_ini(apps / "spoof.py", None, "spoofer", host, router,
                                                        f"env = SPOOF_AS={address}\nenv = SPOOF_TO={host}\n"
                                                        f"exec-as-root = ip addr add {address}/24 dev uwsgi0\n"
                                                        "exec-as-root = ip link set uwsgi0 up\n"))
        assert connected(emp, "spoofer.ini")["address"] is None
        wait_for(lambda: router_doc(emp)["drops"]["spoofed"] >= before + 5, 20, what="the spoofer's packets dropped")
        doc = router_doc(emp)
        assert owners(doc)[address] == "victim.ini"
        assert next(c for c in doc["connections"] if c["vassal"] == "spoofer.ini")["address"] is None
        for _ in range(5):
            assert http(address) == "hello from victim"


# --- the router alone --------------------------------------------------------------------
class RouterProc:
    def __init__(self, proc: subprocess.Popen, device: str, sock: Path, stats_path: Path, log: Path, host: str):
        self.proc = proc
        self.device = device
        self.sock = sock
        self.stats_path = stats_path
        self.log = log
        self.host = host

    def stats(self) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_path))
            data = bytearray()
            while chunk := s.recv(1 << 20):
                data += chunk
        return json.loads(data)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(3)
        deadline = time.monotonic() + 5
        while True:
            try:
                sock.connect(str(self.sock))
                return sock
            except BlockingIOError:  # the listen backlog is full for a moment
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


@pytest.fixture
def start_router() -> Iterator[Callable[..., RouterProc]]:
    """A standalone netrouter whose device has ``subnet(index)``.1/24, its
    socket in a world-traversable dir (tenants may be given its group)."""
    started: list[tuple[RouterProc, Path]] = []

    def start(index: int, *extra: str) -> RouterProc:
        directory = Path(tempfile.mkdtemp(prefix="pyemperor-router-"))
        directory.chmod(0o755)
        device = f"pe{random.randint(0, 0xFFFFFF):06x}"
        sock, stats_path, log = directory / "r.sock", directory / "stats.sock", directory / "router.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen([sys.executable, "-m", "netrouter", device, str(sock), "--stats", str(stats_path), *extra],
                                    stderr=handle, cwd=ROOT, env={**os.environ, "PYTEST_TAG": TEST_TAG})
        router = RouterProc(proc, device, sock, stats_path, log, f"{subnet(index)}.1")
        started.append((router, directory))
        wait_for(lambda: sock.exists() and stats_path.exists() and os.path.exists(f"/sys/class/net/{device}"), 10, what="the router")
        subprocess.run(["ip", "addr", "add", f"{router.host}/24", "dev", device], check=True)
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
        return router

    yield start
    for router, directory in started:
        if router.proc.poll() is None:
            router.proc.send_signal(signal.SIGTERM)
            try:
                router.proc.wait(10)
            except subprocess.TimeoutExpired:
                router.proc.kill()
                router.proc.wait()
        subprocess.run(["ip", "link", "del", router.device], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


PASS_BACK = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [str(os.getpid()).encode()], [sock.fileno()])
"""


def connect_from_another_process(router: RouterProc) -> tuple[socket.socket, int]:
    """A connection whose peer (SO_PEERCRED) is another process, which hands
    it back and exits: (the socket, that process's pid)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        subprocess.run([sys.executable, "-c", PASS_BACK, str(router.sock), str(theirs.fileno())],
                       pass_fds=[theirs.fileno()], check=True, timeout=10, env={**os.environ, "PYTEST_TAG": TEST_TAG})
        pid, fds, _, _ = socket.recv_fds(ours, 32, 1)
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(3)
    return sock, int(pid)


def register(router: RouterProc, vassal: str, address: str | None) -> socket.socket:
    """A brokered connection, as the emperor makes it (we are root too, and
    one process for all of them, as the emperor is)."""
    sock = router.connect()
    sock.sendall(frame(json.dumps({"vassal": vassal, "address": address}).encode(), BROKER))
    return sock


def connection(stats: dict, **match) -> dict | None:
    found = [c for c in stats["connections"] if all(c[k] == v for k, v in match.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def receives(sock: socket.socket, payload: bytes, timeout: float = 3) -> bool:
    """Whether a UDP packet carrying ``payload`` arrives on ``sock``."""
    reader = FrameBuffer()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            return False
        if any(m == 0 and p.endswith(payload) for m, p in reader.feed(data)):
            return True
    return False


def udp_to(address: str, payload: bytes) -> None:
    assert local_route(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(payload, (address, 9))


def closed_by_router(sock: socket.socket, timeout: float = 3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def closed_at_once(socks: list[socket.socket], wait: float = 0.3) -> list[bool]:
    """Which of ``socks`` the router closed (a refused connection is closed
    as soon as it is accepted)."""
    time.sleep(wait)
    closed = []
    for sock in socks:
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            closed.append(sock.recv(1) == b"")
        except BlockingIOError:
            closed.append(False)
        except OSError:
            closed.append(True)
        finally:
            sock.settimeout(timeout)
    return closed


def test_plain_peers_second_claim_refused(start_router) -> None:
    """A plain peer's address is its own while it lives: another process
    claiming it is refused, counted and logged, and the owner still gets
    its packets. The same process reconnecting (uWSGI) still takes it over."""
    router = start_router(3)
    address = f"{subnet(3)}.2"
    first, first_pid = connect_from_another_process(router)
    first.sendall(frame(claim_packet(address)))
    wait_for(lambda: connection(router.stats(), address=address), 5, what="the first claim")
    second, second_pid = connect_from_another_process(router)
    second.sendall(frame(claim_packet(address)))
    stats = wait_for(lambda: (s := router.stats())["refused"]["claims"] >= 1 and s, 5, what="the second claim refused")
    assert connection(stats, address=address)["peer_pid"] == first_pid
    assert connection(stats, peer_pid=second_pid)["address"] is None
    udp_to(address, b"to the owner")
    assert receives(first, b"to the owner")
    assert wait_for(lambda: f"refused {address} to pid:{second_pid}" in router.log_text(), 5, what="the refusal logged")
    # One process, two connections (uWSGI runs its tuntap hook twice): the newer one takes the address over.
    again = f"{subnet(3)}.3"
    old, new = router.connect(), router.connect()
    old.sendall(frame(claim_packet(again)))
    wait_for(lambda: connection(router.stats(), address=again), 5, what="the claim")
    new.sendall(frame(claim_packet(again)))
    wait_for(lambda: len([c for c in router.stats()["connections"] if c["peer_pid"] == os.getpid() and c["address"] is None]) == 1,
             5, what="the older connection superseded")
    udp_to(again, b"to the newer one")
    assert receives(new, b"to the newer one")
    for sock in (first, second, old, new):
        sock.close()


def test_brokered_connections_are_told_apart_by_name(start_router) -> None:
    """All brokered connections come from the emperor's pid: the same vassal
    is the same registered name. One registered without an address cannot
    take another's by sending from it; another vassal registering a held
    address is refused; the same vassal registering again replaces its
    previous connection."""
    router = start_router(4)
    address = f"{subnet(4)}.2"
    first = register(router, "a.ini", address)
    wait_for(lambda: connection(router.stats(), vassal="a.ini", address=address), 5, what="a.ini registered")
    before = router.stats()["drops"]["spoofed"]
    spoofer = register(router, "b.ini", None)
    wait_for(lambda: connection(router.stats(), vassal="b.ini"), 5, what="b.ini registered")
    spoofer.sendall(frame(claim_packet(address)))
    wait_for(lambda: router.stats()["drops"]["spoofed"] > before, 5, what="b.ini's packet dropped as spoofed")
    stats = router.stats()
    assert connection(stats, vassal="a.ini")["address"] == address
    assert connection(stats, vassal="b.ini")["address"] is None
    other = register(router, "c.ini", address)
    stats = wait_for(lambda: (s := router.stats())["refused"]["claims"] >= 1 and s, 5, what="c.ini refused")
    assert connection(stats, vassal="c.ini")["address"] is None
    assert connection(stats, vassal="a.ini")["address"] == address
    udp_to(address, b"to a.ini")
    assert receives(first, b"to a.ini")
    # a.ini again (restarted, or a new router connection): the old one goes, the new one has the address.
    second = register(router, "a.ini", address)
    assert closed_by_router(first)
    stats = router.stats()
    assert connection(stats, vassal="a.ini")["address"] == address
    udp_to(address, b"to the new a.ini")
    assert receives(second, b"to the new a.ini")
    for sock in (first, spoofer, other, second):
        sock.close()


def test_router_addresses_are_never_claimable(start_router) -> None:
    """The router's own address, its subnet's broadcast, and an address the
    router gets later (taken from whoever held it) are nobody else's."""
    router = start_router(5)
    peer = router.connect()
    peer.sendall(frame(claim_packet(router.host)))
    stats = wait_for(lambda: (s := router.stats())["refused"]["claims"] >= 1 and s, 5, what="the claim refused")
    assert connection(stats, peer_pid=os.getpid())["address"] is None
    broadcast = router.connect()
    broadcast.sendall(frame(claim_packet(f"{subnet(5)}.255")))
    wait_for(lambda: router.stats()["refused"]["claims"] >= 2, 5, what="the broadcast address refused")
    brokered = register(router, "own.ini", router.host)
    wait_for(lambda: router.stats()["refused"]["claims"] >= 3, 5, what="the registration refused")
    assert connection(router.stats(), vassal="own.ini")["address"] is None
    later = f"{subnet(5)}.7"
    holder = register(router, "later.ini", later)
    wait_for(lambda: connection(router.stats(), vassal="later.ini", address=later), 5, what="later.ini registered")
    subprocess.run(["ip", "addr", "add", f"{later}/32", "dev", router.device], check=True)
    wait_for(lambda: connection(router.stats(), vassal="later.ini")["address"] is None, 5, what="the address taken back")
    assert f"refused {router.host} to own.ini" in router.log_text()
    for sock in (peer, broadcast, brokered, holder):
        sock.close()


# --- tyrant mode: the operator's ranges --------------------------------------------------
def test_tenant_range_check(make_tenant, hostile_base: Path) -> None:
    from bedrock import options
    from bedrock.config import Entry, build, load
    from emperor.router_supervisor import RangeError, address_problems, tenant_ranges

    alice, bob = make_tenant(), make_tenant()

    def settings(*ranges: str):
        entries = [Entry("tuntap-router-tenant-range", value, "/etc/emperor.ini", line) for line, value in enumerate(ranges, 3)]
        return build("/etc/emperor.ini", entries, scope=options.EMPEROR)

    def vassal(tenant: Tenant, *lines: str):
        path = tenant.write(hostile_base / "vassals" / f"{tenant.name}.ini",
                            "[uwsgi]\nunshare = net,fs\ntuntap-device = uwsgi0\n" + "".join(f"{line}\n" for line in lines))
        return load(str(path))

    ranged = settings(f"{alice.name} {subnet(8)}.0/24", f"{alice.uid} {subnet(9)}.128/25")
    inside = vassal(alice, f"net-iface = uwsgi0 {subnet(8)}.5/24", f"net-iface = uwsgi0 {subnet(9)}.200/24", "net-iface = lo 127.0.0.2/8")
    assert address_problems(ranged, inside, alice.uid) == []
    outside = vassal(alice, "http-socket = :8080", f"net-iface = uwsgi0 {subnet(9)}.5/24")
    (problem,) = address_problems(ranged, outside, alice.uid)
    assert (problem.file, problem.line, problem.key) == (outside.path, 5, "net-iface")
    assert f"{subnet(9)}.5 is outside the tuntap-router-tenant-range of uid {alice.uid} ({alice.name})" in problem.message
    assert f"{subnet(8)}.0/24" in problem.message
    # A tenant without a range, once ranges are set, may declare none.
    (problem,) = address_problems(ranged, vassal(bob, f"net-iface = uwsgi0 {subnet(8)}.6/24"), bob.uid)
    assert f"uid {bob.uid} ({bob.name}) has no tuntap-router-tenant-range" in problem.message
    assert address_problems(ranged, vassal(bob, "net-iface = lo 127.0.0.2/8"), bob.uid) == []
    # Not tyrant mode, or no ranges: nothing to check here (the router still keeps addresses unique).
    assert address_problems(ranged, outside, None) == []
    assert address_problems(settings(), outside, alice.uid) == []
    # A bad range is named, both ways.
    for bad, why in ((f"{alice.name} {subnet(8)}.0/33", "expected an IPv4 network"), (f"nosuch{alice.name} {subnet(8)}.0/24", "unknown user")):
        with pytest.raises(RangeError, match=why) as exc:
            tenant_ranges(settings(bad))
        assert exc.value.problem.line == 3 and exc.value.problem.key == "tuntap-router-tenant-range"
        (problem,) = address_problems(settings(bad), outside, alice.uid)
        assert why in problem.message


def test_bad_tenant_range_refuses_emperor(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "emperor", "--control", str(tmp_path / "c.sock"),
                             "--tuntap-router", f"pebadrng {tmp_path}/r.sock", "--tuntap-router-tenant-range", "nosuchuser-x 198.19.16.0/24",
                             str(tmp_path)], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            env={**os.environ, "PYTEST_TAG": TEST_TAG})
    assert result.returncode == 2
    assert "tuntap-router-tenant-range" in result.stderr and "unknown user 'nosuchuser-x'" in result.stderr
    assert not os.path.exists("/sys/class/net/pebadrng")


def test_out_of_range_address_is_never_brokered(start_emperor, tenant: Tenant, hostile_base: Path, apps: Path) -> None:
    """The second line of defence: whatever the config validation lets by,
    the emperor does not register an address outside the owner's range."""
    with emperor_network(start_emperor, 10, hostile_base, "--tuntap-router-tenant-range", f"{tenant.name} {subnet(10)}.128/25",
                         tyrant=True, vassal_dir=hostile_base / "vassals") as (emp, host, router):
        address = f"{subnet(10)}.2"
        drop(tenant, emp.dir, "wide.ini", vassal_ini(apps / "net.py", address, "wide", host, router))

        def refused() -> bool:
            entry = emp.vassal("wide.ini")
            invalid = entry is not None and "tuntap-router-tenant-range" in str(entry.get("error") or "")
            return invalid or "[wide.ini] not brokering a router connection" in emp.log_text()

        wait_for(refused, 20, what="the address refused")
        assert address not in owners(router_doc(emp))
        assert "outside the tuntap-router-tenant-range" in emp.log_text() + str(emp.vassal("wide.ini"))


# --- memory and the connection cap ---------------------------------------------------------
def test_connection_cap(start_router, tenant: Tenant) -> None:
    """Past --max-connections a connection is refused (closed at once) and
    counted; unprivileged peers and root are counted apart, so a tenant's
    flood does not lock the emperor's brokered connections out."""
    router = start_router(11, "--max-connections", "20", "--socket-group", str(tenant.gid))
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(router.sock), "25"], user=tenant.uid, group=tenant.gid, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "PYTEST_TAG": TEST_TAG}, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ours: list[socket.socket] = []
    try:
        assert flood.stdout.readline().split() == ["accepted", "20", "refused", "5"]
        for _ in range(21):
            ours.append(router.connect())
        assert closed_at_once(ours) == [False] * 20 + [True]  # root's 21st
        stats = router.stats()
        assert len(stats["connections"]) == 40 and stats["max_connections"] == 20
        assert stats["refused"]["connections"] == 6
        assert "refused a connection" in router.log_text()
    finally:
        flood.stdin.close()
        flood.wait(10)
        for sock in ours:
            sock.close()
    wait_for(lambda: not router.stats()["connections"], 5, what="the connections gone")
    ours = [router.connect() for _ in range(20)]  # room again
    assert not any(closed_at_once(ours))
    for sock in ours:
        sock.close()


FLOOD = """
import socket, sys, time
socks, refused = [], 0
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    socks.append(sock)
time.sleep(0.5)
for sock in socks:
    sock.setblocking(False)
    try:
        if sock.recv(1) == b"":
            refused += 1
    except BlockingIOError:
        pass
print("accepted", len(socks) - refused, "refused", refused, flush=True)
sys.stdin.read()
"""


def test_idle_connections_cost_little_and_are_freed(start_router) -> None:
    """300 idle connections (half of them with an address, so they have
    read something) cost the router a few KiB each, not 320 KiB of receive
    buffer; closed, they are gone, and another 300 do not grow it further."""
    router = start_router(12)
    process = psutil.Process(router.proc.pid)
    for sock in [router.connect() for _ in range(20)]:  # warm up the allocator
        sock.close()
    wait_for(lambda: not router.stats()["connections"], 5, what="warm-up closed")
    base = process.memory_info().rss
    count = 300

    def open_all() -> list[socket.socket]:
        socks = []
        for index in range(count):
            sock = router.connect()
            if index % 2:
                sock.sendall(frame(claim_packet(f"198.19.{28 + index // 200}.{index % 200 + 2}")))
            socks.append(sock)
        return socks

    socks = open_all()
    wait_for(lambda: len([c for c in router.stats()["connections"] if c["address"]]) == count // 2, 10, what="all connected")
    assert len(router.stats()["connections"]) == count
    # Receive buffers of connections that read something are freed once idle.
    bound = count * 16 * 1024
    try:
        wait_for(lambda: process.memory_info().rss - base < bound, 10, what="idle connections costing under 16 KiB each")
    finally:
        print(f"{(process.memory_info().rss - base) / count / 1024:.1f} KiB per idle connection")
    wait_for(lambda: all(c["buffer"] == 0 for c in router.stats()["connections"]), 10, what="idle receive buffers freed")
    for sock in socks:
        sock.close()
    wait_for(lambda: not router.stats()["connections"], 10, what="all closed")
    peak = process.memory_info().rss
    socks = open_all()
    wait_for(lambda: len(router.stats()["connections"]) == count, 10, what="all connected again")
    for sock in socks:
        sock.close()
    wait_for(lambda: not router.stats()["connections"], 10, what="all closed again")
    assert process.memory_info().rss - peak < count * 4 * 1024  # the first round's memory was reused


@pytest.mark.parametrize("spawner", ["zygote", "fork+exec"])
def test_tenant_vassal_on_the_router_with_a_0600_tun_node(start_emperor, tenant: Tenant, hostile_base: Path, apps: Path, spawner: str) -> None:
    """A tenant's vassal (root of a user namespace mapped to the tenant) may
    make its tun device but not open /dev/net/tun where that is 0600, as on
    some hosts: the spawning child opens it in the vassal's namespace while
    still root and hands the fd over. Reached from the host over the router."""
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    os.chmod("/dev/net/tun", 0o600)
    try:
        extra = ["--emperor-zygote=false"] if spawner == "fork+exec" else []
        with emperor_network(start_emperor, 13, hostile_base, *extra, tyrant=True, vassal_dir=hostile_base / "vassals") as (emp, host, router):
            address = f"{subnet(13)}.2"
            drop(tenant, emp.dir, "tnet.ini", vassal_ini(apps / "net.py", address, "tenant", host, router))
            assert wait_for(lambda: http(address), 30, what="the tenant's vassal over the router") == "hello from tenant"
            top = emp.vassal("tnet.ini")["pid"]
            assert Path(f"/proc/{top}/uid_map").read_text().split() == ["0", str(tenant.uid), "1"]
    finally:
        os.chmod("/dev/net/tun", mode)


def test_one_uid_cannot_take_every_connection(start_router, tenant: Tenant) -> None:
    """One tenant with access to the socket held every unprivileged slot
    (and a backlog in each): at most MAX_CONNECTIONS_PER_UID are its own."""
    from netrouter.router import MAX_CONNECTIONS_PER_UID

    router = start_router(14, "--socket-group", str(tenant.gid))
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(router.sock), str(MAX_CONNECTIONS_PER_UID + 6)], user=tenant.uid, group=tenant.gid,
        extra_groups=[], env={"PATH": "/usr/bin:/bin", "PYTEST_TAG": TEST_TAG}, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().split() == ["accepted", str(MAX_CONNECTIONS_PER_UID), "refused", "6"]
        assert "connections from that uid already" in router.log_text()
    finally:
        flood.stdin.close()
        flood.wait(10)
