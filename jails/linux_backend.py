"""The Linux backend: namespaces, mounts, cgroups (jails/linux.py and
jails/namespaces.py; the policy of which namespaces a vassal gets is in
vassal/phases.py)."""

from __future__ import annotations

import os
import socket
import struct

from bedrock.config import Config, Problem
from jails import linux, namespaces
from jails.base import Backend, refuse

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
FREEBSD_ONLY = {
    key: f"{key} is FreeBSD only (on Linux use unshare, pivot-root, chroot)"
    for key in ("jail", "jail2", "jail-ip4", "jail-ip6", "jidfile", "jail-attach")
}


class LinuxBackend(Backend):
    name = "linux"

    def refused(self, config: Config) -> list[Problem]:
        return refuse(config, FREEBSD_ONLY)

    def config_problems(self, config: Config) -> list[Problem]:
        found = []
        for key in ("uid-map", "gid-map"):
            for value, entry in zip(config.getlist(key), config.sources.get(key, []), strict=False):
                try:
                    linux.parse_id_map(str(value), key)
                except linux.JailError as exc:
                    found.append(Problem(entry.file, entry.line, key, str(exc)))
        return found

    def isolate(self, config: Config) -> None:
        namespaces.enter_namespaces(config)

    def configure_network(self, config: Config) -> None:
        namespaces.configure_network(config)

    def change_root(self, config: Config) -> None:
        namespaces.change_root(config)

    def rss(self, pid: int) -> int:
        """/proc/PID/statm: one small read (a worker's access log line may
        ask, with memory-report), psutil's reads two files."""
        try:
            with open(f"/proc/{pid}/statm") as handle:
                return int(handle.read().split()[1]) * PAGE_SIZE
        except FileNotFoundError:
            return super().rss(pid)  # no /proc here (a chroot)
        except (OSError, ValueError, IndexError):
            return 0

    def listen_backlog(self, sock: socket.socket) -> int:
        """TCP_INFO's tcpi_unacked, which is the accept queue's length on a
        listening socket (struct tcp_info: offset 24)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return 0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:
            return 0
        return struct.unpack_from("I", info, 24)[0] if len(info) >= 28 else 0

    def interface_up(self, device: str) -> None:
        linux.interface_up(device)

    def id_maps(self, config: Config, owner: tuple[int, int] | None = None) -> tuple[str, str]:
        return namespaces.id_maps(config, owner)

    def clone_for_spawn(self, clone, id_maps, tun_devices: int = 0) -> tuple[bool, list[int]]:
        """With a user namespace: made first, mapped, and owning the others.
        Its root may make tun devices in its network namespace but may not
        open /dev/net/tun where that is 0600: opened here before the uid
        changes (in the new network namespace, which the fd then belongs to)."""
        flags = linux.namespace_flags(clone)
        tun: list[int] = []
        if flags & linux.CLONE_NEWUSER:
            uid_map, gid_map = id_maps or (linux.default_id_map("uid"), linux.default_id_map("gid"))
            opener = (lambda: tun.extend(linux.open_tun_nodes(tun_devices))) if tun_devices and flags & linux.CLONE_NEWNET else None
            linux.unshare_user(flags & ~linux.CLONE_NEWUSER, uid_map, gid_map, while_root=opener)
        elif flags:
            linux.unshare(flags)
        return bool(flags & linux.CLONE_NEWPID), tun

    def become_subreaper(self) -> bool:
        return linux.become_subreaper()

    def die_with_parent(self, sig: int) -> None:
        linux.die_with_parent(sig)

    def peer_credentials(self, sock) -> tuple[int, int, int]:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", data)
        return pid, uid, gid

    def drop_privileges(self, uid, gid, user_name) -> None:
        linux.drop_privileges(uid, gid, user_name)

    def owns_process(self, pid: int) -> bool:
        """As PID 1 of the vassal's pid namespace every pid we can name is
        ours; otherwise a process is ours if it sits in our cgroups (a
        daemon that double-forked away from us is still there)."""
        if os.getpid() == 1:
            return True
        try:
            with open("/proc/self/cgroup") as handle:
                mine = handle.read()
            with open(f"/proc/{pid}/cgroup") as handle:
                theirs = handle.read()
        except OSError:
            return False
        if "pyemperor." in mine:
            return mine == theirs
        return super().owns_process(pid)

    def mount(self, fstype: str, source: str, target: str, flags: list[str]) -> None:
        bits = linux.parse_mount_flags(flags)
        linux.mount(source, target, None if fstype in ("none", "bind") and bits & linux.MS_BIND else fstype, bits)

    def umount(self, target: str, flags: list[str]) -> None:
        linux.umount(target, linux.parse_umount_flags(flags))

    def sethostname(self, name: str) -> None:
        linux.sethostname(name)
