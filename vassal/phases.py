"""The jail phases of a vassal's top process, in the order of DESIGN 3a:

pre-jail → unshare → private mounts, fresh /proc and /sys → lo up, hostname
→ post-jail, in-jail → pivot-root / chroot → as-root. (Sockets are bound
next, by the top process; privileges are dropped in the app master and the
daemons, see :func:`drop_privileges`.)
"""

from __future__ import annotations

import json
import os

import jails
from bedrock import protocol
from bedrock.config import Config, Entry, Problem
from bedrock.identity import groups_of
from bedrock.protocol import cloned_namespaces, tyrant_owner
from jails.base import own_namespaces, resolve_group, resolve_user
from netrouter.client import TunLink
from vassal import hooks

MAX_TENANT_TUN_DEVICES = 8


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

    found += jails.backend().config_problems(config)
    for key in ("uid-map", "gid-map"):
        for entry in config.sources.get(key, []):
            if "user" not in have:
                found.append(Problem(entry.file, entry.line, key, f"{key} needs the user namespace (add it to unshare or emperor-use-clone)"))
    for entry in config.sources.get("persistent-ipcsem", []):
        if config.get_bool("persistent-ipcsem") and not config.has("ftok"):
            found.append(Problem(entry.file, entry.line, "persistent-ipcsem",
                                 "persistent-ipcsem needs ftok = FILE (an IPC_PRIVATE semaphore kept at exit could never be found again)"))
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
    backend.isolate(config)
    links = setup_network(config)
    hooks.run_phase(config, "post-jail")
    hooks.run_phase(config, "in-jail")
    backend.change_root(config)
    hooks.run_phase(config, "as-root")
    return links


def setup_network(config: Config) -> list:
    """The tuntap-device links (the router's clients), then the backend's
net-mtu / net-iface / net-route, then each link learns its address."""
    links = []
    brokered = os.environ.get(protocol.ENV_BROKERED) == "1"
    for index, words in enumerate(config.getlist("tuntap-device")):
        links.append(TunLink(words[0], words[1] if len(words) > 1 else None, brokered=brokered and index == 0))
    jails.backend().configure_network(config)
    for device, cidr in config.getlist("net-iface"):
        for link in links:
            if link.device == device:
                link.set_address(cidr.partition("/")[0])
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


def drop_privileges(config: Config) -> None:
    """In the app master and the daemons: gid, groups, uid, no_new_privs."""
    uid = gid = None
    name = None
    if config.has("uid"):
        uid, gid, name = resolve_user(config.get_str("uid"))
    if config.has("gid"):
        gid = resolve_group(config.get_str("gid"))
    jails.backend().drop_privileges(uid, gid, name)
