"""Issue 10's building blocks, without an emperor: bounded JSON decoding,
escaping for the log, the loop's callback guard, the echo rate limit and
the control connection's output bounds."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from bedrock.loop import Loop
from emperor import untrusted
from emperor.logbuf import EchoLimit, LogBuffer, read_available
from emperor.names import name_problem, printable

# --- bounded JSON -------------------------------------------------------------------


@pytest.mark.parametrize("bomb", [b"[" * 50000, b'{"a":' * 13000, b"[" * 33 + b"]" * 33, b'[{"a":[' * 12])
def test_deep_json_is_a_value_error_not_a_recursion_error(bomb):
    with pytest.raises(ValueError, match="nested"):
        untrusted.loads(bomb, max_depth=32)


def test_brackets_inside_strings_do_not_count():
    doc = {"reason": "[" * 1000 + "{" * 1000, "escaped": '\\"[[[['}
    assert untrusted.loads(json.dumps(doc).encode(), max_depth=2) == doc
    assert untrusted.loads(b"[" * 32 + b"]" * 32, max_depth=32) is not None


def test_size_and_encoding_are_bounded():
    with pytest.raises(ValueError, match="too long"):
        untrusted.loads(b'"' + b"x" * 70000 + b'"', max_bytes=65536)
    with pytest.raises(ValueError):
        untrusted.loads(b'{"a": "\xff"}')
    with pytest.raises(ValueError):
        untrusted.loads(b"1" * 5000)  # int() digit limit: ValueError too


@pytest.mark.timeout(5)
def test_unterminated_strings_are_linear():
    # '"\\"\\"...' once made the string scan quadratic (minutes for 64 KiB).
    for evil in (b"[" * 40 + b'"\\' * 32000, b"[" * 40 + b'"' + b"a" * 65000, b'[' * 40 + b'"\\"' * 21000):
        with pytest.raises(ValueError):
            untrusted.loads(evil, max_bytes=1 << 20)


def test_once_is_once_and_bounded():
    once = untrusted.Once(size=2)
    assert once("a") and not once("a") and once.repeats("a") == 1
    assert once("b") and once("c") and once("a")  # "a" was forgotten first


# --- log escaping --------------------------------------------------------------------


def test_printable_escapes_what_could_forge_a_line():
    assert printable("plain text\tand tab") == "plain text\tand tab"
    assert printable("a\nb\rc\x1b[2Kd\x7f\x85\u2028") == "a\\x0ab\\x0dc\\x1b[2Kd\\x7f\\x85\\u2028"
    assert printable("caf\udce9") == "caf\\xe9"  # the original byte of an undecodable name
    assert printable("one\ntwo\x00", keep_newlines=True) == "one\ntwo\\x00"


def test_name_problem():
    assert name_problem("web.ini") is None and name_problem("ü-app.toml") is None
    assert "control character" in name_problem("a\nb.ini")
    assert "UTF-8" in name_problem(os.fsdecode(b"bad\xff.ini"))
    assert "too long" in name_problem("x" * 300)
    assert "bidirectional" in name_problem("gnp.\u202eexe.ini")
    assert name_problem("") is not None


def test_emperor_lines_only_start_emperor_lines(capfd):
    from emperor.core import Emperor

    Emperor._default_log("[x\n2024-01-01 00:00:00 [emperor] forged] spawned\n")
    err = capfd.readouterr().err
    first, second = err.splitlines()
    assert "[emperor] [x" in first and second.startswith("    2024")


# --- the loop's guard ------------------------------------------------------------------


def test_a_failing_reader_is_reported_once_then_paused():
    loop = Loop()
    told: list[str] = []
    loop.report = told.append
    a, b = socket.socketpair()
    calls = []

    def bad() -> None:
        calls.append(a.recv(1))
        raise ValueError("boom")

    later: list[int] = []
    loop.add_reader(a, bad)
    loop.call_later(0, lambda: 1 / 0)
    loop.call_later(0, lambda: later.append(1))
    b.send(b"x" * 100)
    for _ in range(20):
        loop.run_once(0.01)
    assert len(calls) == 2 and later == [1]
    assert sum("failed, the loop goes on" in m for m in told) == 2  # the reader once, the timer once
    assert any("keeps failing: not watching fd" in m for m in told)
    assert "ValueError: boom" in told[0]
    # Watched again after the pause (it may be the emperor's only inotify fd).
    time.sleep(1.1)
    for _ in range(5):
        loop.run_once(0.01)
    assert len(calls) == 4  # then twice in a row again: paused again
    a.close()
    b.close()


def test_a_failing_signal_handler_does_not_stop_the_loop():
    loop = Loop()
    told: list[str] = []
    loop.report = told.append
    seen: list[int] = []
    loop.add_signal(signal.SIGUSR2, lambda s: (_ for _ in ()).throw(RuntimeError("handler")))
    loop.add_signal(signal.SIGWINCH, seen.append)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGWINCH)
        deadline = time.monotonic() + 2
        while not seen and time.monotonic() < deadline:
            loop.run_once(0.05)
    finally:
        loop.reset_signals_in_child()
    assert seen == [signal.SIGWINCH] and "RuntimeError: handler" in told[0]


def test_a_child_forked_in_a_callback_does_not_run_on_as_its_parent():
    loop = Loop()
    loop.report = lambda message: None
    result: list[int] = []

    def forks() -> None:
        pid = os.fork()
        if pid == 0:
            raise ValueError("in the child")
        result.append(pid)

    loop.call_later(0, forks)
    try:
        loop.run_once(0)
    except ValueError:
        os._exit(7)  # the child: the exception reached its own code, not the parent's loop
    _, status = os.waitpid(result[0], 0)
    assert os.waitstatus_to_exitcode(status) == 7


# --- the echo rate limit ------------------------------------------------------------


def test_echo_limit_burst_then_rate_and_counts():
    total = EchoLimit(1000, 1 << 20, 1.0)
    limit = EchoLimit(10, 1 << 20, 1.0, parent=total)
    echoed: list[str] = []
    buf = LogBuffer(100000, echo=echoed.append, echo_limit=limit)
    buf.feed(b"line\n" * 100)
    assert len(echoed) == 10 and buf.not_echoed == 90 and limit.take_pending() == 90 and limit.pending == 0
    assert total.not_echoed == 90
    assert len(buf.tail()) == 100  # the ring keeps everything
    limit.lines.stamp -= 0.5  # half a second later: five more
    buf.feed(b"more\n" * 10)
    assert len(echoed) == 15


def test_echo_limit_counts_bytes_too():
    limit = EchoLimit(1000, 20000, 1.0)
    echoed: list[str] = []
    buf = LogBuffer(1000, echo=echoed.append, echo_limit=limit)
    buf.feed((b"y" * 9999 + b"\n") * 5)
    assert len(echoed) == 2 and buf.not_echoed == 3  # a burst of 20000 bytes


def test_bulk_feed_keeps_line_semantics():
    buf = LogBuffer(1000)
    buf.feed(b"a\r\nb\nc")
    buf.feed(b"\xc3")
    buf.feed(b"\xa9\n" + b"z" * 20000)
    assert buf.tail() == ["a", "b", "c\u00e9", "z" * 20000]


def test_read_available_reads_a_bounded_amount():
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.write(w, b"x" * 60000)
    assert len(read_available(r, limit=1000)) == 1000
    assert len(read_available(r)) == 59000
    assert read_available(r) == b""
    os.close(w)
    assert read_available(r) is None
    os.close(r)


# --- control connections ----------------------------------------------------------------


class _FakeEmperor:
    def __init__(self) -> None:
        self.loop = Loop()
        self.logged: list[str] = []

    def log(self, message: str) -> None:
        self.logged.append(message)


def _server_and_client():
    from emperor.commands import Peer
    from emperor.control_server import Connection, _Server

    server = _Server(_FakeEmperor())  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    connection = Connection(server, ours, Peer(1000, 1000, 1))
    server.add(connection)
    return server, connection, theirs


def test_a_follower_that_does_not_read_is_dropped_with_a_note():
    from emperor.control_server import FOLLOW_BUFFER

    server, connection, client = _server_and_client()
    connection.follow()
    line = "l" * 1000
    pushed = 0
    while connection.push_line(line):
        pushed += 1
        server.loop.run_once(0)
        assert pushed < 10000
    assert len(connection.outbuf) <= FOLLOW_BUFFER + 2000 and server.dropped == 1
    assert not connection.push_line(line)  # the log buffer forgets it now
    client.setblocking(False)
    data = b""
    deadline = time.monotonic() + 5
    while not connection.closed and time.monotonic() < deadline:
        try:
            data += client.recv(1 << 20)
        except BlockingIOError:
            pass
        server.loop.run_once(0.01)
    client.setblocking(True)
    while chunk := client.recv(1 << 20):
        data += chunk
    last = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    assert "dropped by the emperor" in last["note"] and connection.closed and server.pending == 0
    assert server.by_uid == {} and server.limited == 0


def test_one_bounded_request_per_connection():
    from emperor.control_server import MAX_REQUEST

    server, connection, client = _server_and_client()
    handled: list[bytes] = []
    server.handle = lambda c, line: (handled.append(line), c.send({"ok": True}), c.finish())  # type: ignore[method-assign]
    client.sendall(b'{"command": "status"}\n{"command": "status"}\n')
    connection.on_readable()
    assert handled == [b'{"command": "status"}'] and connection.closed

    server, connection, client = _server_and_client()
    client.setblocking(False)
    sent = 0
    while sent <= MAX_REQUEST and not connection.closed:
        sent += client.send(b"x" * 8192)
        connection.on_readable()
    assert b"request too long" in client.recv(65536)


def test_a_pidfile_is_read_as_untrusted_input(tmp_path):
    """smart-attach-daemon's pidfile is the app's: odd contents are no pid,
    and a FIFO in its place does not hang the vassal's loop."""
    from vassal.smartdaemon import read_pid

    cases = {b"1234\n": 1234, b"\xb2": None, "²".encode(): None, b"\xff\xfe12": None, b"0": None, b"-5": None,
             b"9" * 40: None, b"12" + b" " * 10_000_000: 12}
    for n, (content, pid) in enumerate(cases.items()):
        path = tmp_path / f"p{n}.pid"
        path.write_bytes(content)
        assert read_pid(str(path)) == pid, content[:20]
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    assert read_pid(str(fifo)) is None
    assert read_pid(str(tmp_path)) is None and read_pid(str(tmp_path / "none")) is None
