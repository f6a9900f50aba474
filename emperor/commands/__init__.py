"""Control commands, one module per verb; each module's docstring is its
documentation (``emperorctl help VERB`` prints it).

A command module defines ``execute(emperor, args, peer)`` returning a JSON-able
result, and raises :class:`CommandError` to refuse. Signals and the control
socket both end up here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from emperor.names import printable

if TYPE_CHECKING:
    from emperor.core import Emperor
    from emperor.lifecycle import Vassal

VERBS = (
    "status", "reload", "stop", "start", "restart", "reset", "logs", "stats", "router",
    "shutdown", "log-status", "help",
)

# Exit codes of emperorctl (DESIGN section 2).
REFUSED = 1
USAGE = 2
NO_EMPEROR = 3


class CommandError(Exception):
    def __init__(self, message: str, code: int = REFUSED):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int

    @classmethod
    def root(cls) -> Peer:
        return cls(0, 0, os.getpid())

    @property
    def privileged(self) -> bool:
        return self.uid == 0 or self.uid == os.geteuid()

    def may_see(self, vassal: Vassal) -> bool:
        if self.privileged:
            return True
        if not vassal.launcher.tyrant:
            return False
        return vassal.owner is not None and vassal.owner[0] == self.uid


def module_for(name: str):
    if name not in VERBS:
        raise CommandError(f"unknown command {printable(name[:64])!r} (known: {', '.join(VERBS)})", USAGE)
    return importlib.import_module(f"emperor.commands.{name.replace('-', '_')}")


def execute(emperor: Emperor, name: str, args: dict, peer: Peer):
    module = module_for(name)
    # Outside tyrant mode only root (or the emperor's own user) may ask anything.
    if not peer.privileged and not emperor.tyrant and name != "help":
        raise CommandError("not permitted")
    return module.execute(emperor, args, peer)


def names_arg(args: dict) -> list[str]:
    names = args.get("names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CommandError("'names' must be a list of vassal names", USAGE)
    return names


def no_such_vassal(name: str, peer: Peer) -> CommandError:
    """The one refusal for a name the peer may not act on. To anyone but
    root, a vassal of another tenant and one that does not exist get the
    very same answer, else the answer would tell which names exist."""
    shown = printable(name[:256])
    if peer.privileged:
        return CommandError(f"no vassal named '{shown}'")
    return CommandError(f"not permitted: '{shown}' (no vassal of yours has that name)")


def select_vassals(emperor: Emperor, args: dict, peer: Peer, allow_all: bool = True) -> list[Vassal]:
    """The vassals named in ``args['names']`` (or all with ``args['all']``), checked
    against what ``peer`` may control."""
    names = names_arg(args)
    if args.get("all") and allow_all:
        return [v for v in emperor.vassals.values() if peer.may_see(v)]
    if not names:
        raise CommandError("name at least one vassal" + (" (or --all)" if allow_all else ""), USAGE)
    found = []
    for name in names:
        vassal = emperor.vassals.get(name)
        if vassal is None or not peer.may_see(vassal):
            raise no_such_vassal(name, peer)
        found.append(vassal)
    return found


def require_privileged(peer: Peer) -> None:
    if not peer.privileged:
        raise CommandError("not permitted")
