"""The control protocol, in process (issue 13): one JSON request line per
connection, one reply object, errors with emperorctl's exit codes, and no
request that can take the emperor down. The server is the real one; the
emperor is a stub, the client a socketpair."""

from __future__ import annotations

import json
import socket

import pytest

from bedrock.loop import Loop
from emperor.commands import REFUSED, USAGE, CommandError, Peer
from emperor.control_server import MAX_REQUEST_DEPTH, Connection, ControlServer

TENANT = Peer(1000, 1000, 1)


class StubEmperor:
    def __init__(self) -> None:
        self.loop = Loop()
        self.vassals: dict = {}
        self.logged: list[str] = []
        self.calls: list[tuple[str, dict, Peer]] = []

    def log(self, message: str) -> None:
        self.logged.append(message)

    def execute(self, name: str, args: dict, peer: Peer):
        self.calls.append((name, args, peer))
        if name == "boom":
            raise RuntimeError("a bug")
        if name == "no":
            raise CommandError("refused, and why", REFUSED)
        return {"echo": args}


@pytest.fixture
def served(tmp_path):
    emperor = StubEmperor()
    server = ControlServer(emperor, str(tmp_path / "control.sock"), 0o600)  # type: ignore[arg-type]
    pairs = []

    def ask(line: bytes, peer: Peer = TENANT) -> dict:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        connection = Connection(server, ours, peer)
        server.add(connection)
        theirs.sendall(line)
        theirs.shutdown(socket.SHUT_WR)
        for _ in range(50):
            if connection.closed:
                break
            connection.on_readable()
            emperor.loop.run_once(0.01)
        theirs.settimeout(2)
        data = b""
        while chunk := theirs.recv(65536):
            data += chunk
        return json.loads(data.splitlines()[0])

    yield emperor, ask
    for ours, theirs in pairs:
        ours.close()
        theirs.close()
    emperor.loop.selector.close()


def test_a_request_gets_its_result(served):
    emperor, ask = served
    assert ask(b'{"command": "status", "args": {"names": ["a.ini"]}}\n') == {"ok": True, "result": {"echo": {"names": ["a.ini"]}}}
    assert emperor.calls[0][2] == TENANT  # the peer the kernel said, not anything the client claims


def test_args_may_be_left_out(served):
    _, ask = served
    assert ask(b'{"command": "status"}\n')["result"] == {"echo": {}}


@pytest.mark.parametrize("line", [
    b"not json\n",
    b'["status"]\n',
    b'{"args": {}}\n',
    b'{"command": 7}\n',
    b'{"command": "status", "args": ["a.ini"]}\n',
    b'{"command": "status", "args": "a.ini"}\n',
    b"\xff\xfe\n",
    b"[" * (MAX_REQUEST_DEPTH + 5) + b"]" * (MAX_REQUEST_DEPTH + 5) + b"\n",
    b'{"command": "status", "args": {"names": ' + b"[" * 50000 + b"\n",
])
def test_a_malformed_request_is_a_usage_error_and_nothing_is_executed(served, line):
    emperor, ask = served
    reply = ask(line)
    assert reply["ok"] is False and reply["code"] == USAGE and reply["error"].startswith("bad request")
    assert emperor.calls == []


def test_a_refusal_carries_its_code(served):
    _, ask = served
    assert ask(b'{"command": "no"}\n') == {"ok": False, "code": REFUSED, "error": "refused, and why"}


def test_a_bug_in_a_command_costs_that_request_only(served):
    emperor, ask = served
    reply = ask(b'{"command": "boom"}\n')
    assert reply["ok"] is False and reply["code"] == 1 and "internal error" in reply["error"]
    assert any("control command 'boom' failed" in line for line in emperor.logged)
    assert ask(b'{"command": "status"}\n')["ok"] is True  # and the next one is served
