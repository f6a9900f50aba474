"""Linux kernel calls for jails: namespaces, mounts, pivot_root, hostname,
interfaces, privileges. Direct syscalls through libc (no mount, ip or
hostname binaries needed inside a jail)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct
from collections.abc import Callable, Iterable

# The process's own symbols (libc is linked in): find_library would run ldconfig.
_libc = ctypes.CDLL(None, use_errno=True)
# Resolved once at import (in the zygote), so forked vassals share them
# instead of each building its own function pointers.
for _fn in ("unshare", "sethostname", "mount", "umount2", "syscall", "prctl", "capget", "capset"):
    getattr(_libc, _fn)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "fs": CLONE_NEWNS,
    "mount": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "user": CLONE_NEWUSER,
    "cgroup": CLONE_NEWCGROUP,
}

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MOUNT_FLAGS = {
    "bind": MS_BIND,
    "rec": MS_REC,
    "recursive": MS_REC,
    "private": MS_PRIVATE,
    "slave": MS_SLAVE,
    "shared": MS_SHARED,
    "readonly": MS_RDONLY,
    "ro": MS_RDONLY,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "nosuid": MS_NOSUID,
    "remount": MS_REMOUNT,
    "move": MS_MOVE,
}
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_FLAGS = {"detach": MNT_DETACH, "force": MNT_FORCE}

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_PDEATHSIG = 1

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "armv7l": 218, "i686": 217, "ppc64le": 203, "s390x": 217, "riscv64": 41}


from jails.base import JailError, already, drop_to, resolve_group, resolve_user  # noqa: E402,F401  (shared by every backend)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def namespace_flags(names: Iterable[str]) -> int:
    flags = 0
    for name in names:
        flags |= NAMESPACE_FLAGS[name]
    return flags


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


DEFAULT_SUBID = (100000, 65536)


def default_id_map(kind: str) -> str:
    """root's range in /etc/subuid (or /etc/subgid), as podman does; else
    100000:65536. Inside ids 0.. map onto it."""
    start, count = DEFAULT_SUBID
    try:
        with open(f"/etc/sub{kind}") as handle:
            for line in handle:
                name, _, rest = line.strip().partition(":")
                if name in ("root", "0") and rest:
                    first, _, size = rest.partition(":")
                    start, count = int(first), int(size)
                    break
    except (OSError, ValueError):
        pass
    return f"0 {start} {count}"


def parse_id_map(text: str, key: str) -> str:
    lines = []
    for chunk in text.replace(",", "\n").splitlines():
        words = chunk.split()
        if not words:
            continue
        if len(words) != 3 or not all(w.isdigit() for w in words):
            raise JailError(f"{key}: expected INSIDE OUTSIDE COUNT, got {chunk.strip()!r}")
        lines.append(" ".join(words))
    return "\n".join(lines)


def unshare_user(flags: int, uid_map: str, gid_map: str, while_root: Callable[[], None] | None = None) -> None:
    """unshare a user namespace (with ``flags``: the other namespaces are
    then owned by it) and become its root. The maps must be written from
    the parent namespace, so a helper forked first writes them for us."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    # Our own /proc entry, held open: in a pid namespace (emperor-use-clone =
    # pid) getpid() is a number the mounted /proc (the host's) knows as
    # someone else, and writing that one's uid_map fails with EPERM.
    me = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        os.close(done_r)
        result = b"0"
        try:
            if os.read(ready_r, 1) == b"1":
                for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
                    fd = os.open(name, os.O_WRONLY, dir_fd=me)
                    try:
                        os.write(fd, (text + "\n").encode())
                    finally:
                        os.close(fd)
                result = b"1"
        except OSError as exc:
            os.write(2, f"user namespace map: {exc}\n".encode())
        os.write(done_w, result)
        os._exit(0)
    os.close(ready_r)
    os.close(done_w)
    os.close(me)
    try:
        try:
            unshare(flags | CLONE_NEWUSER)
        except JailError:
            os.write(ready_w, b"0")
            raise
        os.write(ready_w, b"1")
        ok = os.read(done_r, 1)
    finally:
        os.close(ready_w)
        os.close(done_r)
        try:
            os.waitpid(helper, 0)
        except ChildProcessError:
            pass  # SIGCHLD ignored (the zygote's children are auto-reaped)
    if ok != b"1":
        raise JailError(f"user namespace: could not write uid_map {uid_map!r} / gid_map {gid_map!r}")
    if while_root is not None:
        # Inside the new namespaces, still the host's uid 0 for file access.
        while_root()
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    try:
        os.setgroups([])
    except PermissionError:
        pass


def open_tun_nodes(count: int) -> list[int]:
    """/dev/net/tun opened ``count`` times, inheritable (for a vassal's
    tuntap-devices: the fd's network namespace is the one open() ran in)."""
    fds = []
    for _ in range(count):
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            break  # the vassal then reports why it cannot open it itself
        os.set_inheritable(fd, True)
        fds.append(fd)
    return fds


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_libc.sethostname(data, len(data)), f"sethostname({name!r})")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, ctypes.c_ulong(flags), data.encode() if data else None),
        f"mount {fstype or ''} {source} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise JailError(f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()), f"pivot_root({new_root}, {put_old})")


def parse_mount_flags(words: Iterable[str]) -> int:
    flags = 0
    for word in words:
        for part in word.split(","):
            if not part:
                continue
            if part not in MOUNT_FLAGS:
                raise JailError(f"unknown mount flag {part!r} (known: {', '.join(MOUNT_FLAGS)})")
            flags |= MOUNT_FLAGS[part]
    return flags


def parse_umount_flags(words: Iterable[str]) -> int:
    flags = 0
    for word in words:
        for part in word.split(","):
            if part and part not in UMOUNT_FLAGS:
                raise JailError(f"unknown umount flag {part!r} (known: detach, force)")
            flags |= UMOUNT_FLAGS.get(part, 0)
    return flags


def make_mounts_private() -> None:
    """Nothing mounted from here on may propagate back to the host."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def mount_proc() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def mount_sys() -> None:
    # sysfs shows the mounter's net namespace until it is mounted anew.
    try:
        umount("/sys", MNT_DETACH)
    except JailError:
        pass
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)


def is_mount_point(path: str) -> bool:
    path = os.path.realpath(path)
    if path == "/":
        return True
    try:
        with open("/proc/self/mountinfo") as handle:
            return any(line.split()[4] == path for line in handle)
    except OSError:
        return os.path.ismount(path)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def interface_up(name: str) -> None:
    """Bring an interface up with an ioctl (no ip binary, no netlink import)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14s", name.encode(), 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", name.encode(), flags | IFF_UP, b""))


SIOCSIFMTU = 0x8922


def set_mtu(name: str, mtu: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, SIOCSIFMTU, struct.pack("16si12s", name.encode(), mtu, b""))
        except OSError as exc:
            raise JailError(f"net-mtu {name} {mtu}: {exc.strerror}") from None


def set_no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Descendants that daemonize get reparented to us (and reaped), not to init."""
    try:
        return _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except AttributeError:
        return False


def die_with_parent(sig: int) -> None:
    """Get ``sig`` when the parent dies (PR_SET_PDEATHSIG)."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except OSError:
        return 40


def drop_bounding_set(keep: Iterable[int] = ()) -> None:
    """Drop every capability but ``keep`` from the bounding set, so that no
    exec (setuid binary or file capabilities) can bring them back."""
    keep = set(keep)
    for cap in range(last_cap() + 1):
        if cap not in keep:
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


# Capabilities an app running as root never needs (DESIGN: drop what the
# vassal does not need): module loading, raw I/O, reboot, clock, tracing,
# mounts and namespaces (done by the top process already), MAC, audit, bpf.
UNNEEDED_CAPS = {
    "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_ADMIN": 12, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22,
    "CAP_SYS_TIME": 25, "CAP_MKNOD": 27, "CAP_AUDIT_CONTROL": 30, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities(caps: Iterable[int]) -> None:
    """Remove ``caps`` from the bounding, effective, permitted and inheritable sets."""
    caps = [c for c in caps if c <= last_cap()]
    for cap in caps:
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        mask = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= mask
        data[word].permitted &= mask
        data[word].inheritable &= mask
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def drop_privileges(uid: int | None, gid: int | None, user_name: str | None) -> None:
    """gid, supplementary groups, then uid; no_new_privs and a bare bounding set."""
    set_no_new_privs()
    if already(uid, gid):
        return
    if uid is None and gid is None or uid == 0:
        # Root stays root, without the capabilities no app needs.
        drop_capabilities(UNNEEDED_CAPS.values())
        if uid is None and gid is None:
            return
    else:
        drop_bounding_set()
    drop_to(uid, gid, user_name)
