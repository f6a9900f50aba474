"""The jail phases of a vassal's top process, in the order of DESIGN 3a:

pre-jail → unshare → private mounts, fresh /proc and /sys → lo up, hostname
→ post-jail, in-jail → pivot-root / chroot → as-root. (Sockets are bound
next, by the top process; privileges are dropped in the app master and the
daemons, see :func:`drop_privileges`.)
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jails
from bedrock import protocol
from bedrock.config import Config, Entry, Problem
from bedrock.identity import groups_of
from bedrock.log import log
from jails import linux, netlink
from jails.base import resolve_group, resolve_user
from vassal import hooks
from vassal.tuntap import TunLink

# Namespaces the emperor cloned for us (emperor-use-clone), set at spawn.
ENV_CLONED = "PYEMPEROR_CLONED"


def cloned_namespaces() -> set[str]:
    return {n for n in os.environ.get(ENV_CLONED, "").split(",") if n}


def own_namespaces(config: Config) -> set[str]:
    return {"fs" if n == "mount" else n for n in (config.get("unshare") or ())}  # type: ignore[union-attr]


ENV_TYRANT = "PYEMPEROR_TYRANT"
MAX_TENANT_TUN_DEVICES = 8


def tyrant_owner() -> tuple[int, int] | None:
    raw = os.environ.get(ENV_TYRANT, "")
    if not raw:
        return None
    uid, _, gid = raw.partition(":")
    return int(uid), int(gid)


def tyrant_namespaces(config: Config, cloned: set[str]) -> set[str]:
    """Tyrant mode (DESIGN 3): the namespaces a tenant's vassal is made in.
    Any namespace at all comes with a user namespace mapped to the file's
    owner that owns them all, made by the emperor's spawning child before any
    of the tenant's code runs, so that root in there is the owner outside.
    With none, the top process simply is the owner (dropped before it starts)."""
    wanted = set(cloned) | own_namespaces(config)
    return wanted | {"user"} if wanted else set()


def socket_tenant(config: Config) -> tuple[int, int] | None:
    """Whose unix sockets we bind in tyrant mode (a friendlier error than the
    kernel's EACCES); in a user namespace the kernel checks every path itself."""
    if "user" in cloned_namespaces() | own_namespaces(config):
        return None
    return tyrant_owner()


def tyrant_problems(config: Config, namespaces: set[str], owner: tuple[int, int]) -> list[Problem]:
    """What a tenant's file may not ask for. Nothing of it runs as host root
    (the top process is the owner, or root of a user namespace mapped to the
    owner), so the kernel refuses the rest; these are the keys that could
    only fail, named clearly up front, checked again on every reload."""
    found: list[Problem] = []

    def refuse(key: str, why: str) -> None:
        for entry in config.sources.get(key, []):
            found.append(Problem(entry.file, entry.line, key, why))

    for key in ("uid-map", "gid-map"):
        refuse(key, f"{key} is not allowed in tyrant mode (root in the namespace is the file's owner)")
    if len(config.getlist("tuntap-device")) > MAX_TENANT_TUN_DEVICES:
        entry = config.sources["tuntap-device"][MAX_TENANT_TUN_DEVICES]
        found.append(Problem(entry.file, entry.line, "tuntap-device",
                             f"at most {MAX_TENANT_TUN_DEVICES} tuntap-device lines in tyrant mode (each is a /dev/net/tun fd opened for you)"))
    if "user" in namespaces:
        for key in ("uid", "gid"):
            refuse(key, f"{key} is not allowed in tyrant mode with namespaces: the app runs as root of its user namespace, which is the file's owner outside")
        refuse("chown-socket", "chown-socket is not allowed in tyrant mode with namespaces (the socket already belongs to the file's owner)")
        return found
    refuse("chroot", "chroot needs a namespace in tyrant mode (add unshare = fs: the vassal then gets a user namespace mapped to you)")
    for key in ("http-socket", "socket"):
        for value, entry in zip(config.getlist(key), config.sources.get(key, []), strict=False):
            address = str(value)
            if "/" not in address and not address.startswith("@"):
                port = int(address.rpartition(":")[2])
                if 0 < port < 1024:
                    found.append(Problem(entry.file, entry.line, key, f"port {port} is privileged: not allowed in tyrant mode"))
    for value, entry in zip(config.getlist("chown-socket"), config.sources.get("chown-socket", []), strict=False):
        user, _, group = str(value).partition(":")
        try:
            uid = resolve_user(user)[0] if user else owner[0]
            gid = resolve_group(group) if group else owner[1]
        except jails.JailError as exc:
            found.append(Problem(entry.file, entry.line, "chown-socket", str(exc)))
            continue
        if uid != owner[0] or gid not in groups_of(*owner):
            found.append(Problem(entry.file, entry.line, "chown-socket",
                                 f"chown-socket {value}: in tyrant mode a socket may only go to its owner (uid {owner[0]}) and one of the owner's groups"))
    return found


def problems(config: Config, cloned: set[str], tyrant: tuple[int, int] | None = None) -> list[Problem]:
    """Actions that need a namespace the vassal will not have (DESIGN 3a),
    and, in tyrant mode (``tyrant`` is the file's owner), what a tenant may
    not ask for."""
    have = tyrant_namespaces(config, cloned) if tyrant else cloned | own_namespaces(config)
    found: list[Problem] = tyrant_problems(config, have, tyrant) if tyrant else []

    def need(key: str, namespace: str, what: str) -> None:
        for entry in config.sources.get(key, []):
            if namespace not in have:
                found.append(Problem(entry.file, entry.line, key, f"{what} needs the {namespace} namespace (add it to unshare or emperor-use-clone)"))

    for key in ("uid-map", "gid-map"):
        for value, entry in zip(config.getlist(key), config.sources.get(key, []), strict=False):
            try:
                linux.parse_id_map(str(value), key)
            except linux.JailError as exc:
                found.append(Problem(entry.file, entry.line, key, str(exc)))
            if "user" not in have:
                found.append(Problem(entry.file, entry.line, key, f"{key} needs the user namespace (add it to unshare or emperor-use-clone)"))
    need("hostname", "uts", "hostname")
    need("tuntap-device", "net", "tuntap-device")
    need("net-iface", "net", "net-iface")
    need("net-route", "net", "net-route")
    need("net-mtu", "net", "net-mtu")
    need("pivot-root", "fs", "pivot-root")
    for phase in ("pre-jail", "post-jail", "in-jail", "as-root", "as-user", "pre-app", "post-app", "as-user-atexit"):
        for hook in hooks.hooks_for(config, phase):
            namespace = {"hostname": "uts", "mount": "fs", "umount": "fs"}.get(hook.action)
            if namespace and namespace not in have:
                found.append(Problem(hook.entry.file, hook.entry.line, hook.entry.key, f"action {hook.action} needs the {namespace} namespace (add it to unshare or emperor-use-clone)"))
    return found


def enter(config: Config) -> list:
    """Run every root phase up to and including as-root, the jailing itself
    by the platform's backend. Raises HookError, JailError or OSError; the
    caller exits with the matching reason."""
    backend = jails.backend()
    run_as_vassal()
    hooks.run_phase(config, "pre-jail")
    links = backend.isolate(config)
    hooks.run_phase(config, "post-jail")
    hooks.run_phase(config, "in-jail")
    backend.change_root(config)
    hooks.run_phase(config, "as-root")
    return links


def enter_namespaces(config: Config) -> list:
    """Linux: the namespaces this vassal makes itself, fresh /proc and /sys,
    lo, the tun devices and addresses, the hostname."""
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
            _become_pid1()
    have = cloned | own
    if "fs" in have:
        linux.make_mounts_private()
        if "pid" in have:
            linux.mount_proc()
        if "net" in have:
            linux.mount_sys()
    if "net" in have:
        linux.interface_up("lo")
    links = setup_network(config)
    if config.has("hostname"):
        linux.sethostname(str(config.get("hostname")))
    return links


def change_root(config: Config) -> None:
    """Linux: pivot-root, then chroot."""
    if config.has("pivot-root"):
        new_root, old_root = config.get("pivot-root")  # type: ignore[misc]
        pivot_root(new_root, old_root)
    if config.has("chroot"):
        directory = str(config.get("chroot"))
        os.chroot(directory)
        os.chdir("/")


def setup_network(config: Config) -> list:
    """tuntap-device, then net-iface and net-route over netlink (no binaries)."""
    links = []
    brokered = os.environ.get(protocol.ENV_BROKERED) == "1"
    for index, words in enumerate(config.getlist("tuntap-device")):
        links.append(TunLink(words[0], words[1] if len(words) > 1 else None, brokered=brokered and index == 0))
    for device, mtu in config.getlist("net-mtu"):
        if not mtu.isdigit() or not 68 <= int(mtu) <= 65535:
            raise linux.JailError(f"net-mtu {device}: MTU must be 68..65535, not {mtu!r}")
        linux.set_mtu(device, int(mtu))
    for device, cidr in config.getlist("net-iface"):
        netlink.add_address(device, cidr)
        linux.interface_up(device)
        for link in links:
            if link.device == device:
                link.set_address(cidr.partition("/")[0])
    for destination, gateway in config.getlist("net-route"):
        netlink.add_route(destination, gateway)
    return links


def run_as_vassal() -> None:
    """The emperor's hook-as-vassal / exec-as-vassal, before our own phases."""
    raw = os.environ.pop("PYEMPEROR_AS_VASSAL", "")
    if not raw:
        return
    for action, args, key, value in json.loads(raw):
        hook = hooks.Hook("as-vassal", action, args, Entry(key, value, "<emperor>", None))
        try:
            hooks.run_hook(hook)
        except hooks.HookExit:
            raise
        except Exception as exc:
            raise hooks.HookError(f"hook failed in phase as-vassal: {hook.describe()}: {exc}") from None


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


def _become_pid1() -> None:
    """After unshare(CLONE_NEWPID) only our next child is in the namespace,
    as its PID 1. That child carries on as the top process; this process
    stays as a proxy that forwards signals and exits with its status, so a
    uWSGI emperor (which tracks this pid) still sees one vassal."""
    child = os.fork()
    if child == 0:
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, f: os.kill(child, s))
    signal.set_wakeup_fd(-1)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            status = 1 << 8
            break
    sys.stdout.flush()
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def id_maps(config: Config, owner: tuple[int, int] | None = None) -> tuple[str, str]:
    """The vassal's uid/gid maps; in tyrant mode always root -> the file's owner."""
    owner = owner or tyrant_owner()
    if owner is not None:
        return f"0 {owner[0]} 1", f"0 {owner[1]} 1"
    uid_map = linux.parse_id_map(str(config.get("uid-map")), "uid-map") if config.has("uid-map") else linux.default_id_map("uid")
    gid_map = linux.parse_id_map(str(config.get("gid-map")), "gid-map") if config.has("gid-map") else linux.default_id_map("gid")
    return uid_map, gid_map


def drop_privileges(config: Config) -> None:
    """In the app master and the daemons: gid, groups, uid, no_new_privs."""
    uid = gid = None
    name = None
    if config.has("uid"):
        uid, gid, name = resolve_user(str(config.get("uid")))
    if config.has("gid"):
        gid = resolve_group(str(config.get("gid")))
    jails.backend().drop_privileges(uid, gid, name)
