"""What the network tests share: the in-namespace test app (NET_APP) and
clients that reach a vassal by its 198.18.0.0/15 address."""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess

from netrouter.wire import checksum

NET_APP = '''
import json, os, socket, struct
from urllib.parse import parse_qs


def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(2)
    ident = os.getpid() & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"pyemperor"
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    sock.sendto(body, (host, 0))
    try:
        while True:
            data, addr = sock.recvfrom(2048)
            icmp = data[(data[0] & 15) * 4:]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    except OSError:
        return False
    finally:
        sock.close()


def connect(host, port):
    try:
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            return sock.recv(100).decode()
    except OSError as exc:
        return "error: %s" % exc


def spoof(src, dst):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    udp = struct.pack("!HHHH", 9, 9, 8, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    sock.sendto(header + udp, (dst, 0))
    sock.close()
    return True


def blob(size):
    return bytes(i * 7 % 251 for i in range(251)) * (size // 251) + bytes(size % 251)


def application(environ, start_response):
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ["PATH_INFO"]
    if path == "/blob":
        body = blob(int(q["size"]))
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if path == "/ping":
        result = ping(q["host"])
    elif path == "/connect":
        result = connect(q["host"], q["port"])
    elif path == "/spoof":
        result = spoof(q["src"], q["dst"])
    elif path == "/sha":
        import hashlib
        result = hashlib.sha256(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))).hexdigest()
    else:
        result = "hello from " + os.environ.get("ME", "?")
    body = json.dumps(result).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def local_route(address: str) -> bool:
    """True only if ``address`` is routed through a device these tests made.
    Every packet a test sends is checked first: without our route, traffic
    to 198.18.0.0/15 would head for the machine's real uplink."""

    result = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True, text=True)
    if result.returncode != 0:
        return False
    try:
        routes = json.loads(result.stdout)
    except ValueError:
        return False
    return bool(routes) and str(routes[0].get("dev", "")).startswith(("pe", "pf", "pu", "emperor0")) and "gateway" not in routes[0]


def host_ping(address: str, timeout: float = 2.0) -> bool:
    if not local_route(address):
        return False
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(timeout)
    ident = random.randint(1, 0xFFFF)
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"host"
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    try:
        sock.sendto(body, (address, 0))
        while True:
            data, _ = sock.recvfrom(2048)
            icmp = data[(data[0] & 15) * 4:]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    except OSError:
        return False
    finally:
        sock.close()


def blob(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(251)) * (size // 251) + bytes(size % 251)


def http(address: str, path: str = "/", port: int = 8080, timeout: float = 5.0, body: bytes | None = None, raw: bool = False):
    if not local_route(address):
        return None
    method = "GET" if body is None else "POST"
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body or b'')}\r\n\r\n".encode())
            if body:
                sock.sendall(body)
            data = bytearray()
            while chunk := sock.recv(262144):
                data += chunk
    except OSError:
        return None
    head, _, answer = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return answer if raw else json.loads(answer)
