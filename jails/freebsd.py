"""FreeBSD jails by direct library calls (ctypes), as uWSGI's FreeBSDJails.

The vassal's top process, as root, between the pre-jail and post-jail hooks:

1. rctl(8) rules for ``memory-limit``, ``pids-limit`` and ``cpu-limit`` on
   the jail's name (rules may name a jail before it exists; a jailed process
   may not add them);
2. devfs mounted on ROOTFS/dev with a ruleset (4, "devfsrules_jail", unless
   ``jail2 = devfs_ruleset=N`` says otherwise), by nmount(2);
3. jail_set(2) through libjail's jailparam API, which encodes each parameter
   in the binary type the kernel expects (ip4.addr is an array of struct
   in_addr, booleans have no value...), with JAIL_CREATE | JAIL_ATTACH: the
   caller is in the jail when it returns. Not ``persist``: the jail goes
   away with its last process.
   Or, with ``jail-attach JID|NAME``, jail_attach(2) into an existing jail.

The emperor tears a vassal down by jail_remove(2), which kills every process
in the jail, then removes its rctl rules.

Everything goes through a ``Libc`` object, so tests can record the exact
calls against a fake (this machine cannot run FreeBSD).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

from bedrock.config import Config, Problem
from jails.base import Backend, JailError, drop_to, refuse

JAIL_CREATE = 0x01
JAIL_UPDATE = 0x02
JAIL_ATTACH = 0x04
JAIL_DYING = 0x08
DEFAULT_DEVFS_RULESET = "4"  # devfsrules_jail in /etc/defaults/devfs.rules
PROC_REAP_ACQUIRE = 2
PROC_PDEATHSIG_CTL = 11
PROC_NO_NEW_PRIVS_CTL, PROC_NO_NEW_PRIVS_ENABLE = 19, 1  # <sys/procctl.h>, FreeBSD 14
# <sys/un.h>, <sys/ucred.h>: getsockopt(0, LOCAL_PEERCRED) gives a struct xucred.
SOL_LOCAL, LOCAL_PEERCRED = 0, 1
XU_NGROUPS = 16
XUCRED_PID_OFFSET = 12 + 4 * XU_NGROUPS  # 76, rounded up to the union's pointer alignment below
XUCRED_PID_OFFSET += (-XUCRED_PID_OFFSET) % ctypes.sizeof(ctypes.c_void_p)
XUCRED_SIZE = XUCRED_PID_OFFSET + ctypes.sizeof(ctypes.c_void_p)
P_PID = 0
MNT_DEFAULT = 0
# <sys/mount.h>
MNT_RDONLY, MNT_NOEXEC, MNT_NOSUID, MNT_UPDATE, MNT_FORCE = 0x1, 0x4, 0x8, 0x10000, 0x80000
MOUNT_FLAGS = {"readonly": MNT_RDONLY, "ro": MNT_RDONLY, "noexec": MNT_NOEXEC, "nosuid": MNT_NOSUID, "remount": MNT_UPDATE}
# Linux mount words with no FreeBSD meaning: bind is nullfs here, the rest
# (propagation, nodev, move) do not exist for nmount(2).
MOUNT_UNSUPPORTED = {"rec", "private", "nodev", "move"}

LINUX_ONLY = {
    key: f"{key} is Linux only (namespaces, cgroups, tun); on FreeBSD use jail, jail2, jail-ip4"
    for key in ("unshare", "pivot-root", "emperor-use-clone", "uid-map", "gid-map", "tuntap-device",
                "net-iface", "net-route", "net-mtu", "tuntap-router")
}


class JailParam(ctypes.Structure):
    """struct jailparam of <jail.h>."""

    _fields_ = [
        ("jp_name", ctypes.c_char_p),
        ("jp_value", ctypes.c_void_p),
        ("jp_valuelen", ctypes.c_size_t),
        ("jp_elemlen", ctypes.c_size_t),
        ("jp_ctltype", ctypes.c_int),
        ("jp_structtype", ctypes.c_int),
        ("jp_flags", ctypes.c_uint),
    ]


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Libc:
    """The calls this backend makes, on the real libc and libjail.

    Each method returns what the C function returns; failures leave errno
    (``errno()``) and, for libjail, ``errmsg()`` set."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libjail = ctypes.CDLL(ctypes.util.find_library("jail") or "libjail.so", use_errno=True)
        self._errmsg = ctypes.c_char.in_dll(self.libjail, "jail_errmsg")

    def errno(self) -> int:
        return ctypes.get_errno()

    def errmsg(self) -> str:
        return ctypes.string_at(ctypes.addressof(self._errmsg)).decode(errors="replace")

    def jail_set(self, params: list[tuple[str, str | None]], flags: int) -> int:
        """jailparam_init + jailparam_import for each (name, value), then
        jailparam_set(flags) and jailparam_free. Returns the jid or -1."""
        array = (JailParam * len(params))()
        try:
            for index, (name, value) in enumerate(params):
                if self.libjail.jailparam_init(ctypes.byref(array[index]), name.encode()) != 0:
                    return -1
                if value is not None and self.libjail.jailparam_import(ctypes.byref(array[index]), value.encode()) != 0:
                    return -1
            return self.libjail.jailparam_set(array, len(params), flags)
        finally:
            self.libjail.jailparam_free(array, len(params))

    def jail_getid(self, name: str) -> int:
        return self.libjail.jail_getid(name.encode())

    def jail_attach(self, jid: int) -> int:
        return self.libc.jail_attach(jid)

    def jail_remove(self, jid: int) -> int:
        return self.libc.jail_remove(jid)

    def nmount(self, options: list[tuple[str, str]], flags: int) -> int:
        """nmount(2) with name/value iovec pairs (each a NUL-terminated string)."""
        keep = []
        iov = (IoVec * (2 * len(options)))()
        for index, (name, value) in enumerate(options):
            for offset, text in ((0, name), (1, value)):
                buf = ctypes.create_string_buffer(text.encode())
                keep.append(buf)
                iov[2 * index + offset].iov_base = ctypes.cast(buf, ctypes.c_void_p)
                iov[2 * index + offset].iov_len = len(buf)
        return self.libc.nmount(iov, len(iov), flags)

    def unmount(self, target: str, flags: int) -> int:
        return self.libc.unmount(target.encode(), flags)

    def sethostname(self, name: str) -> int:
        data = name.encode()
        return self.libc.sethostname(data, len(data))

    def rctl_add_rule(self, rule: str) -> int:
        data = rule.encode() + b"\0"
        return self.libc.rctl_add_rule(data, len(data), None, 0)

    def rctl_remove_rule(self, rule_filter: str) -> int:
        data = rule_filter.encode() + b"\0"
        return self.libc.rctl_remove_rule(data, len(data), None, 0)

    def procctl(self, command: int, value: int | None) -> int:
        arg = ctypes.byref(ctypes.c_int(value)) if value is not None else None
        return self.libc.procctl(P_PID, os.getpid(), command, arg)


def jail_name(config: Config, vassal: str) -> str:
    """The jail's name: the third word of ``jail``, else the vassal's name
    (dots, which mean hierarchy to jail(2), become underscores)."""
    words = config.get_words("jail")
    if len(words) >= 3:
        return words[2]
    base = vassal.rsplit(".", 1)[0] if vassal.endswith((".ini", ".toml")) else vassal
    return base.replace(".", "_") or "vassal"


def jail_params(config: Config, vassal: str) -> list[tuple[str, str | None]]:
    """The jail_set parameters, in order, for the ``jail`` keys."""
    words = list(config.get_words("jail"))
    root = os.path.abspath(words[0])
    hostname = words[1] if len(words) > 1 else config.get_opt_str("hostname") or jail_name(config, vassal)
    params: list[tuple[str, str | None]] = [
        ("path", root),
        ("host.hostname", hostname),
        ("name", jail_name(config, vassal)),
    ]
    ip4 = [str(a) for a in config.getlist("jail-ip4")]
    ip6 = [str(a) for a in config.getlist("jail-ip6")]
    if ip4:
        params.append(("ip4.addr", ",".join(ip4)))
    if ip6:
        params.append(("ip6.addr", ",".join(ip6)))
    extra: list[tuple[str, str | None]] = []
    for item in config.getlist("jail2"):
        key, sep, value = str(item).partition("=")
        extra.append((key.strip(), value.strip() if sep else None))
    given = {key for key, _ in extra}
    if "enforce_statfs" not in given:
        params.append(("enforce_statfs", "2"))  # jail(8)'s default: only mounts below the root are visible
    if "devfs_ruleset" not in given:
        params.append(("devfs_ruleset", DEFAULT_DEVFS_RULESET))
    # The user's own jail2 keys last, so they can set anything jail_set knows.
    return params + extra


def rctl_rules(config: Config, name: str) -> list[str]:
    rules = []
    if config.has("memory-limit"):
        rules.append(f"jail:{name}:memoryuse:deny={config.get_int('memory-limit')}")
    if config.has("pids-limit"):
        rules.append(f"jail:{name}:maxproc:deny={config.get_int('pids-limit')}")
    if config.has("cpu-limit"):
        rules.append(f"jail:{name}:pcpu:deny={round(config.get_float('cpu-limit') * 100)}")
    return rules


def _explain(what: str, code: int, message: str) -> str:
    hint = {
        errno.EPERM: "not permitted (the emperor must run as root, outside any jail)",
        errno.EEXIST: "a jail with that name already exists (another vassal? use jail-attach to join it)",
        errno.EINVAL: "invalid parameter",
        errno.ENOENT: "no such jail or parameter",
        errno.ENOSYS: "rctl is off: set kern.racct.enable=1 in /boot/loader.conf and reboot",
    }.get(code, os.strerror(code) if code else "failed")
    return f"{what}: {hint}" + (f" ({message})" if message else "")


class FreeBSDBackend(Backend):
    name = "freebsd"
    limits_in_cgroups = False  # rctl rules on the jail, added by create()

    def __init__(self, libc: Libc | None = None):
        self._libc = libc

    @property
    def libc(self) -> Libc:
        if self._libc is None:
            self._libc = Libc()
        return self._libc

    def refused(self, config: Config) -> list[Problem]:
        found = refuse(config, LINUX_ONLY)
        if config.has("jail") and config.has("jail-attach"):
            entry = config.sources["jail-attach"][0]
            found.append(Problem(entry.file, entry.line, "jail-attach", "use either jail (a new jail) or jail-attach (an existing one), not both"))
        for key in ("jail-ip4", "jail-ip6", "jail2", "jidfile", "memory-limit", "pids-limit", "cpu-limit"):
            if config.has(key) and not config.has("jail"):
                entry = config.sources[key][0]
                why = " (rctl limits apply to the vassal's jail)" if key.endswith("-limit") else ""
                found.append(Problem(entry.file, entry.line, key, f"{key} needs jail = ROOTFS [HOSTNAME [NAME]]{why}"))
        return found

    def isolate(self, config: Config) -> None:
        vassal = os.environ.get("UWSGI_VASSAL_NAME") or os.path.basename(config.path)
        if config.has("jail-attach"):
            self.attach(config.get_str("jail-attach"))
        elif config.has("jail"):
            self.create(config, vassal)
        elif config.has("hostname"):
            raise JailError("hostname needs a jail on FreeBSD (jail = ROOTFS HOSTNAME)")

    def create(self, config: Config, vassal: str) -> int:
        name = jail_name(config, vassal)
        for rule in rctl_rules(config, name):
            if self.libc.rctl_add_rule(rule) != 0:
                raise JailError(_explain(f"rctl rule {rule}", self.libc.errno(), ""))
        params = jail_params(config, vassal)
        root = params[0][1]
        ruleset = next((value for key, value in params if key == "devfs_ruleset"), DEFAULT_DEVFS_RULESET)
        devfs = os.path.join(str(root), "dev")
        if not os.path.isdir(devfs):
            raise JailError(f"jail {name}: {devfs} does not exist (the root needs a dev directory for devfs)")
        if not os.path.ismount(devfs):
            options = [("fstype", "devfs"), ("fspath", devfs), ("ruleset", str(ruleset))]
            if self.libc.nmount(options, MNT_DEFAULT) != 0:
                raise JailError(_explain(f"jail {name}: mounting devfs on {devfs}", self.libc.errno(), ""))
        # Opened on the host now: once attached, only the jail's root is visible.
        jidfile = os.open(config.get_str("jidfile"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644) \
            if config.has("jidfile") else None
        try:
            jid = self.libc.jail_set(params, JAIL_CREATE | JAIL_ATTACH)
            if jid < 0:
                raise JailError(_explain(f"jail {name}: jail_set", self.libc.errno(), self.libc.errmsg()))
            if jidfile is not None:
                os.write(jidfile, f"{jid}\n".encode())
        finally:
            if jidfile is not None:
                os.close(jidfile)
        os.chdir("/")
        return jid

    def attach(self, target: str) -> int:
        jid = int(target) if target.isdigit() else self.libc.jail_getid(target)
        if jid < 0:
            raise JailError(_explain(f"jail-attach {target}", self.libc.errno(), self.libc.errmsg()))
        if self.libc.jail_attach(jid) != 0:
            raise JailError(_explain(f"jail-attach {target} (jid {jid})", self.libc.errno(), ""))
        os.chdir("/")
        return jid

    def change_root(self, config: Config) -> None:
        if config.has("chroot"):
            os.chroot(config.get_str("chroot"))
            os.chdir("/")

    def clone_for_spawn(self, clone, id_maps, tun_devices: int = 0) -> tuple[bool, list[int]]:
        raise JailError("emperor-use-clone is Linux only (on FreeBSD each vassal makes its own jail)")

    def become_subreaper(self) -> bool:
        return self.libc.procctl(PROC_REAP_ACQUIRE, None) == 0

    def die_with_parent(self, sig: int) -> None:
        self.libc.procctl(PROC_PDEATHSIG_CTL, sig)

    def peer_credentials(self, sock) -> tuple[int, int, int]:
        """LOCAL_PEERCRED: struct xucred (cr_version, cr_uid, cr_ngroups,
        cr_groups[16], then cr_pid in a pointer-aligned union, FreeBSD 13+)."""
        data = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, XUCRED_SIZE)
        _version, uid, ngroups = struct.unpack_from("=IIh", data, 0)
        gid = struct.unpack_from("=I", data, 12)[0] if ngroups > 0 else -1
        pid = struct.unpack_from("=i", data, XUCRED_PID_OFFSET)[0] if len(data) >= XUCRED_PID_OFFSET + 4 else 0
        return pid, uid, gid

    def drop_privileges(self, uid, gid, user_name) -> None:
        """PROC_NO_NEW_PRIVS (FreeBSD 14: setuid binaries cannot raise us
        again), then the groups and the uid; there are no capabilities."""
        if self.libc.procctl(PROC_NO_NEW_PRIVS_CTL, PROC_NO_NEW_PRIVS_ENABLE) != 0 and self.libc.errno() != errno.EINVAL:
            raise JailError(_explain("procctl(PROC_NO_NEW_PRIVS_CTL)", self.libc.errno(), ""))
        drop_to(uid, gid, user_name)

    def mount(self, fstype: str, source: str, target: str, flags: list[str]) -> None:
        """nmount(2): ``bind`` (or FS ``none``/``bind``) is a nullfs mount of SRC."""
        bits = 0
        bind = fstype in ("none", "bind") or "bind" in flags
        for word in flags:
            if word == "bind":
                continue
            if word in MOUNT_UNSUPPORTED or word not in MOUNT_FLAGS:
                raise JailError(f"mount flag {word!r} has no FreeBSD equivalent (known: bind {' '.join(sorted(MOUNT_FLAGS))})")
            bits |= MOUNT_FLAGS[word]
        options = [("fstype", "nullfs" if bind else fstype), ("fspath", target)]
        if bind:
            options.append(("from", source))
        elif source not in ("none", ""):
            options.append(("from", source))
        if self.libc.nmount(options, bits) != 0:
            raise JailError(_explain(f"mount {fstype} {source} {target}", self.libc.errno(), ""))

    def umount(self, target: str, flags: list[str]) -> None:
        bits = 0
        for word in flags:
            if word == "force":
                bits |= MNT_FORCE
            elif word != "detach":  # FreeBSD has no lazy unmount: detach is a plain unmount
                raise JailError(f"umount flag {word!r}: use force or detach")
        if self.libc.unmount(target, bits) != 0:
            raise JailError(_explain(f"umount {target}", self.libc.errno(), ""))

    def sethostname(self, name: str) -> None:
        if self.libc.sethostname(name) != 0:
            raise JailError(_explain(f"hostname {name}", self.libc.errno(), ""))

    def describe(self, config: Config, name: str) -> dict | None:
        """The jail's name and jid (jail_get(2), through libjail's jail_getid)."""
        if config.has("jail"):
            jname = jail_name(config, name)
        elif config.has("jail-attach"):
            jname = config.get_str("jail-attach")
        else:
            return None
        jid = int(jname) if jname.isdigit() else self.libc.jail_getid(jname)
        return {"name": jname, "jid": jid if jid >= 0 else None}

    def teardown(self, config: Config, name: str) -> None:
        """jail_remove kills every process left in the jail; then the rctl rules go."""
        if not config.has("jail"):
            return
        jname = jail_name(config, name)
        jid = self.libc.jail_getid(jname)
        if jid >= 0 and self.libc.jail_remove(jid) != 0 and self.libc.errno() != errno.EINVAL:
            raise JailError(_explain(f"jail_remove {jname} (jid {jid})", self.libc.errno(), ""))
        if rctl_rules(config, jname):
            self.libc.rctl_remove_rule(f"jail:{jname}")
