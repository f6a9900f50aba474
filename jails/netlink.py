"""Minimal rtnetlink: add an IPv4 address or route, as ``ip`` would, with no
binary and no library import (pyroute2 costs ~200 ms to import, too much
for every vassal start)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from jails.base import JailError

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1


class NetlinkError(JailError):
    pass


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _request(msg_type: int, body: bytes) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        header = struct.pack("=IHHII", 16 + len(body), msg_type, flags, 1, 0)
        sock.send(header + body)
        data = sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", data)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, 16)
            if error:
                raise NetlinkError(os.strerror(-error))


def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NetlinkError(f"no such interface {name!r}") from None


def add_address(device: str, cidr: str) -> None:
    """``ip addr add CIDR dev DEVICE``."""
    iface = ipaddress.IPv4Interface(cidr)
    body = struct.pack("=BBBBI", socket.AF_INET, iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, ifindex(device))
    packed = iface.ip.packed
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    try:
        _request(RTM_NEWADDR, body)
    except NetlinkError as exc:
        raise NetlinkError(f"net-iface {device} {cidr}: {exc}") from None


def add_route(destination: str, gateway: str, device: str | None = None) -> None:
    """``ip route add DEST via GATEWAY`` (DEST may be ``default``)."""
    network = ipaddress.IPv4Network("0.0.0.0/0" if destination == "default" else destination, strict=False)
    gw = ipaddress.IPv4Address(gateway)
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, network.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                       RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    if network.prefixlen:
        body += _attr(RTA_DST, network.network_address.packed)
    body += _attr(RTA_GATEWAY, gw.packed)
    if device:
        body += _attr(RTA_OIF, struct.pack("=I", ifindex(device)))
    try:
        _request(RTM_NEWROUTE, body)
    except NetlinkError as exc:
        raise NetlinkError(f"net-route {destination} {gateway}: {exc}") from None
