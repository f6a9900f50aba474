"""Linux: a vassal's own namespaces, its private mounts, fresh /proc and
/sys, lo, the hostname, its interfaces' addresses and routes, pivot-root
and chroot, and the uid/gid maps of a user namespace. Called through the
backend (jails/linux_backend.py); which namespaces a vassal may have is the
vassal's policy (vassal/phases.py)."""

from __future__ import annotations

import os

from bedrock.config import Config
from bedrock.log import log
from bedrock.proc import proxy_pid1
from bedrock.protocol import cloned_namespaces, tyrant_owner
from jails import linux, netlink
from jails.base import own_namespaces


def enter_namespaces(config: Config) -> None:
    """The namespaces this vassal makes itself, fresh /proc and /sys, lo,
    the hostname."""
    cloned = cloned_namespaces()
    own = own_namespaces(config)
    fresh = own - cloned
    if fresh:
        flags = linux.namespace_flags(fresh)
        if "user" in fresh:
            uid_map, gid_map = id_maps(config)
            linux.unshare_user(flags & ~linux.CLONE_NEWUSER, uid_map, gid_map)
        else:
            linux.unshare(flags)
        if "pid" in fresh:
            proxy_pid1()
    have = cloned | own
    if "fs" in have:
        linux.make_mounts_private()
        if "pid" in have:
            linux.mount_proc()
        if "net" in have:
            linux.mount_sys()
    if "net" in have:
        linux.interface_up("lo")
    if config.has("hostname"):
        linux.sethostname(config.get_str("hostname"))


def configure_network(config: Config) -> None:
    """net-mtu, net-iface (address, then up) and net-route over netlink (no
    binaries needed in the jail), once the tun devices exist."""
    for device, mtu in config.getlist("net-mtu"):
        if not (mtu.isascii() and mtu.isdigit()) or not 68 <= int(mtu) <= 65535:
            raise linux.JailError(f"net-mtu {device}: MTU must be 68..65535, not {mtu!r}")
        linux.set_mtu(device, int(mtu))
    for device, cidr in config.getlist("net-iface"):
        netlink.add_address(device, cidr)
        linux.interface_up(device)
    for destination, gateway in config.getlist("net-route"):
        netlink.add_route(destination, gateway)


def change_root(config: Config) -> None:
    """pivot-root, then chroot."""
    if config.has("pivot-root"):
        new_root, old_root = config.get_words("pivot-root")
        pivot_root(new_root, old_root)
    if config.has("chroot"):
        directory = config.get_str("chroot")
        os.chroot(directory)
        os.chdir("/")


def pivot_root(new_root: str, old_root: str) -> None:
    """pivot_root into NEW (bound onto itself if it is not a mount point),
    then detach the old root so no host path stays reachable."""
    new_root = os.path.abspath(new_root)
    if not os.path.isdir(new_root):
        raise linux.JailError(f"pivot-root: {new_root} is not a directory")
    if not linux.is_mount_point(new_root):
        log(f"pivot-root: {new_root} is not a mount point, binding it onto itself")
        linux.mount(new_root, new_root, None, linux.MS_BIND | linux.MS_REC)
    put_old = os.path.join(new_root, old_root.lstrip("/"))
    os.makedirs(put_old, exist_ok=True)
    linux.pivot_root(new_root, put_old)
    os.chdir("/")
    inside = "/" + old_root.lstrip("/")
    linux.umount(inside, linux.MNT_DETACH)
    try:
        os.rmdir(inside)
    except OSError:
        pass


def id_maps(config: Config, owner: tuple[int, int] | None = None) -> tuple[str, str]:
    """The vassal's uid/gid maps; in tyrant mode always root -> the file's owner."""
    owner = owner or tyrant_owner()
    if owner is not None:
        return f"0 {owner[0]} 1", f"0 {owner[1]} 1"
    uid_map = linux.parse_id_map(config.get_str("uid-map"), "uid-map") if config.has("uid-map") else linux.default_id_map("uid")
    gid_map = linux.parse_id_map(config.get_str("gid-map"), "gid-map") if config.has("gid-map") else linux.default_id_map("gid")
    return uid_map, gid_map
