"""The event loop's timers, fds, signals and reaping, in process (issue 13;
its guard against failing callbacks is in test_untrusted_input.py)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from bedrock.loop import Loop, reaped


@pytest.fixture
def loop():
    made = Loop()
    yield made
    made.reset_signals_in_child()  # drops our handlers and the wakeup fd


def spin(loop: Loop, until, limit: float = 2.0) -> None:
    deadline = time.monotonic() + limit
    while not until() and time.monotonic() < deadline:
        loop.run_once(0.01)
    assert until()


def test_timers_fire_in_time_order_and_ties_in_call_order(loop):
    fired: list[str] = []
    loop.call_later(0.03, lambda: fired.append("late"))
    loop.call_later(0.0, lambda: fired.append("first"))
    loop.call_later(0.0, lambda: fired.append("second"))
    loop.call_later(0.01, lambda: fired.append("soon"))
    spin(loop, lambda: len(fired) == 4)
    assert fired == ["first", "second", "soon", "late"]


def test_a_timer_never_fires_early(loop):
    start = time.monotonic()
    done: list[float] = []
    loop.call_later(0.05, lambda: done.append(time.monotonic()))
    spin(loop, lambda: bool(done))
    assert done[0] - start >= 0.05


def test_a_cancelled_timer_does_not_fire_and_the_heap_is_swept(loop):
    fired: list[int] = []
    timers = [loop.call_later(0.0, lambda n=n: fired.append(n)) for n in range(5000)]
    for timer in timers[:-1]:
        timer.cancel()
    spin(loop, lambda: fired == [4999])
    loop.run_once(0)
    assert fired == [4999]
    assert len(loop._timers) < 1024


def test_a_timer_may_add_timers_and_readers(loop):
    a, b = socket.socketpair()
    got: list[bytes] = []

    def arm() -> None:
        loop.add_reader(a, lambda: got.append(a.recv(16)))
        loop.call_later(0, lambda: b.send(b"hi"))

    loop.call_later(0, arm)
    spin(loop, lambda: got == [b"hi"])
    loop.forget(a)
    a.close()
    b.close()


def test_readers_and_writers_on_one_fd_are_independent(loop):
    a, b = socket.socketpair()
    events: list[str] = []
    loop.add_reader(a, lambda: events.append("read") or a.recv(16))
    loop.add_writer(a, lambda: events.append("write") or loop.remove_writer(a))
    b.send(b"x")
    spin(loop, lambda: {"read", "write"} <= set(events))
    loop.remove_reader(a)
    events.clear()
    b.send(b"y")
    loop.run_once(0.02)
    assert events == []
    a.close()
    b.close()


def test_a_signal_runs_its_handler_from_the_loop_not_the_handler(loop):
    seen: list[tuple[int, bool]] = []
    loop.add_signal(signal.SIGUSR1, lambda signum: seen.append((signum, loop.running)))
    loop.running = True
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    spin(loop, lambda: bool(seen))
    loop.running = False
    assert seen[0] == (signal.SIGUSR1, True)


def test_reaped_collects_every_exited_child_without_blocking():
    """In a child of ours: waitpid(-1) here would take other tests' children."""
    r, w = os.pipe()
    sub = os.fork()
    if sub == 0:  # pragma: no cover - reports through the pipe
        os.close(r)
        try:
            children = []
            for code in (0, 3, 7):
                pid = os.fork()
                if pid == 0:
                    os._exit(code)
                children.append(pid)
            found: dict[int, int] = {}
            deadline = time.monotonic() + 5
            while len(found) < 3 and time.monotonic() < deadline:
                found.update((pid, os.waitstatus_to_exitcode(status)) for pid, status in reaped())
                time.sleep(0.01)
            ok = found == dict(zip(children, (0, 3, 7), strict=True)) and list(reaped()) == []
            os.write(w, repr((ok, sorted(found.values()))).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as report:
        result = report.read()
    os.waitpid(sub, 0)
    assert result == "(True, [0, 3, 7])"


def test_run_until_stops_when_asked(loop):
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(1)
        loop.call_later(0, tick)

    loop.call_later(0, tick)
    loop.run(until=lambda: len(ticks) >= 10)
    assert len(ticks) >= 10
