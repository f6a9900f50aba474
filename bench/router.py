#!/usr/bin/env python3
"""Router throughput: host -> vassal TCP (iperf3) and ping RTT, side by side:

(a) through our netrouter (a `vassal` with tuntap-device, iperf3 -s as an
    attached daemon inside its network namespace)
(b) the same vassal through uWSGI's tuntap router (uWSGI built with the
    tuntap plugin, see .ci/run)
(c) the kernel's own routing over a veth pair into a namespace

Each line: Gbit/s, packets/s leaving the host-side device (with TUN offloads
and veth GSO these are super-packets of up to 64 KB), ping RTT, and the
ratio to (c).

Addresses from 198.18.0.0/15 only, on devices made here and removed after.
Needs iperf3 (apt-get install iperf3). Prints Gbit/s, RTT and ratios to (c).

    /opt/pyemperor/bin/python bench/router.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
UWSGI_TUNTAP = os.environ.get("PYEMPEROR_UWSGI_TUNTAP", "/opt/uwsgi-tuntap/bin/uwsgi")
HOST, VASSAL = "198.18.0.1", "198.18.0.2"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError("timed out")


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def rtt_ms(address: str, count: int = 50) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(1)
    times = []
    for seq in range(count):
        body = struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + b"bench!"
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        start = time.perf_counter()
        sock.sendto(body, (address, 0))
        try:
            while True:
                data = sock.recv(2048)
                icmp = data[(data[0] & 15) * 4:]
                if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x4242, seq):
                    times.append((time.perf_counter() - start) * 1000)
                    break
        except OSError:
            pass
    sock.close()
    return statistics.median(times) if times else float("nan")


def tx_packets(device: str, netns: str | None = None) -> int:
    if netns is None:
        return int(Path(f"/sys/class/net/{device}/statistics/tx_packets").read_text())
    out = sh("ip", "netns", "exec", netns, "cat", f"/sys/class/net/{device}/statistics/tx_packets").stdout
    return int(out)


def iperf(address: str, seconds: int) -> float:
    doc = json.loads(sh("iperf3", "-c", address, "-t", str(seconds), "-J", check=False).stdout or "{}")
    if "error" in doc or "sum_received" not in doc.get("end", {}):
        print(f"iperf3 to {address} failed: {doc.get('error', 'no result')}", file=sys.stderr)
        return float("nan")
    return doc["end"]["sum_received"]["bits_per_second"] / 1e9


def vassal_config(work: Path, router_socket: Path, mtu: int) -> Path:
    cfg = work / "bench-vassal.ini"
    cfg.write_text(
        "[uwsgi]\nunshare = net,fs\n"
        f"tuntap-device = uwsgi0 {router_socket}\n"
        f"net-mtu = uwsgi0 {mtu}\n"
        f"net-iface = uwsgi0 {VASSAL}/24\nnet-route = default {HOST}\n"
        f"attach-daemon = iperf3 -s -B {VASSAL}\n")
    return cfg


def through(kind: str, work: Path, seconds: int, mtu: int) -> tuple[float, float, float]:
    device = "pbench0"
    router_socket = work / f"{kind}.sock"
    if kind == "ours":
        router = subprocess.Popen([str(BIN / "netrouter"), device, str(router_socket)], stderr=subprocess.DEVNULL)
    else:
        router = subprocess.Popen([UWSGI_TUNTAP, "--master", "--tuntap-router", f"{device} {router_socket}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vassal = None
    try:
        wait(lambda: os.path.exists(f"/sys/class/net/{device}") and router_socket.exists(), 10)
        sh("ip", "addr", "add", f"{HOST}/24", "dev", device)
        sh("ip", "link", "set", device, "mtu", str(mtu), "up")
        vassal = subprocess.Popen([str(BIN / "vassal"), str(vassal_config(work, router_socket, mtu))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Not a TCP probe: iperf3 -s would take it for a test's control connection.
        wait(lambda: not math.isnan(rtt_ms(VASSAL, 1)), 15)
        time.sleep(1.0)
        before = tx_packets(device)
        gbit = iperf(VASSAL, seconds)
        return gbit, (tx_packets(device) - before) / seconds, rtt_ms(VASSAL)
    finally:
        if vassal is not None:
            vassal.send_signal(signal.SIGTERM)
            vassal.wait(15)
        router.send_signal(signal.SIGINT)
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
        sh("ip", "link", "del", device, check=False)


def veth(seconds: int, mtu: int) -> tuple[float, float, float]:
    ns, host_if, ns_if = "pbenchns", "pbv0", "pbv1"
    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", "198.18.1.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "mtu", str(mtu), "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", "198.18.1.2/24", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "mtu", str(mtu), "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-B", "198.18.1.2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: not math.isnan(rtt_ms("198.18.1.2", 1)), 10)
        time.sleep(1.0)
        before = tx_packets(host_if)
        gbit = iperf("198.18.1.2", seconds)
        return gbit, (tx_packets(host_if) - before) / seconds, rtt_ms("198.18.1.2")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--mtu", type=int, action="append", help="MTUs to measure (default 1500 and 65000)")
    args = parser.parse_args()
    mtus = args.mtu or [1500, 65000]
    if shutil.which("iperf3") is None:
        print("bench/router.py needs iperf3: apt-get install -y iperf3", file=sys.stderr)
        return 2
    for mtu in mtus:
        results = {}
        with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
            work = Path(tmp)
            results["kernel veth"] = veth(args.seconds, mtu)
            results["ours"] = through("ours", work, args.seconds, mtu)
            # uWSGI reads frames into 8196 bytes: past that MTU it cannot work.
            if os.path.exists(UWSGI_TUNTAP) and mtu <= 8000:
                results["uWSGI tuntap"] = through("uwsgi", work, args.seconds, mtu)
        base = results["kernel veth"][0]
        for name, (gbit, pps, rtt) in results.items():
            print(f"{name:>13}: {gbit:6.2f} Gbit/s at MTU {mtu}, {pps / 1000:7.1f} k packets/s host -> vassal "
                  f"(device packets: super-packets with offloads), RTT {rtt:.3f} ms, ratio to veth {gbit / base:.3f}", flush=True)
        if "uWSGI tuntap" in results:
            print(f"ours / uWSGI at MTU {mtu}: {results['ours'][0] / results['uWSGI tuntap'][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
