"""The uwsgi module for apps (issue 14 part 2) under a real emperor: worker
ids, RPC, signals to each kind of target, timers, file monitors, atexit,
the seed's refcount fix (handlers nothing else references survive a
collection), and the uwsgi socket answering RPC (173) and signal (110)
packets from raw clients."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.helpers import answers, free_port, http_get, wait_for

APP = '''
import gc, json, os, sys, uwsgi

EVENTS = {events!r}

def note(num):
    with open(EVENTS, "a") as handle:
        handle.write(f"{{num}}:{{uwsgi.worker_id()}}\\n")

# Lambdas nothing else references (the seed's refcount bug lost them).
uwsgi.register_rpc("hello", lambda *args: b"HI:" + b",".join(args))
uwsgi.register_rpc("big", lambda size: b"x" * int(size))
uwsgi.register_rpc("boom", lambda: 1 / 0)
uwsgi.register_rpc("exitme", lambda: sys.exit(3))
uwsgi.register_signal(10, "workers", lambda num: note(num))
uwsgi.register_signal(11, "worker", lambda num: note(num))
uwsgi.register_signal(12, f"worker{{uwsgi.numproc}}", lambda num: note(num))
uwsgi.register_signal(13, "active-workers", lambda num: note(num))
uwsgi.register_signal(14, "", lambda num: note(num))
uwsgi.register_signal(15, "workers", lambda num: 1 / 0)
gc.collect()

def application(env, start_response):
    path = env["PATH_INFO"]
    out = {{"wid": uwsgi.worker_id()}}
    if path == "/info":
        out.update(numproc=uwsgi.numproc, masterpid=uwsgi.masterpid(), rpc=[n.decode() for n in uwsgi.rpc_list()],
                   registered=[n for n in range(20) if uwsgi.signal_registered(n)],
                   processes=uwsgi.opt.get("processes", b"").decode())
    elif path.startswith("/raise/"):
        num, count = (int(x) for x in path.split("/")[2:4])
        for _ in range(count):
            uwsgi.signal(num)
    elif path == "/calls":
        gc.collect()
        out["calls"] = sum(uwsgi.call("hello", b"a") == b"HI:a" for _ in range(1000))
    elif path == "/register":
        uwsgi.register_signal(30, "workers", lambda num: note(num))
    elif path.startswith("/try/"):
        what = path[5:]
        tries = {{
            "target": lambda: uwsgi.register_signal(31, "worker9", note),
            "number": lambda: uwsgi.signal(256),
            "big": lambda: uwsgi.call("big", b"65536"),
            "boom": lambda: uwsgi.call("boom"),
            "missing": lambda: uwsgi.call("nope"),
            "timer": lambda: uwsgi.add_timer(32, -1),
            "cron": lambda: uwsgi.add_cron(33, 61, -1, -1, -1, -1),
        }}
        try:
            out["result"] = repr(tries[what]())
            out["error"] = None
        except Exception as exc:
            out["error"] = f"{{type(exc).__name__}}: {{exc}}"
    elif path == "/ok":
        out["len"] = len(uwsgi.call("big", b"65535"))
    body = json.dumps(out).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def api_vassal(start_emperor, tmp_path: Path):
    """A vassal of the app above: (emperor, http port, uwsgi port, events file)."""
    emp = start_emperor()
    events = tmp_path / "events"
    events.write_text("")
    app = tmp_path / "apiapp.py"

    def start(extra: str = "", processes: int = 2, source: str = APP) -> tuple[int, int]:
        app.write_text(source.format(events=str(events)))
        http_port, uwsgi_port = free_port(), free_port()
        (emp.dir / "api.ini").write_text(
            f"[uwsgi]\nwsgi-file = {app}\nprocesses = {processes}\nhttp-socket = 127.0.0.1:{http_port}\n"
            f"socket = 127.0.0.1:{uwsgi_port}\ndisable-logging = true\n{extra}")
        wait_for(lambda: answers(http_port, "/info"), 20, what="the vassal answering")
        return http_port, uwsgi_port

    start.emp = emp  # type: ignore[attr-defined]
    start.events = events  # type: ignore[attr-defined]
    return start


def get(port: int, path: str) -> dict:
    status, body = http_get(port, path)
    assert status == 200, body
    return json.loads(body)


def lines(events: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in line.split(":")) for line in events.read_text().split()]  # type: ignore[misc]


def both_workers_up(port: int) -> None:
    wait_for(lambda: {get(port, "/info")["wid"] for _ in range(20)} == {1, 2}, 15, what="both workers serving")


def test_api_basics(api_vassal):
    port, _ = api_vassal()
    info = get(port, "/info")
    assert info["wid"] in (1, 2) and info["numproc"] == 2 and info["processes"] == "2"
    assert info["masterpid"] not in (0, os.getpid())
    assert info["rpc"] == ["hello", "big", "boom", "exitme"]
    assert info["registered"] == [10, 11, 12, 13, 14, 15]


def test_handlers_and_functions_nothing_references_survive_a_collection(api_vassal):
    port, _ = api_vassal()
    both_workers_up(port)
    assert get(port, "/calls")["calls"] == 1000
    get(port, "/raise/10/1000")  # to each worker: 2000 runs
    events = api_vassal.events
    wait_for(lambda: len(lines(events)) >= 2000, 20, what="every signal handled")
    time.sleep(0.3)
    got = lines(events)
    assert sorted(got) == sorted([(10, 1)] * 1000 + [(10, 2)] * 1000)


def test_each_kind_of_target(api_vassal):
    port, _ = api_vassal()
    both_workers_up(port)
    events = api_vassal.events
    for num in (11, 12, 13, 14):
        events.write_text("")
        get(port, f"/raise/{num}/1")
        expected = {11: 1, 12: 1, 13: 2, 14: 1}[num]
        wait_for(lambda n=expected: len(lines(events)) >= n, 10, what=f"signal {num} handled")
        time.sleep(0.3)  # nothing more comes
        got = lines(events)
        assert len(got) == expected, (num, got)
        if num == 12:
            assert got == [(12, 2)]
        if num == 13:
            assert sorted(got) == [(13, 1), (13, 2)]


def test_a_handler_registered_in_a_worker_runs_only_there(api_vassal):
    port, _ = api_vassal()
    both_workers_up(port)
    registrant = get(port, "/register")["wid"]
    events = api_vassal.events
    # Raised ten times, from whichever worker: each goes to the registrant alone.
    for _ in range(10):
        get(port, "/raise/30/1")
    wait_for(lambda: len(lines(events)) >= 10, 10, what="the registrant's handler")
    time.sleep(0.3)
    assert lines(events) == [(30, registrant)] * 10


def test_a_raising_handler_is_logged_and_the_worker_serves_on(api_vassal):
    port, _ = api_vassal()
    get(port, "/raise/15/3")
    wait_for(lambda: "signal 15 handler on worker" in api_vassal.emp.log_text(), 10, what="the handler's error logged")
    assert "ZeroDivisionError" in api_vassal.emp.log_text()
    both_workers_up(port)


def test_bad_use_gets_uwsgis_errors(api_vassal):
    port, _ = api_vassal()
    answers = {what: get(port, f"/try/{what}") for what in ("target", "number", "big", "boom", "missing", "timer", "cron")}
    errors = {what: answer["error"] for what, answer in answers.items()}
    assert "worker9" in errors["target"] and errors["target"].startswith("SignalError")
    assert "256" in errors["number"]
    for what in ("big", "boom", "missing"):  # uWSGI's module: None, no exception
        assert errors[what] is None and answers[what]["result"] == "None", (what, answers[what])
    assert "period" in errors["timer"]
    assert "minute" in errors["cron"]
    assert get(port, "/ok")["len"] == 65535  # the largest result there is
    log = api_vassal.emp.log_text()
    assert "more than 65535" in log and "'boom' raised ZeroDivisionError" in log and "no function 'nope'" in log


TIMERS = APP.replace("gc.collect()\n", '''gc.collect()
uwsgi.register_signal(20, "workers", lambda num: note(num))
uwsgi.add_timer(20, 1)
uwsgi.register_signal(21, "worker", lambda num: note(num))
uwsgi.add_rb_timer(21, 0.5, 2)
uwsgi.register_signal(22, "worker", lambda num: note(num))
uwsgi.add_file_monitor(22, EVENTS + ".watched")
def bye():
    with open(EVENTS + ".atexit", "a") as handle:
        handle.write(f"{{uwsgi.worker_id()}}\\n")
uwsgi.atexit = bye
''', 1)


@pytest.mark.parametrize("processes", [2, 1])
def test_timers_file_monitors_and_atexit(api_vassal, processes):
    """With one worker the master's process serves, and the clock is its own."""
    port, _ = api_vassal(source=TIMERS, processes=processes)
    events = api_vassal.events
    wait_for(lambda: sum(1 for n, _ in lines(events) if n == 20) >= 2 * processes, 10, what="the timer, twice")
    assert sum(1 for n, _ in lines(events) if n == 21) == 2  # rb timer: two iterations, then done
    watched = Path(str(events) + ".watched")
    watched.write_text("changed")
    wait_for(lambda: any(n == 22 for n, _ in lines(events)), 10, what="the file monitor")
    time.sleep(1.2)
    assert sum(1 for n, _ in lines(events) if n == 21) == 2
    assert sum(1 for n, _ in lines(events) if n == 22) == 1
    assert {w for _, w in lines(events)} <= set(range(1, processes + 1))
    (api_vassal.emp.dir / "api.ini").unlink()
    wait_for(lambda: api_vassal.emp.vassal("api.ini") is None, 20, what="stopped")
    assert sorted(Path(str(events) + ".atexit").read_text().split()) == [str(n) for n in range(1, processes + 1)]


def uwsgi_packet(modifier1: int, modifier2: int, body: bytes) -> bytes:
    return bytes((modifier1,)) + struct.pack("<H", len(body)) + bytes((modifier2,)) + body


def array(*items: bytes) -> bytes:
    return b"".join(struct.pack("<H", len(item)) + item for item in items)


def exchange(port: int, data: bytes, pieces: int = 1) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            sock.sendall(data[start:start + step])
            if pieces > 1:
                time.sleep(0.02)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_the_uwsgi_socket_answers_rpc_and_signal_packets(api_vassal):
    http, port = api_vassal()
    request = array(b"hello", b"\x00\xff", b"two")
    assert exchange(port, uwsgi_packet(173, 0, request)) == b"\xad\x09\x00\x00HI:\x00\xff,two"
    assert exchange(port, uwsgi_packet(173, 1, request), pieces=5) == b"HI:\x00\xff,two"  # trickled in
    assert exchange(port, uwsgi_packet(173, 0, array(b"nope"))) == b""
    assert exchange(port, uwsgi_packet(173, 0, array(b"big", b"65535")))[:4] == b"\xad\xff\xff\x00"
    assert exchange(port, uwsgi_packet(173, 0, b"\x05\x00ab")) == b""  # a truncated array
    assert exchange(port, uwsgi_packet(173, 0, b"")) == b""
    assert exchange(port, uwsgi_packet(110, 11, b"")) == b"\xff\x00\x00\x01"
    wait_for(lambda: (11, 1) in lines(api_vassal.events) or (11, 2) in lines(api_vassal.events), 10, what="the remote signal")
    assert exchange(port, uwsgi_packet(99, 0, b"")).startswith(b"HTTP/1.1 501")
    for _ in range(5):  # a function that calls sys.exit(3): neither the worker nor the vassal ends
        assert exchange(port, uwsgi_packet(173, 0, array(b"exitme"))) == b""
    assert "worker 1 (pid" not in api_vassal.emp.log_text() and "worker 2 (pid" not in api_vassal.emp.log_text()
    assert get(http, "/info")["numproc"] == 2  # all of that disturbed nothing
