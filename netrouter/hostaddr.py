"""The router's own addresses, kept current from rtnetlink.

The router's device gets its addresses from the operator (``exec-as-root``
before the router starts, or ``ip addr`` at any time when it runs alone), so
they are read from the kernel, not from the command line, and re-read on
every address change the kernel announces (RTMGRP_IPV4_IFADDR). No vassal may
claim one of them: packets from the other vassals to the host would go to
the claimant instead (DESIGN 6).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
NLMSG_HEADER = struct.Struct("=IHHII")
IFADDRMSG = struct.Struct("=BBBBI")


class AddressError(Exception):
    pass


def _parse_addresses(data: bytes, index: int) -> tuple[list[tuple[int, int]], bool]:
    """(address, prefix length) of every IPv4 address of interface ``index``
    in one batch of a dump, and whether the dump is complete."""
    found: list[tuple[int, int]] = []
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return found, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return found, True
        if kind == RTM_NEWADDR:
            body = offset + NLMSG_HEADER.size
            family, prefix, _, _, ifindex = IFADDRMSG.unpack_from(data, body)
            attributes: dict[int, bytes] = {}
            at = body + IFADDRMSG.size
            while at + 4 <= offset + length:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                attributes[attr] = data[at + 4:at + size]
                at += (size + 3) & ~3
            # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
            # peer's on a point-to-point link, as tun devices may be).
            local = attributes.get(IFA_LOCAL) or attributes.get(IFA_ADDRESS)
            if family == socket.AF_INET and ifindex == index and local and len(local) == 4:
                found.append((int.from_bytes(local, "big"), prefix))
        offset += (length + 3) & ~3
    return found, False


def interface_addresses(index: int) -> list[tuple[int, int]]:
    """(address, prefix length) of every IPv4 address of interface ``index``."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        body = IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
        sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        found: list[tuple[int, int]] = []
        done = False
        while not done:
            batch, done = _parse_addresses(sock.recv(65536), index)
            found += batch
        return found


def reserved_addresses(addresses: list[tuple[int, int]]) -> set[int]:
    """The addresses themselves, and the network and broadcast address of
    each one's subnet (a vassal holding those would get the host's
    broadcasts)."""
    reserved: set[int] = set()
    for address, prefix in addresses:
        reserved.add(address)
        if prefix <= 30:
            network = ipaddress.IPv4Network((address, prefix), strict=False)
            reserved.add(int(network.network_address))
            reserved.add(int(network.broadcast_address))
    return reserved


class AddressWatch:
    """The reserved addresses of one device, refreshed when ``readable`` is
    called (the caller watches ``fileno()``)."""

    def __init__(self, device: str) -> None:
        try:
            self.index = socket.if_nametoindex(device)
            # Subscribed before the first read, so no change in between is missed.
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                      NETLINK_ROUTE)
        except OSError as exc:
            raise AddressError(f"cannot watch the addresses of {device}: {exc.strerror or exc}") from None
        try:
            self.sock.bind((0, RTMGRP_IPV4_IFADDR))
            self.addresses = reserved_addresses(interface_addresses(self.index))
        except OSError as exc:
            self.sock.close()
            raise AddressError(f"cannot watch the addresses of {device}: {exc.strerror or exc}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self) -> bool:
        """Drain the announcements and read the addresses again (whatever
        changed, on whichever device: a full read is a few hundred bytes);
        True if ours changed."""
        while True:
            try:
                if not self.sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # ENOBUFS: announcements were lost; the read below catches up
        try:
            fresh = reserved_addresses(interface_addresses(self.index))
        except OSError:
            return False
        changed = fresh != self.addresses
        self.addresses = fresh
        return changed

    def close(self) -> None:
        self.sock.close()
