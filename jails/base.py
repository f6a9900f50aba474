"""What a platform's jail backend does for the emperor and its vassals.

One backend per platform (jails/__init__.py picks it); nothing outside
jails/ asks which OS it runs on. The Linux backend isolates with namespaces
and cgroups, the FreeBSD one with jail(2) and rctl.
"""

from __future__ import annotations

import abc
import grp
import os
import pwd

from bedrock import proc
from bedrock.config import Config, Problem


class JailError(Exception):
    """A jail could not be set up; the message names what and why."""


class Backend(abc.ABC):
    name = "?"
    # memory-limit, pids-limit, cpu-limit: cgroups the emperor makes (Linux),
    # or something the vassal's isolate sets up itself (FreeBSD's rctl).
    limits_in_cgroups = True

    @abc.abstractmethod
    def refused(self, config: Config) -> list[Problem]:
        """Keys this platform cannot honour, each named with its file and line."""

    @abc.abstractmethod
    def isolate(self, config: Config) -> None:
        """Between the pre-jail and post-jail hooks, as root: enter the
        vassal's jail (namespaces or jail(2), mounts, hostname)."""

    def configure_network(self, config: Config) -> None:  # noqa: B027 (optional)
        """After isolate, once the vassal's tun devices exist: net-mtu,
        net-iface, net-route (a platform without them refuses those keys)."""

    def config_problems(self, config: Config) -> list[Problem]:
        """Values this platform cannot parse (Linux: uid-map, gid-map)."""
        return []

    def rss(self, pid: int) -> int:
        """A process's resident set in bytes (0 if it is gone)."""
        return proc.rss(pid)

    def listen_backlog(self, sock) -> int:
        """Connections waiting in a TCP listening socket's queue (0 where
        the platform does not say)."""
        return 0

    def interface_up(self, device: str) -> None:
        """Bring a network interface up (the router's tun device)."""
        raise JailError("tun devices are Linux only")

    def id_maps(self, config: Config, owner: tuple[int, int] | None = None) -> tuple[str, str]:
        """uid/gid maps of the vassal's user namespace (Linux only)."""
        raise JailError("user namespaces are Linux only")

    @abc.abstractmethod
    def change_root(self, config: Config) -> None:
        """After in-jail: pivot-root / chroot."""

    @abc.abstractmethod
    def clone_for_spawn(self, clone: list[str], id_maps: tuple[str, str] | list[str] | None, tun_devices: int = 0) -> tuple[bool, list[int]]:
        """emperor-use-clone, in the spawning intermediate: (True if a pid
        namespace was made, so the caller's next child is its PID 1; fds the
        vassal is handed for its ``tun_devices`` tun devices, opened inside
        its namespaces while still root, where the platform needs that)."""

    @abc.abstractmethod
    def become_subreaper(self) -> bool:
        """Orphaned descendants are reparented to the caller (the emperor)."""

    @abc.abstractmethod
    def die_with_parent(self, sig: int) -> None:
        """The caller gets ``sig`` when its parent dies."""

    @abc.abstractmethod
    def mount(self, fstype: str, source: str, target: str, flags: list[str]) -> None:
        """The mount hook action: FS SRC DST [FLAGS] (bind rec private readonly|ro
        nodev noexec nosuid remount move)."""

    @abc.abstractmethod
    def umount(self, target: str, flags: list[str]) -> None:
        """The umount hook action: DST [detach|force]."""

    @abc.abstractmethod
    def sethostname(self, name: str) -> None:
        """The hostname hook action and key."""

    @abc.abstractmethod
    def drop_privileges(self, uid: int | None, gid: int | None, user_name: str | None) -> None:
        """In the app master and the daemons: to uid/gid for good, and no
        way back up (no_new_privs, capabilities where there are some)."""

    @abc.abstractmethod
    def peer_credentials(self, sock) -> tuple[int, int, int]:
        """(pid, uid, gid) of the process at the other end of a unix socket."""

    def owns_process(self, pid: int) -> bool:
        """Whether ``pid`` belongs to the calling vassal, so that it may be
        signalled for it (a pidfile the app wrote may name anyone: the
        emperor, root's sshd, another tenant). Portable answer: it descends
        from us."""
        import psutil

        me = os.getpid()
        try:
            return any(parent.pid == me for parent in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    def describe(self, config: Config, name: str) -> dict | None:
        """What the platform knows of a vassal's jail, for status (or None)."""
        return None

    def teardown(self, config: Config, name: str) -> None:  # noqa: B027 (optional)
        """After a vassal is gone, as root in the emperor: remove what it left
        in the kernel (a FreeBSD jail and its rctl rules)."""


def own_namespaces(config: Config) -> set[str]:
    """The namespaces a vassal's ``unshare`` asks for ("mount" is "fs")."""
    return {"fs" if n == "mount" else n for n in config.get_words("unshare")}


def refuse(config: Config, keys: dict[str, str]) -> list[Problem]:
    """A Problem for each of ``keys`` the config uses, with the reason given."""
    found = []
    for key, why in keys.items():
        entries = config.sources.get(key)
        if entries:
            entry = entries[0]
            found.append(Problem(entry.file, entry.line, key, why))
    return found


def resolve_user(user: str) -> tuple[int, int, str | None]:
    """(uid, primary gid, name) for a user name or number."""
    if user.isascii() and user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
            return uid, entry.pw_gid, entry.pw_name
        except KeyError:
            return uid, uid, None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise JailError(f"uid: unknown user {user!r}") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def resolve_group(group: str) -> int:
    if group.isascii() and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise JailError(f"gid: unknown group {group!r}") from None


def already(uid: int | None, gid: int | None) -> bool:
    """The caller is that unprivileged user already, for good (a tyrant-mode
    vassal is its owner from its first instruction): nothing left to drop,
    and it could not change its groups anyway."""
    return uid not in (None, 0) and os.getresuid() == (uid,) * 3 and (gid is None or os.getresgid() == (gid,) * 3)


def drop_to(uid: int | None, gid: int | None, user_name: str | None) -> None:
    """gid and supplementary groups, then uid, for good (POSIX part of every
    backend's drop_privileges)."""
    if already(uid, gid):
        return
    if gid is not None:
        if user_name:
            os.initgroups(user_name, gid)
        else:
            os.setgroups([gid])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
    if uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise JailError("privileges could be regained after the drop")
