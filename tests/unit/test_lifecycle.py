"""The vassal state machine, in process (issue 13): every transition the
table allows goes through, every other one is refused, and the lifecycle
rules (ready, reload, stop, hold, restart, backoff, invalid files) hold,
with no subprocess: the emperor is a stub, the pipe a socketpair."""

from __future__ import annotations

import itertools
import socket

import pytest

from bedrock import protocol
from bedrock.loop import Loop
from emperor.lifecycle import Vassal
from emperor.states import (
    BACKOFF,
    INVALID,
    READY,
    RELOADING,
    STARTING,
    STATES,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    StateError,
)


class Host:
    """What a Vassal uses of its launcher, and nothing that spawns."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.log_lines = 100
        self.lines: list[str] = []
        self.forgotten: list[Vassal] = []
        self.curse_tolerance = 4.0
        self.throttle_ms = 100
        self.max_throttle_ms = 400
        self.required_heartbeat = 0
        self.routers: list = []

        self.wrapped = False

    def wraps(self, path: str) -> bool:
        return self.wrapped

    def log(self, message: str) -> None:
        self.lines.append(message)

    def vassal_log(self, vassal: Vassal, line: str) -> None:
        pass

    def forget(self, vassal: Vassal) -> None:
        self.forgotten.append(vassal)

    def oom_killed(self, vassal: Vassal) -> bool:
        return False


@pytest.fixture
def host():
    made = Host()
    yield made
    made.loop.selector.close()


@pytest.fixture
def vassal(host, monkeypatch):
    """A vassal "running" as pid -1 (nothing is ever signalled: the stop byte
    goes down a socketpair) whose spawns are counted, not made."""
    made = Vassal(name="v.ini", path="/nonexistent/v.ini", launcher=host)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    made.pipe = ours
    made.spawned_count = 0

    def fake_spawn() -> None:
        """What spawn does, but the process: no config is invalid, else starting."""
        assert made.pid is None and not made.spawning
        if made.config is None:
            made._enter(INVALID)
            return
        made.spawned_count += 1
        made._enter(STARTING)
        made.pid = -1

    monkeypatch.setattr(made, "spawn", fake_spawn)
    made.pid = -1
    made.config = object()  # any non-None config: a valid file
    yield made, theirs
    made.pid = None  # never signal anything on the way out
    for timer in made.timers.values():
        timer.cancel()
    ours.close()
    theirs.close()


PAIRS = list(itertools.product(sorted(STATES), sorted(STATES)))


def test_the_table_names_every_state():
    assert set(TRANSITIONS) == STATES
    assert all(sources <= STATES for sources in TRANSITIONS.values())


@pytest.mark.parametrize(("old", "new"), PAIRS)
def test_each_transition_is_allowed_or_refused_as_the_table_says(host, old, new):
    v = Vassal(name="t.ini", path="/nonexistent/t.ini", launcher=host, state=old)
    if old in TRANSITIONS[new]:
        v._enter(new)
        assert v.state == new
    else:
        with pytest.raises(StateError, match=f"{old} -> {new}"):
            v._enter(new)
        assert v.state == old


def test_refused_transitions_are_the_ones_that_mean_a_bug():
    refused = {(old, new) for old, new in PAIRS if old not in TRANSITIONS[new]}
    assert (STOPPED, READY) in refused and (BACKOFF, READY) in refused and (INVALID, READY) in refused
    assert (RELOADING, RELOADING) in refused  # a second reload waits instead
    assert (STOPPED, STOPPING) in refused  # nothing runs to stop
    assert (STOPPED, BACKOFF) in refused and (INVALID, BACKOFF) in refused  # nothing was starting or running


def _ready(v: Vassal) -> None:
    v._on_message(protocol.READY)


def test_the_ready_byte_makes_a_starting_vassal_ready_and_nothing_else(vassal):
    v, _ = vassal
    assert v.state == STARTING
    _ready(v)
    assert v.state == READY and v.ready_at is not None
    v._enter(STOPPING)
    _ready(v)  # a late ready byte from a vassal being stopped changes nothing
    assert v.state == STOPPING


def test_a_reload_while_one_is_in_flight_is_queued_then_sent(vassal, monkeypatch):
    v, theirs = vassal
    monkeypatch.setattr(v, "_hand_config", lambda config: True)
    _ready(v)
    assert v.reload(reread=False) and v.state == RELOADING
    assert theirs.recv(16) == bytes([protocol.RELOAD])
    assert v.reload(reread=False) and v.reload_queued and v.state == RELOADING
    _ready(v)  # the first one is done: the queued one goes now
    assert v.state == RELOADING and not v.reload_queued
    assert theirs.recv(16) == bytes([protocol.RELOAD])


def test_nothing_to_reload_when_nothing_runs(vassal):
    v, _ = vassal
    v.pid = None
    v._enter(BACKOFF)
    assert v.reload(reread=False) is False and v.state == BACKOFF


def test_stop_sends_the_stop_byte_and_arms_the_term_timer(vassal):
    v, theirs = vassal
    _ready(v)
    v.stop()
    assert v.state == STOPPING and theirs.recv(16) == bytes([protocol.STOP])
    assert v.has_timer("term")
    v.stop()  # stopping twice is stopping once
    assert v.state == STOPPING


def test_a_stopped_vassal_does_not_respawn(vassal):
    v, _ = vassal
    _ready(v)
    v.stop()
    v.pid = None
    v._after_exit()
    assert v.state == STOPPED and v.spawned_count == 0


def test_restart_respawns_once_the_old_one_is_gone(vassal):
    v, _ = vassal
    _ready(v)
    v.restart()
    assert v.state == STOPPING and v.restart_pending
    v.pid = None
    v._after_exit()
    assert v.spawned_count == 1 and v.state == STARTING and v.restarts == 1


def test_an_operator_stop_calls_off_a_restart_on_its_way(vassal):
    v, _ = vassal
    _ready(v)
    v.restart()
    v.hold()
    v.pid = None
    v._after_exit()
    assert v.state == STOPPED and v.spawned_count == 0 and v.held


def test_a_crash_backs_off_with_a_doubling_capped_delay(vassal, host):
    v, _ = vassal
    _ready(v)
    delays = []
    for _ in range(5):
        v.pid = None
        v._after_exit()
        assert v.state == BACKOFF and v.has_timer("backoff")
        delays.append(v.throttle_ms)
        v._backoff_done()
        assert v.state == STARTING
    assert delays == [100, 200, 400, 400, 400]
    assert v.spawned_count == 5


def test_a_voluntary_shutdown_is_not_a_crash(vassal):
    v, _ = vassal
    _ready(v)
    v._on_message(protocol.VOLUNTARY_SHUTDOWN)
    v.pid = None
    v._after_exit()
    assert v.state == STOPPED and v.spawned_count == 0


def test_an_invalid_file_cancels_the_backoff_but_not_a_stop(vassal):
    v, _ = vassal
    _ready(v)
    v.pid = None
    v._after_exit()
    assert v.state == BACKOFF
    v.invalid("x.ini:1: bad")
    assert v.state == INVALID and not v.has_timer("backoff") and v.error == "x.ini:1: bad"
    v.pid = -1
    v._enter(STARTING)
    v.stop()
    v.invalid("still bad")
    assert v.state == STOPPING  # it ends as it was going to


def test_a_removed_file_is_forgotten_once_it_has_exited(vassal, host):
    v, _ = vassal
    _ready(v)
    v.removing = True
    v.stop()
    v.pid = None
    v._after_exit()
    assert host.forgotten == [v] and v.state == STOPPED


def test_dispose_leaves_no_timer(vassal):
    v, _ = vassal
    v.after(60, "reread", lambda: None)
    v.after(60, "other", lambda: None)
    v.pid = None
    v.dispose()
    assert v.timers == {} and v.state == STOPPED


def test_after_names_one_timer_and_drops_it_when_it_fires(vassal, host):
    v, _ = vassal
    fired = []
    v.after(0, "reread", lambda: fired.append(1))
    v.after(0, "reread", lambda: fired.append(2))  # replaces the first
    host.loop.run_once(0)
    assert fired == [2] and not v.has_timer("reread")


def _exited_with_leftovers(v: Vassal) -> None:
    """The top process is reaped; leftovers are still being collected."""
    v.pid = None
    v.after(60, "empty", lambda: None)


def _leftovers_gone(v: Vassal) -> None:
    v._cancel("empty")
    v._after_exit()


def test_a_file_gone_invalid_while_a_restart_waits_for_leftovers(vassal):
    v, _ = vassal
    _ready(v)
    v.restart()
    _exited_with_leftovers(v)
    v.config = None
    v.invalid("x.ini:3: bad")  # nothing runs any more: invalid now
    assert v.state == INVALID
    _leftovers_gone(v)
    assert v.state == INVALID and v.spawned_count == 0
    v.config = object()
    v.start_now()  # the fixed file
    assert v.spawned_count == 1 and v.state == STARTING


def test_a_start_while_leftovers_are_collected_waits_for_them(vassal):
    v, _ = vassal
    _ready(v)
    _exited_with_leftovers(v)
    v.restart()  # or start, reset, a fixed file: all come through start_now
    assert v.spawned_count == 0 and v.restart_pending
    _leftovers_gone(v)
    assert v.spawned_count == 1 and v.state == STARTING


def test_a_removed_file_is_forgotten_only_once_its_leftovers_are_gone(vassal, host):
    v, _ = vassal
    _ready(v)
    _exited_with_leftovers(v)
    v.removing = True
    v.stop()
    assert host.forgotten == []
    _leftovers_gone(v)
    assert host.forgotten == [v] and v.state == STOPPED


def test_a_file_back_invalid_while_being_removed_ends_invalid(vassal):
    v, _ = vassal
    _ready(v)
    v.removing = True
    v.stop()
    v.removing = False  # came back (core: Action.COME_BACK), without a valid config
    v.config = None
    v.pid = None
    v._after_exit()
    assert v.state == INVALID


def test_a_wrapped_uwsgi_gets_every_reload_it_is_asked_for(vassal, host, monkeypatch):
    v, theirs = vassal
    host.wrapped = True
    _ready(v)
    assert v.reload(reread=False) and v.reload(reread=False)
    assert v.state == RELOADING and theirs.recv(16) == bytes([protocol.RELOAD] * 2)


def test_an_operator_stop_during_a_spawn_is_not_undone_by_a_deferred_change(vassal):
    v, _ = vassal
    v.pid = None
    v.spawning = True
    v.changed_while_spawning = True
    v.running_config, v.config = object(), object()
    v.hold()
    assert v.state == STOPPING
    v.spawning = False
    v.pid = -1
    v.launcher.after_spawn = lambda vassal: None
    v.spawned(-1, None)
    assert not v.restart_pending and v.held
    v.pid = None
    v._after_exit()
    assert v.state == STOPPED and v.spawned_count == 0
