"""What the emperor does when it looks at a vassal's file: the decision
table of DESIGN 3 as two pure functions, so every rule is tested in
process (tests/unit/test_file_changes.py). emperor/core.py gathers the
facts (stat, owner, the parse) and carries out what these return.

First :func:`on_sight` (before the file is read): is there anything to read?
Then :func:`on_config` (after the one parse): what becomes of the vassal.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from emperor.states import BACKOFF, INVALID, READY, RELOADING, STARTING, STOPPING


@dataclass(frozen=True)
class Known:
    """What the emperor knows of the vassal already there for this name."""

    removing: bool = False  # its file went; it is stopping to be forgotten
    spawning: bool = False  # asked of the zygote, pid not known yet
    running: bool = False  # a top process exists
    state: str = STARTING


class Sight(Enum):
    IGNORE = "ignore"  # nothing changed (or nothing is there to stop)
    REMOVE = "remove"  # stop it and forget it once it has exited
    READ = "read"  # parse the file


class Action(Enum):
    NEW = "new"  # a vassal for a new file: spawn it
    NEW_INVALID = "new-invalid"  # a new file that does not validate: wait for a fix
    COME_BACK = "come-back"  # its file is back while it was being removed: respawn once gone
    KEEP_OLD = "keep-old"  # the file no longer validates: keep running the last good one
    INVALID = "invalid"  # it does not validate and nothing runs: wait for a fix
    DEFER = "defer"  # the zygote has not said the pid yet: decide once it has
    START = "start"  # a fixed file for a vassal waiting in invalid or backoff: start now
    STORE = "store"  # nothing runs and nothing waits to start (stopped, held): keep the config
    NONE = "none"  # it is stopping: the new config is what a respawn runs
    RESTART = "restart"  # jail-level options changed: a new jail
    RELOAD = "reload"  # a graceful reload with the new config


def on_sight(known: Known | None, present: bool, same_signature: bool, owner_changed: bool) -> Sight:
    """``present``: a regular file is at the path. ``same_signature``: it is
    the file (inode, size, times) last read. ``owner_changed``: tyrant mode,
    the file now belongs to someone else than the vassal's owner."""
    if not present:
        return Sight.REMOVE if known is not None and not known.removing else Sight.IGNORE
    if known is None:
        return Sight.READ
    if same_signature and not known.removing:
        return Sight.IGNORE
    if owner_changed:
        # The old vassal's logs and state are not the new owner's: it goes
        # (and is looked at again once forgotten).
        return Sight.IGNORE if known.removing else Sight.REMOVE
    return Sight.READ


def on_config(known: Known | None, valid: bool, jail_changed: bool) -> Action:
    """``valid``: the file parsed and validated. ``jail_changed``: the new
    config differs from the one the vassal has in a jail-level option."""
    if known is None:
        return Action.NEW if valid else Action.NEW_INVALID
    if known.removing:
        return Action.COME_BACK
    if not valid:
        return Action.KEEP_OLD if known.running or known.spawning else Action.INVALID
    if known.spawning:
        return Action.DEFER
    if not known.running:
        return Action.START if known.state in (INVALID, BACKOFF) else Action.STORE
    if known.state == STOPPING:
        return Action.NONE
    if jail_changed:
        return Action.RESTART
    if known.state in (READY, STARTING, RELOADING):
        return Action.RELOAD
    return Action.NONE
