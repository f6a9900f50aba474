"""A vassal's states (DESIGN section 3) and the one table of which state
may follow which; emperor/lifecycle.py enters them, only through it."""

from __future__ import annotations

STARTING = "starting"
READY = "ready"
RELOADING = "reloading"
STOPPING = "stopping"
STOPPED = "stopped"
BACKOFF = "backoff"
INVALID = "invalid"
STATES = frozenset({STARTING, READY, RELOADING, STOPPING, STOPPED, BACKOFF, INVALID})

# The state a vassal may enter -> the states it may come from (supervisor's
# _assertInState, as one table). Every change goes through Vassal._enter.
TRANSITIONS: dict[str, frozenset[str]] = {
    # A spawn: the first, a respawn after backoff, a restart (from stopping),
    # an operator's start of a stopped or invalid one, a fixed file; from
    # ready or reloading too, once its process has exited and its leftovers
    # are collected (the state is still the last one it had running).
    STARTING: STATES,
    # The ready byte, or a reload that never said so within its timeout.
    READY: frozenset({STARTING, RELOADING}),
    # One graceful reload at a time (another one waits: reload_queued).
    RELOADING: frozenset({STARTING, READY}),
    # Only a vassal with processes stops; one stopping stays so.
    STOPPING: frozenset({STARTING, READY, RELOADING}),
    # Gone for good (held, voluntary, removed), from anything.
    STOPPED: STATES,
    # A crash, or a spawn that failed before any process existed: only what
    # was starting or had run (a stopped or invalid one is started first).
    BACKOFF: frozenset({STARTING, READY, RELOADING, STOPPING, BACKOFF}),
    # The file does not validate and nothing of it runs (also at the end of
    # a stop, or while a stopped one's leftovers are being collected).
    INVALID: STATES,
}


class StateError(AssertionError):
    """A transition the table refuses: a bug in the emperor, not the vassal's."""
