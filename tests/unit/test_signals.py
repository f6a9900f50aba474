"""In-process rules of the uwsgi signal framework and RPC wire: targets,
routing, the clock (timers, rb timers, crons, file monitors), the outbox,
and RPC arrays."""

from __future__ import annotations

import json
import socket
import time

import pytest

from vassal import rpc, signals
from vassal.signals import Clock, Queues, Router, SignalError, SignalTable


def moment(minute: int, hour: int, day: int, month: int, weekday_sunday0: int) -> time.struct_time:
    # struct_time's tm_wday is Monday=0
    return time.struct_time((2026, month, day, hour, minute, 0, (weekday_sunday0 - 1) % 7, 1, 0))


@pytest.mark.parametrize(("fields", "at", "matches"), [
    ((-1, -1, -1, -1, -1), (7, 3, 2, 12, 3), True),
    ((7, -1, -1, -1, -1), (7, 3, 2, 12, 3), True),
    ((8, -1, -1, -1, -1), (7, 3, 2, 12, 3), False),
    ((-5, -1, -1, -1, -1), (10, 3, 2, 12, 3), True),  # every 5 minutes
    ((-5, -1, -1, -1, -1), (11, 3, 2, 12, 3), False),
    ((0, 4, -1, -1, 0), (0, 4, 6, 12, 0), True),  # Sundays at 04:00
    ((0, 4, -1, -1, 0), (0, 4, 7, 12, 1), False),
])
def test_cron_fields(fields, at, matches):
    assert signals.cron_matches(fields, moment(*at)) is matches


@pytest.mark.parametrize("fields", [(60, -1, -1, -1, -1), (-1, 24, -1, -1, -1), (-1, -1, 0, -1, -1), (-1, -1, -1, 13, -1),
                                    (-1, -1, -1, -1, 7), (-61, -1, -1, -1, -1), (-1, -1, -1, -1), ("1", -1, -1, -1, -1)])
def test_bad_cron_fields_are_named(fields):
    with pytest.raises(SignalError):
        signals.check_cron(fields)


@pytest.mark.parametrize("target", ["", "worker", "workers", "active-workers", "worker1", "worker3", b"workers"])
def test_targets(target):
    assert signals.check_target(target, 3) in ("worker", "workers", "active-workers", "worker1", "worker3")


@pytest.mark.parametrize("target", ["worker0", "worker4", "mule", "spooler", "Workers", 5, None, "worker01x"])
def test_bad_targets(target):
    with pytest.raises(SignalError):
        signals.check_target(target, 3)


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), "1", True, 10**9])
def test_bad_timer_periods(seconds):
    with pytest.raises(SignalError):
        Clock().add_timer(1, seconds)


def test_rb_timer_runs_its_iterations_then_stops():
    clock = Clock()
    clock.add_timer(5, 1, 2, rb=True)
    start = time.monotonic()
    fired = [n for step in range(1, 6) for n in clock.fire(start + step)]
    assert fired == [5, 5]
    assert clock.empty()


def test_a_stalled_timer_fires_once_not_in_a_burst():
    clock = Clock()
    clock.add_timer(6, 1)
    assert clock.fire(time.monotonic() + 100) == [6]
    assert clock.fire(time.monotonic() + 100.5) == []


def test_file_monitor_sees_create_change_and_delete(tmp_path):
    clock = Clock()
    path = tmp_path / "f"
    clock.add_file_monitor(9, str(path))
    now = time.monotonic()
    assert clock.fire(now) == []
    path.write_text("a")
    assert clock.fire(now + 0.5) == []  # polled once a second
    assert clock.fire(now + 1) == [9]
    assert clock.fire(now + 2) == []
    path.unlink()
    assert clock.fire(now + 3) == [9]
    assert 0 < clock.next_in(now + 3) <= 1


def test_clock_requests_from_workers_are_checked():
    clock = Clock()
    for bad in ([], {"kind": "timer", "num": 300, "seconds": 1}, {"kind": "nuke", "num": 1},
                {"kind": "cron", "num": 1, "fields": "x"}, {"kind": "file_monitor", "num": 1, "path": "a\0b"}):
        with pytest.raises(SignalError):
            clock.add(bad)
    for _ in range(signals.MAX_TIMERS):
        clock.add({"kind": "timer", "num": 1, "seconds": 1})
    with pytest.raises(SignalError, match="at most"):
        clock.add({"kind": "timer", "num": 1, "seconds": 1})


@pytest.fixture
def routed():
    queues = Queues(3)
    table = SignalTable()
    live = {1, 2, 3}
    router = Router(queues, table, Clock(), 3, lambda: set(live), lambda: live - {3})
    yield queues, table, router, live
    queues.close()


def drain(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return b""


def delivered(queues: Queues) -> dict[str, bytes]:
    got = {f"worker{wid}": drain(queues.slots[wid - 1][1]) for wid in (1, 2, 3)}
    got["shared"] = drain(queues.shared_worker)
    return {k: v for k, v in got.items() if v}


def test_routing_by_target(routed):
    queues, table, router, live = routed
    for num, target in ((1, "worker"), (2, "workers"), (3, "worker2"), (4, "active-workers")):
        table.register(num, target, print, 0)
    for num in (1, 2, 3, 4):
        router.raise_signal(num)
    assert delivered(queues) == {"shared": b"\x01", "worker1": b"\x02\x04", "worker2": b"\x02\x03\x04", "worker3": b"\x02"}
    live.discard(2)
    router.raise_signal(3)  # worker2 is not running: nobody
    assert delivered(queues) == {}


def test_a_workers_own_handler_is_sent_to_it_alone(routed):
    queues, table, router, live = routed
    router.on_message(2, b"r\x07workers")
    router.raised(b"\x07")
    assert delivered(queues) == {"worker2": b"\x07"}
    router.worker_gone(2)
    assert not table.registered(7)


def test_malformed_worker_requests_are_dropped(routed, capsys):
    queues, table, router, live = routed
    for junk in (b"", b"r", b"r\x01mule", b"t{", b"t" + json.dumps({"kind": "timer", "num": 1, "seconds": -3}).encode(),
                 b"zzz", b"r\x01\xff\xfe"):
        router.on_message(1, junk)
    assert not table.entries and router.clock.empty()


def test_a_burst_waits_in_the_outbox_not_lost(routed):
    queues, table, router, live = routed
    table.register(8, "worker1", print, 0)
    router.raised(b"\x08" * 5000)
    router.outbox.flush()
    got = b""
    while True:
        chunk = drain(queues.slots[0][1])
        router.outbox.flush()
        if not chunk and not router.outbox.pending:
            break
        got += chunk
    assert got == b"\x08" * 5000 and router.dropped == 0


def test_rpc_arrays():
    assert rpc.parse_array(rpc.encode_array([b"f", b"", b"\x00" * 300])) == [b"f", b"", b"\x00" * 300]
    for bad in (b"\x01", b"\x05\x00ab", b"\x00"):
        with pytest.raises(rpc.RpcError):
            rpc.parse_array(bad)
    with pytest.raises(rpc.RpcError):
        rpc.parse_array(b"\x00\x00" * 300)  # more items than an array holds
    with pytest.raises(rpc.RpcError):
        rpc.request_packet(b"f", [b"x" * 40000, b"y" * 40000])


def test_rpc_table_limits_and_results(capsys):
    table = rpc.RpcTable(limit=2)
    table.register("a", lambda: b"A", "master")
    table.register(b"b", lambda: "text", "master")
    with pytest.raises(rpc.RpcError):
        table.register("c", lambda: b"", "master")
    table.register("a", lambda: b"again", "master")  # the same name again: replaced, not counted
    assert table.call(b"a", []) == b"again"
    assert table.call(b"b", []) == b"text"
    with pytest.raises(rpc.RpcError):
        table.register("x" * 255, print, "master")
    assert rpc.rpc_answer(table, rpc.encode_array([b"a"]), 0) == b"\xad\x05\x00\x00again"
    assert rpc.rpc_answer(table, rpc.encode_array([b"a"]), 1) == b"again"
    assert rpc.rpc_answer(table, b"\xff", 0) == b""
