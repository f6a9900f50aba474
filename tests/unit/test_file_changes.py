"""The file-changed decision table (emperor/file_changes.py), every row, in
process: what the emperor does when it looks at a vassal's file."""

from __future__ import annotations

import itertools

import pytest

from emperor.file_changes import Action, Known, Sight, on_config, on_sight
from emperor.states import BACKOFF, INVALID, READY, RELOADING, STARTING, STATES, STOPPED, STOPPING

RUNNING = Known(running=True, state=READY)
REMOVING = Known(removing=True, running=True, state=STOPPING)


@pytest.mark.parametrize(("known", "present", "same", "owner_changed", "expected"), [
    (None, False, False, False, Sight.IGNORE),  # nothing there, nothing known
    (None, True, False, False, Sight.READ),  # a new file
    (RUNNING, False, False, False, Sight.REMOVE),  # the file went
    (REMOVING, False, False, False, Sight.IGNORE),  # went, and is already going
    (RUNNING, True, True, False, Sight.IGNORE),  # touched by nobody: same inode, size, times
    (REMOVING, True, True, False, Sight.READ),  # back while being removed
    (RUNNING, True, False, False, Sight.READ),  # changed
    (RUNNING, True, False, True, Sight.REMOVE),  # another tenant's file now
    (REMOVING, True, False, True, Sight.IGNORE),  # another's, and the old one is going already
    (RUNNING, True, True, True, Sight.IGNORE),  # the same file: its owner is what it was read as
])
def test_on_sight(known, present, same, owner_changed, expected):
    assert on_sight(known, present, same, owner_changed) is expected


def test_a_new_file_is_read_whatever_else_is_said():
    for same, owner_changed in itertools.product((False, True), repeat=2):
        assert on_sight(None, True, same, owner_changed) is Sight.READ


@pytest.mark.parametrize(("known", "valid", "jail_changed", "expected"), [
    (None, True, False, Action.NEW),
    (None, False, False, Action.NEW_INVALID),
    (REMOVING, True, False, Action.COME_BACK),
    (REMOVING, False, False, Action.COME_BACK),  # it comes back invalid: no respawn (restart_pending is False)
    (RUNNING, False, False, Action.KEEP_OLD),
    (Known(spawning=True), False, False, Action.KEEP_OLD),
    (Known(state=BACKOFF), False, False, Action.INVALID),
    (Known(state=STOPPED), False, False, Action.INVALID),
    (Known(spawning=True), True, True, Action.DEFER),
    (Known(state=INVALID), True, False, Action.START),
    (Known(state=BACKOFF), True, True, Action.START),
    (Known(state=STOPPED), True, False, Action.STORE),  # held by the operator: stays down
    (Known(running=True, state=STOPPING), True, True, Action.NONE),
    (Known(running=True, state=READY), True, True, Action.RESTART),
    (Known(running=True, state=STARTING), True, True, Action.RESTART),
    (Known(running=True, state=READY), True, False, Action.RELOAD),
    (Known(running=True, state=STARTING), True, False, Action.RELOAD),
    (Known(running=True, state=RELOADING), True, False, Action.RELOAD),
])
def test_on_config(known, valid, jail_changed, expected):
    assert on_config(known, valid, jail_changed) is expected


@pytest.mark.parametrize("state", sorted(STATES))
def test_every_known_vassal_gets_an_answer(state):
    """Total: no combination falls through (and none raises)."""
    for removing, spawning, running, valid, jail_changed in itertools.product((False, True), repeat=5):
        assert isinstance(on_config(Known(removing, spawning, running, state), valid, jail_changed), Action)
        for present, same, owner_changed in itertools.product((False, True), repeat=3):
            assert isinstance(on_sight(Known(removing, spawning, running, state), present, same, owner_changed), Sight)


def test_an_invalid_file_never_stops_what_runs():
    for state in STATES:
        for spawning in (False, True):
            action = on_config(Known(spawning=spawning, running=True, state=state), False, False)
            assert action is Action.KEEP_OLD
