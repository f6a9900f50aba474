"""Linux tun devices (/dev/net/tun, IFF_TUN | IFF_NO_PI)."""

from __future__ import annotations

import fcntl
import os
import struct

from jails.base import JailError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN = 0x01, 0x02, 0x08
# What our side can finish or pass on: checksums and TCP/IPv4 segmentation.
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN


class TunError(JailError):
    pass


# Tyrant mode: /dev/net/tun fds opened for the vassal by the spawning child,
# as root, in the vassal's network namespace, before it became the owner (the
# node may be 0600): their numbers, for open_tun to take in order.
ENV_TUN_FDS = "PYEMPEROR_TUN_FDS"


def handed_tun_fd() -> int | None:
    fds = [f for f in os.environ.get(ENV_TUN_FDS, "").split(",") if f.isdigit()]
    if not fds:
        return None
    os.environ[ENV_TUN_FDS] = ",".join(fds[1:])
    fd = int(fds[0])
    os.set_inheritable(fd, False)
    return fd


def open_tun(name: str, persist: bool | None = None, vnet: bool = False, handed: bool = False) -> int:
    """Create (or attach to) tun device ``name``; a non-blocking fd. With
    ``vnet`` every read and write carries a virtio_net_hdr (netrouter.offload).
    ``handed``: use a /dev/net/tun fd opened for us, if we were given one."""
    if len(name.encode()) > 15:
        raise TunError(f"tun device name {name!r} is longer than 15 bytes")
    try:
        fd = handed_tun_fd() if handed else None
        if fd is None:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("no /dev/net/tun: the netrouter and tuntap-device need Linux's tun driver "
                       "(FreeBSD's tun(4) is not supported)") from None
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22s", name.encode(), IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0), b""))
        if persist is not None:
            fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot create tun device {name}: {exc.strerror}") from None
    return fd


def set_offloads(fd: int, enabled: bool) -> None:
    """Let the kernel hand this fd super-packets and partial checksums (only
    on a fd opened with ``vnet``)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS if enabled else 0)


def disable_ipv6(name: str) -> None:
    """No stray IPv6 packet (router solicitations...) may be taken for a claim."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as handle:
            handle.write("1")
    except OSError:
        pass


def delete_persistent(name: str) -> None:
    fd = open_tun(name)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)


TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
IFF_TAP = 0x0002
_KIND_MASK = IFF_TUN | IFF_TAP | IFF_NO_PI | IFF_VNET_HDR


def is_framed_tun(fd: int, header_size: int) -> bool:
    """``fd`` is a tun device (not tap) without packet info and with
    virtio_net_hdr offload headers of ``header_size`` bytes: anything else
    (another file a peer passed) is not."""
    try:
        flags = struct.unpack_from("H", fcntl.ioctl(fd, TUNGETIFF, bytes(40)), 16)[0]
        size = struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0]
    except OSError:
        return False
    return flags & _KIND_MASK == IFF_TUN | IFF_NO_PI | IFF_VNET_HDR and size == header_size
