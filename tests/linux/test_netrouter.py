"""The netrouter for real: tun devices, network namespaces, packets.

Addresses from 198.18.0.0/15 only, on devices these tests create; nothing is
routed off the machine."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import open_fd_targets, wait_for
from tests.net_helpers import NET_APP, blob, host_ping, http, local_route

pytestmark = [pytest.mark.linux_only, pytest.mark.skipif(not os.path.exists("/dev/net/tun") or os.geteuid() != 0, reason="needs root and /dev/net/tun")]
HOST = "198.18.0.1"
FUZZ_HOST, FUZZ_VASSAL = "198.19.0.1", "198.19.0.2"
CANONICAL_OUT = [
    f"allow 198.18.0.0/24 {HOST}",
    "deny 198.18.0.0/24 198.18.0.0/24",
    "allow 198.18.0.0/24 0.0.0.0",
    "deny",
]
CANONICAL_IN = [
    f"allow {HOST} 198.18.0.0/24",
    "deny 198.18.0.0/24 198.18.0.0/24",
    "allow 0.0.0.0 198.18.0.0/24",
    "deny",
]

@pytest.fixture
def netdir(request):
    path = Path(tempfile.mkdtemp(prefix="pyemperor-net-"))
    path.chmod(0o755)
    (path / "net.py").write_text(NET_APP)
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def vassal_ini(netdir: Path, address: str, name: str, router_socket: Path, gateway: str = HOST) -> str:
    return (
        "[uwsgi]\n"
        f"wsgi-file = {netdir}/net.py\n"
        f"http-socket = {address}:8080\n"
        "unshare = net,fs\n"
        f"tuntap-device = uwsgi0 {router_socket}\n"
        f"net-iface = uwsgi0 {address}/24\n"
        f"net-route = default {gateway}\n"
        f"env = ME={name}\n"
    )


def start_network(start_emperor, netdir: Path, rules: bool = True):
    device = f"pe{random.randint(0, 0xFFFFFF):06x}"
    router_socket = netdir / "router.sock"
    args = ["--tuntap-router", f"{device} {router_socket}",
            "--exec-as-root", f"ip addr add {HOST}/24 dev {device}", "--exec-as-root", f"ip link set {device} up"]
    if rules:
        for rule in CANONICAL_OUT:
            args += ["--tuntap-router-firewall-out", rule]
        for rule in CANONICAL_IN:
            args += ["--tuntap-router-firewall-in", rule]
    emp = start_emperor(*args)
    return emp, device, router_socket


def router_doc(emp) -> dict:
    return json.loads(emp.ctl("--json", "router").stdout)


def test_host_and_vassals_both_ways_with_canonical_firewall(start_emperor, netdir, tcp_listener):
    emp, device, router_socket = start_network(start_emperor, netdir)
    (emp.dir / "a.ini").write_text(vassal_ini(netdir, "198.18.0.2", "a", router_socket))
    (emp.dir / "b.ini").write_text(vassal_ini(netdir, "198.18.0.3", "b", router_socket))
    # Host -> vassals: TCP and ping (the vassals claimed their address without sending anything).
    assert wait_for(lambda: http("198.18.0.2"), 20, what="vassal a over the router") == "hello from a"
    assert wait_for(lambda: http("198.18.0.3"), 20, what="vassal b over the router") == "hello from b"
    assert host_ping("198.18.0.2") and host_ping("198.18.0.3")
    # Vassals -> host: TCP and ping.
    assert http("198.18.0.2", f"/connect?host={HOST}&port={tcp_listener}") == "hello from the host"
    assert http("198.18.0.3", f"/ping?host={HOST}") is True
    # Vassal -> vassal: blocked by the canonical ruleset.
    before = wait_for(lambda: router_doc(emp)["running"] and router_doc(emp), 5, what="router stats")
    assert http("198.18.0.2", "/ping?host=198.18.0.3") is False
    assert http("198.18.0.2", "/connect?host=198.18.0.3&port=8080").startswith("error")
    doc = wait_for(lambda: (d := router_doc(emp))["drops"]["firewall"] > before["drops"]["firewall"] and d, 5, what="firewall drop counted")
    addresses = sorted((c["vassal"], c["address"]) for c in doc["connections"])
    assert addresses == [("a.ini", "198.18.0.2"), ("b.ini", "198.18.0.3")]  # brokered by the emperor
    deny = next(r for r in doc["rules"]["out"] if r["rule"] == "deny 198.18.0.0/24 198.18.0.0/24")
    assert deny["packets"] > 0
    table = emp.ctl("router").stdout
    assert "198.18.0.2" in table and "direct" in table
    # Bulk both ways: our vassals take offloaded super-packets.
    assert all(c["offloads"] and c["direct"] for c in doc["connections"])
    payload = os.urandom(8 << 20)
    assert http("198.18.0.2", "/sha", body=payload, timeout=20) == hashlib.sha256(payload).hexdigest()
    assert http("198.18.0.3", f"/blob?size={8 << 20}", raw=True, timeout=20) == blob(8 << 20)
    assert json.loads(emp.ctl("--json", "stats").stdout)["router"]["running"] is True


def test_spoofed_source_dropped_and_counted(start_emperor, netdir):
    emp, device, router_socket = start_network(start_emperor, netdir, rules=False)
    (emp.dir / "s.ini").write_text(vassal_ini(netdir, "198.18.0.2", "s", router_socket))
    wait_for(lambda: http("198.18.0.2"), 20, what="vassal up")
    before = wait_for(lambda: router_doc(emp)["running"] and router_doc(emp), 5, what="stats")["drops"]["spoofed"]
    assert http("198.18.0.2", f"/spoof?src=198.18.0.99&dst={HOST}") is True
    wait_for(lambda: router_doc(emp)["drops"]["spoofed"] > before, 5, what="spoofed drop counted")


def test_claimed_address_cannot_be_stolen(start_emperor, netdir):
    from netrouter.wire import frame

    emp, device, router_socket = start_network(start_emperor, netdir, rules=False)
    (emp.dir / "v.ini").write_text(vassal_ini(netdir, "198.18.0.2", "v", router_socket))
    wait_for(lambda: http("198.18.0.2"), 20, what="vassal up")
    before = wait_for(lambda: router_doc(emp)["running"] and router_doc(emp), 5, what="stats")["drops"]["spoofed"]
    udp = struct.pack("!HHHH", 9, 9, 8, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton("198.18.0.2"), socket.inet_aton(HOST))
    with socket.socket(socket.AF_UNIX) as thief:
        thief.connect(str(router_socket))
        thief.sendall(frame(header + udp))
        wait_for(lambda: router_doc(emp)["drops"]["spoofed"] > before, 5, what="the thief's packet dropped")
        owners = {c["address"]: c["vassal"] for c in router_doc(emp)["connections"]}
        assert owners["198.18.0.2"] == "v.ini"
        assert http("198.18.0.2") == "hello from v"


def test_router_restart_traffic_resumes(start_emperor, netdir):
    emp, device, router_socket = start_network(start_emperor, netdir, rules=False)
    (emp.dir / "r.ini").write_text(vassal_ini(netdir, "198.18.0.2", "r", router_socket))
    wait_for(lambda: http("198.18.0.2"), 20, what="vassal up")
    pid = wait_for(lambda: router_doc(emp).get("pid"), 5, what="router pid")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (d := router_doc(emp)).get("pid") not in (None, pid) and d["restarts"] == 1, 10, what="router restarted")
    assert wait_for(lambda: http("198.18.0.2", timeout=2), 15, what="traffic through the new router") == "hello from r"
    assert emp.vassal("r.ini")["restarts"] == 0  # the vassal kept running


def test_bad_firewall_rule_refuses_emperor(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "emperor", "--control", str(tmp_path / "c.sock"),
                             "--tuntap-router", f"pebad {tmp_path}/r.sock", "--tuntap-router-firewall-out", "allow 198.18.0.0/24",
                             str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "rule 'allow 198.18.0.0/24'" in result.stderr
    assert not os.path.exists("/sys/class/net/pebad")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(min_size=0, max_size=600), min_size=1, max_size=4))
def test_fuzz_router_keeps_serving(fuzz_network, junk):
    emp, router_socket, router_pid = fuzz_network
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(router_socket))
            for chunk in junk:
                sock.sendall(chunk)
        except OSError:
            pass
    assert psutil.pid_exists(router_pid)


@pytest.fixture(scope="module")
def fuzz_network(tmp_path_factory):
    """One emperor + router + healthy vassal for all fuzz examples; checked
    after. Its own subnet (198.19.0.0/24): it outlives the other tests here."""
    import subprocess
    import sys
    import uuid

    from tests.helpers import TEST_TAG, EmperorProc

    netdir = Path(tempfile.mkdtemp(prefix="pyemperor-fuzz-"))
    netdir.chmod(0o755)
    (netdir / "net.py").write_text(NET_APP)
    vassals = netdir / "vassals"
    vassals.mkdir()
    control = netdir / f"c-{uuid.uuid4().hex[:6]}.sock"
    device = f"pf{random.randint(0, 0xFFFFFF):06x}"
    router_socket = netdir / "router.sock"
    log = open(netdir / "emperor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "emperor", "--control", str(control), "--tuntap-router", f"{device} {router_socket}",
                             "--exec-as-root", f"ip addr add {FUZZ_HOST}/24 dev {device}", "--exec-as-root", f"ip link set {device} up",
                             str(vassals)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTEST_TAG": TEST_TAG})
    emp = EmperorProc(vassals, control, netdir / "emperor.log", proc)
    try:
        wait_for(control.exists, 10, what="emperor")
        (vassals / "healthy.ini").write_text(vassal_ini(netdir, FUZZ_VASSAL, "healthy", router_socket, FUZZ_HOST))
        wait_for(lambda: http(FUZZ_VASSAL), 20, what="healthy vassal")
        pid = wait_for(lambda: router_doc(emp).get("pid"), 5, what="router pid")
        yield emp, router_socket, pid
        # After all the junk: the same router still serves the healthy vassal.
        assert http(FUZZ_VASSAL) == "hello from healthy"
        assert router_doc(emp)["pid"] == pid
    finally:
        emp.stop()
        log.close()
        shutil.rmtree(netdir, ignore_errors=True)


def test_tuntap_example(tmp_path):
    """examples/vassals/tuntap: the seed's example emperor and vassal, as shipped."""
    import subprocess
    import sys

    from tests.helpers import ROOT, TEST_TAG, EmperorProc

    if os.path.exists("/sys/class/net/emperor0"):
        pytest.skip("an emperor0 device exists already")
    ini = ROOT / "examples" / "vassals" / "tuntap" / "emperor.ini"
    control = Path("/run/emperor/tuntap-demo.sock")
    log = open(tmp_path / "emperor.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "emperor", "--ini", str(ini)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTEST_TAG": TEST_TAG})
    emp = EmperorProc(ROOT / "examples" / "vassals" / "tuntap" / "vassals", control, tmp_path / "emperor.log", proc)
    try:
        body = wait_for(lambda: _raw_http("198.18.0.10", 8080), 20, what="the example vassal over the router")
        assert b"Hello, world!" in body
        assert emp.vassal("net1.ini")["state"] == "ready"
    finally:
        assert emp.stop() == 0
        log.close()
    assert not os.path.exists("/sys/class/net/emperor0")


def _raw_http(address: str, port: int) -> bytes | None:
    if not local_route(address):
        return None
    try:
        with socket.create_connection((address, port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data
    except OSError:
        return None


UWSGI_TUNTAP = os.environ.get("PYEMPEROR_UWSGI_TUNTAP", "/opt/uwsgi-tuntap/bin/uwsgi")
needs_uwsgi_tuntap = pytest.mark.skipif(not os.path.exists(UWSGI_TUNTAP),
                                        reason="uWSGI with the tuntap plugin is not built (see .ci/run)")


def _kill(proc) -> None:
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


@needs_uwsgi_tuntap
def test_our_tuntap_device_on_uwsgi_router(netdir, tmp_path):
    import subprocess
    import sys

    from tests.helpers import TEST_TAG

    device = f"pu{random.randint(0, 0xFFFFFF):06x}"
    usock = netdir / "uwsgi-router.sock"
    log = open(tmp_path / "uwsgi-router.log", "wb")
    router = subprocess.Popen([UWSGI_TUNTAP, "--master", "--tuntap-router", f"{device} {usock}"], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTEST_TAG": TEST_TAG})
    vassal = None
    try:
        wait_for(lambda: os.path.exists(f"/sys/class/net/{device}") and usock.exists(), 10, what="uWSGI's router")
        subprocess.run(["ip", "addr", "add", f"{HOST}/24", "dev", device], check=True)
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
        cfg = netdir / "ours.ini"
        cfg.write_text(
            "[uwsgi]\n"
            f"wsgi-file = {netdir}/net.py\n"
            "http-socket = 198.18.0.30:8080\n"
            "unshare = net,fs\n"
            f"tuntap-device = uwsgi0 {usock}\n"
            "net-iface = uwsgi0 198.18.0.30/24\n"
            f"net-route = default {HOST}\n"
            "env = ME=ours\n")
        vassal = subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTEST_TAG": TEST_TAG})
        assert wait_for(lambda: local_route("198.18.0.30") and http("198.18.0.30"), 20, what="our vassal via uWSGI's router") == "hello from ours"
        assert http("198.18.0.30", f"/ping?host={HOST}") is True
    finally:
        if vassal is not None:
            vassal.send_signal(signal.SIGTERM)
            vassal.wait(15)
        _kill(router)
        log.close()


def test_big_frames_only_for_peers_that_accept(netdir, tmp_path):
    """The router offers frames up to 65535 bytes; a peer that does not
    answer (as uWSGI) never gets one over 8192, the packet is counted."""
    import subprocess
    import sys

    from netrouter.client import claim_packet
    from netrouter.wire import BIG_FRAMES, OFFER_PAYLOAD, FrameBuffer, frame
    from tests.helpers import TEST_TAG

    device = f"pe{random.randint(0, 0xFFFFFF):06x}"
    sock_path, stats_path = netdir / "r.sock", netdir / "stats.sock"
    router = subprocess.Popen([sys.executable, "-m", "netrouter", device, str(sock_path), "--stats", str(stats_path)],
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTEST_TAG": TEST_TAG})
    peers = []
    try:
        wait_for(lambda: sock_path.exists() and os.path.exists(f"/sys/class/net/{device}"), 10, what="router")
        subprocess.run(["ip", "addr", "add", "198.18.2.1/24", "dev", device], check=True)
        subprocess.run(["ip", "link", "set", device, "mtu", "9000", "up"], check=True)

        def peer(address: str, accept: bool) -> tuple[socket.socket, FrameBuffer]:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(sock_path))
            sock.settimeout(3)
            # The router speaks first, once the peer's device is up (it sent a packet).
            sock.sendall(frame(claim_packet(address)))
            reader = FrameBuffer()
            frames = reader.feed(sock.recv(4096))
            assert frames[0][0] == BIG_FRAMES
            if accept:
                sock.sendall(frame(OFFER_PAYLOAD, BIG_FRAMES))
            peers.append(sock)
            return sock, reader

        plain, _ = peer("198.18.2.2", accept=False)
        ours, reader = peer("198.18.2.3", accept=True)
        time.sleep(0.3)
        assert local_route("198.18.2.2") and local_route("198.18.2.3")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: no fragments
            for address in ("198.18.2.2", "198.18.2.3"):
                udp.sendto(b"x" * 8900, (address, 9))
        ours.settimeout(3)
        got = []
        while not got:
            got = [p for m, p in reader.feed(ours.recv(65536)) if m == 0 and len(p) > 8192]
        assert len(got[0]) == 8928
        plain.settimeout(0.5)
        try:
            data = plain.recv(65536)
        except TimeoutError:
            data = b""
        assert all(len(p) <= 8192 for _, p in FrameBuffer().feed(data)) if data else True
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(stats_path))
            stats = json.loads(s.recv(65536))
        assert stats["drops"]["oversize"] >= 1
    finally:
        for sock in peers:
            sock.close()
        router.send_signal(signal.SIGTERM)
        router.wait(10)
        subprocess.run(["ip", "link", "del", device], capture_output=True)


PLAIN_BRIDGE = """
import fcntl, os, select, socket, struct, sys
sys.path.insert(0, sys.argv[4])
from netrouter.wire import FrameBuffer, frame
from netrouter.client import claim_packet
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22s", b"pt0", 0x0001 | 0x1000, b""))  # IFF_TUN | IFF_NO_PI: no offloads
os.system(f"ip addr add {sys.argv[2]}/24 dev pt0 && ip link set pt0 up && ip link set lo up")
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(frame(claim_packet(sys.argv[2])))  # a plain peer: answers no offer
reader = FrameBuffer()
server = socket.create_server((sys.argv[2], int(sys.argv[3])))
print("ready", flush=True)
conn = None
import hashlib
digest, total = hashlib.sha256(), 0
while True:
    ready, _, _ = select.select([fd, sock, server] + ([conn] if conn else []), [], [])
    if fd in ready:
        sock.sendall(frame(os.read(fd, 65536)))
    if sock in ready:
        data = sock.recv(262144)
        if not data:
            break
        for modifier2, packet in reader.feed(data):
            assert len(packet) <= 8192, len(packet)
            if modifier2 == 0:
                os.write(fd, packet)
    if server in ready:
        conn, _ = server.accept()
    if conn is not None and conn in ready:
        chunk = conn.recv(262144)
        digest.update(chunk)
        total += len(chunk)
        if not chunk:
            conn.sendall(digest.hexdigest().encode())
            conn.close()
            conn = None
"""


def test_plain_peer_gets_segmented_checksummed_packets(netdir):
    """The router's device hands it 64 KB TCP super-packets with partial
    checksums; a peer without offloads (as uWSGI) gets MSS-sized segments
    with complete checksums, which a kernel without offloads accepts."""
    import subprocess
    import sys

    from tests.helpers import TEST_TAG

    tag = f"{random.randint(0, 0xFFFFFF):06x}"
    device, ns = f"pe{tag}", f"pens{tag}"
    sock_path, stats_path = netdir / "r.sock", netdir / "stats.sock"
    env = {**os.environ, "PYTEST_TAG": TEST_TAG}
    router = subprocess.Popen([sys.executable, "-m", "netrouter", device, str(sock_path), "--stats", str(stats_path)],
                              stderr=subprocess.DEVNULL, env=env)
    bridge = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        wait_for(lambda: sock_path.exists() and os.path.exists(f"/sys/class/net/{device}"), 10, what="router")
        subprocess.run(["ip", "addr", "add", "198.18.4.1/24", "dev", device], check=True)
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
        bridge = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PLAIN_BRIDGE, str(sock_path),
                                   "198.18.4.2", "5001", os.getcwd()], stdout=subprocess.PIPE, env=env)
        assert bridge.stdout.readline().strip() == b"ready"
        assert wait_for(lambda: local_route("198.18.4.2") and host_ping("198.18.4.2"), 10, what="plain peer")
        payload = os.urandom(16 << 20)
        with socket.create_connection(("198.18.4.2", 5001), timeout=30) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = client.recv(100)
        assert answer.decode() == hashlib.sha256(payload).hexdigest()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(stats_path))
            stats = json.loads(s.recv(65536))
        (peer,) = stats["connections"]
        assert peer["offloads"] is False
        # Super-packets came off the device: far fewer reads than segments
        # (how many segments a super-packet holds follows the sender's pace:
        # some 4-10 here, nearer 2-4 on an emulated guest; 1 without GSO).
        assert stats["tun"]["packets_in"] < len(payload) // 1448 * 3 // 4
        assert peer["packets_in"] > len(payload) // 1448
    finally:
        if bridge is not None:
            bridge.kill()
            bridge.wait()
        router.send_signal(signal.SIGTERM)
        router.wait(10)
        subprocess.run(["ip", "link", "del", device], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_passed_fd_must_be_a_tun_device_with_offload_headers(netdir):
    """A peer answering the TUN_FD offer with anything but a tun device with
    virtio headers (a pipe, a plain tun) is refused and counted; the
    connection keeps working over the socket."""
    import array
    import subprocess
    import sys

    from jails.tun import open_tun
    from netrouter.client import claim_packet
    from netrouter.wire import OFFER_PAYLOAD, TUN_FD, VNET_OFFER, FrameBuffer, frame
    from tests.helpers import TEST_TAG

    tag = f"{random.randint(0, 0xFFFFFF):06x}"
    device = f"pe{tag}"
    sock_path, stats_path = netdir / "r.sock", netdir / "stats.sock"
    router = subprocess.Popen([sys.executable, "-m", "netrouter", device, str(sock_path), "--stats", str(stats_path)],
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTEST_TAG": TEST_TAG})
    read_end, write_end = os.pipe()
    plain_tun = None
    try:
        wait_for(lambda: sock_path.exists() and os.path.exists(f"/sys/class/net/{device}"), 10, what="router")
        plain_tun = open_tun(f"pf{tag}")  # no IFF_VNET_HDR

        def stats() -> dict:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(stats_path))
                return json.loads(s.recv(65536))

        for index, bad_fd in enumerate((read_end, plain_tun)):
            with socket.socket(socket.AF_UNIX) as peer:
                peer.connect(str(sock_path))
                peer.settimeout(3)
                peer.sendall(frame(claim_packet(f"198.18.5.{index + 2}")))
                offers = [m for m, _ in FrameBuffer().feed(peer.recv(4096))]
                assert TUN_FD in offers and VNET_OFFER in offers  # the router speaks first
                before = stats()["drops"]["malformed"]
                peer.sendall(frame(OFFER_PAYLOAD, VNET_OFFER))
                peer.sendmsg([frame(OFFER_PAYLOAD, TUN_FD)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [bad_fd]))])
                wait_for(lambda b=before: stats()["drops"]["malformed"] > b, 5, what="the passed fd refused")
                (conn,) = stats()["connections"]
                assert conn["offloads"] is True and conn["direct"] is False
        # The router kept no copy of either.
        ours = f"pipe:[{os.fstat(read_end).st_ino}]"
        assert ours not in open_fd_targets(router.pid)
        assert router.poll() is None
    finally:
        os.close(read_end)
        os.close(write_end)
        if plain_tun is not None:
            os.close(plain_tun)
        router.send_signal(signal.SIGTERM)
        router.wait(10)
        subprocess.run(["ip", "link", "del", device], capture_output=True)


@needs_uwsgi_tuntap
def test_uwsgi_tuntap_device_on_our_router(netdir, tmp_path):
    """uWSGI's own tuntap-device against our router: it hears no offer until
    its device is up (it exits when a write to a down device fails), claims
    its address with its first packet, and TCP flows both ways. uWSGI 2.0
    runs its unshare and tuntap hook more than once (one namespace each):
    each new connection of the same process takes the address over without
    closing the older ones, whose closing would make uWSGI exit."""
    import subprocess
    import sys

    from tests.helpers import TEST_TAG

    device = f"pe{random.randint(0, 0xFFFFFF):06x}"
    sock_path, stats_path = netdir / "r.sock", netdir / "stats.sock"
    env = {**os.environ, "PYTEST_TAG": TEST_TAG}
    router = subprocess.Popen([sys.executable, "-m", "netrouter", device, str(sock_path), "--stats", str(stats_path)],
                              stderr=subprocess.DEVNULL, env=env)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_bytes(b"hello from uWSGI's namespace")
    (site / "big").write_bytes(blob(2 << 20))
    log = open(tmp_path / "uwsgi-device.log", "wb")
    uwsgi = None
    try:
        wait_for(lambda: sock_path.exists() and os.path.exists(f"/sys/class/net/{device}"), 10, what="router")
        subprocess.run(["ip", "addr", "add", "198.18.7.1/24", "dev", device], check=True)
        subprocess.run(["ip", "link", "set", device, "up"], check=True)
        claim = "/usr/bin/python3 -c \"import socket; socket.socket(2, 2).sendto(b'claim', ('198.18.7.1', 9))\""
        uwsgi = subprocess.Popen([
            UWSGI_TUNTAP, "--master", "--unshare", "net", "--tuntap-device", f"uwsgi0 {sock_path}",
            "--exec-as-root", "ip addr add 198.18.7.5/24 dev uwsgi0", "--exec-as-root", "ip link set uwsgi0 up",
            "--exec-as-root", "ip link set lo up", "--exec-as-root", "ip route add default via 198.18.7.1",
            "--exec-as-root", claim,  # uWSGI's docs: a peer claims its address with its first packet
            "--attach-daemon", f"/usr/bin/python3 -m http.server --bind 198.18.7.5 --directory {site} 8080",
        ], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        assert wait_for(lambda: local_route("198.18.7.5") and host_ping("198.18.7.5", 1), 20, what="uWSGI's device")

        def get(path: str) -> bytes | None:
            try:
                with socket.create_connection(("198.18.7.5", 8080), timeout=5) as sock:
                    sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                    data = bytearray()
                    while chunk := sock.recv(65536):
                        data += chunk
            except OSError:
                return None
            return bytes(data).partition(b"\r\n\r\n")[2]

        assert wait_for(lambda: get("/index.html"), 15, what="HTTP to uWSGI's namespace") == b"hello from uWSGI's namespace"
        assert get("/big") == blob(2 << 20)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(stats_path))
            stats = json.loads(s.recv(65536))
        (owner,) = [c for c in stats["connections"] if c["address"] == "198.18.7.5"]
        assert not owner["big_frames"] and not owner["offloads"] and not owner["direct"]  # a plain peer
        assert uwsgi.poll() is None
    finally:
        if uwsgi is not None:
            # Its daemons run in sessions of their own: kill the whole tree.
            try:
                tree = psutil.Process(uwsgi.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            uwsgi.kill()
            uwsgi.wait()
        log.close()
        router.send_signal(signal.SIGTERM)
        router.wait(10)
        subprocess.run(["ip", "link", "del", device], capture_output=True)
