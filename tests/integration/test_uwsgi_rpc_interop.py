"""uWSGI's RPC and remote signals between our vassal and a real uWSGI 2.0
(``pip install uwsgi``), both ways: an app under uWSGI calls our vassal's
functions and signals it, our vassal's app does the same to uWSGI; plus
what a call that fails looks like, a 65535-byte result, binary arguments,
and the raw answers of both servers to the same packets.

One real uWSGI (a master, two workers, a uwsgi socket and an HTTP socket)
and one of our vassals (the ``vassal`` script, two workers, the same two
sockets) run for the whole module; both load the same app, which
registers ``hello``, ``echo`` and ``big`` and a handler for signals 20-39
that writes a marker file, and which does what a POSTed JSON request says
(an ``uwsgi.rpc`` or an ``uwsgi.signal``) and answers what came of it.
Real uWSGI's python3 module wants bytes for rpc names and arguments and
str for ``register_rpc``'s name and a signal's node: the app uses those.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import TEST_TAG, answers, free_port, http_get, kill_tree, wait_for

BIN = Path(sys.executable).parent
UWSGI = shutil.which("uwsgi", path=str(BIN)) or shutil.which("uwsgi")
VASSAL = shutil.which("vassal", path=str(BIN))

pytestmark = [
    pytest.mark.uwsgi,
    pytest.mark.skipif(UWSGI is None, reason="uWSGI is not installed (pip install uwsgi)"),
    pytest.mark.skipif(VASSAL is None, reason="the vassal script is not installed"),
]

APP = '''
import json
import os
import struct

import uwsgi

SIDE = __SIDE__
MARKS = __MARKS__
PATTERN = bytes(range(256)) * 300  # (no two neighbouring bytes alike: a shift shows)


def hello(*args):
    return SIDE + b":" + b"|".join(args)


def echo(*args):
    """The arguments as they arrived, each after its 16-bit length."""
    return b"".join(struct.pack("<H", len(arg)) + arg for arg in args)


def big(size):
    return PATTERN[:int(size)]


uwsgi.register_rpc("hello", hello)
uwsgi.register_rpc("echo", echo)
uwsgi.register_rpc("big", big)


def mark(num):
    path = os.path.join(MARKS, "signal-%d" % num)
    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.rename(path + ".tmp", path)


for num in range(20, 40):
    uwsgi.register_signal(num, "worker", mark)


def run(req):
    if req["op"] == "rpc":
        return uwsgi.rpc(req["node"], bytes.fromhex(req["name"]), *[bytes.fromhex(a) for a in req["args"]])
    if req["op"] == "signal":
        return uwsgi.signal(req["num"], req["node"])
    raise KeyError(req["op"])


def application(environ, start_response):
    if environ["REQUEST_METHOD"] != "POST":
        answer = {"side": SIDE.decode()}
    else:
        req = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        try:
            result = run(req)
        except Exception as exc:
            answer = {"error": type(exc).__name__, "message": str(exc), "valueerror": isinstance(exc, ValueError)}
        else:
            answer = {"result": None if result is None else result.hex()}
    body = json.dumps(answer).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''

PATTERN = bytes(range(256)) * 300
OK_SIGNAL = b"\xff\x00\x00\x01"  # the answer to a remote signal taken


class Node:
    """One side: its uwsgi socket (``node``, what rpc and signal name), its
    HTTP socket (where the test asks its app), its marker dir and log."""

    def __init__(self, side: str, proc: subprocess.Popen, uwsgi_port: int, http_port: int,
                 marks: Path, log: Path):
        self.side = side
        self.proc = proc
        self.uwsgi_port = uwsgi_port
        self.http_port = http_port
        self.node = f"127.0.0.1:{uwsgi_port}"
        self.marks = marks
        self.log = log

    def ask(self, **request) -> dict:
        """What the app got doing ``request``: {"result": hex or None} or {"error": ...}."""
        status, body = http_get(self.http_port, "/", timeout=20, method="POST",
                                body=json.dumps(request).encode(),
                                headers={"Content-Type": "application/json"})
        assert status == 200, f"{self.side} app answered {status}: {body!r}\n{self.log_tail()}"
        return json.loads(body)

    def rpc(self, node: str, name: bytes, *args: bytes) -> dict:
        return self.ask(op="rpc", node=node, name=name.hex(), args=[a.hex() for a in args])

    def signal(self, num: int, node: str) -> dict:
        return self.ask(op="signal", num=num, node=node)

    def marker(self, num: int) -> int:
        """The pid that ran the handler of signal ``num`` here (once it has)."""
        path = self.marks / f"signal-{num}"
        return wait_for(lambda: path.exists() and int(path.read_text()), 10,
                        what=f"signal {num} handled on {self.side}")

    def tree(self) -> set[int]:
        return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


def result(data: bytes) -> dict:
    return {"result": data.hex()}


def unpack_array(block: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(block):
        size = struct.unpack_from("<H", block, offset)[0]
        items.append(block[offset + 2:offset + 2 + size])
        offset += 2 + size
    assert offset == len(block)
    return items


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (uWSGI 2.0 and our vassal stop on it), then SIGKILL to the tree."""
    if proc.poll() is None:
        try:
            tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait(5)
        for pid in tree:  # workers outliving their master
            kill_tree(pid)


def start(request, workdir: Path, side: str, cmd: list[str], uwsgi_port: int, http_port: int) -> Node:
    marks = workdir / f"{side}-marks"
    marks.mkdir()
    log = workdir / f"{side}.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "PYTEST_TAG": TEST_TAG})
    request.addfinalizer(lambda: stop(proc))  # (also when it never comes up)
    node = Node(side, proc, uwsgi_port, http_port, marks, log)
    try:
        wait_for(lambda: proc.poll() is not None or answers(http_port), 30, what=f"{side} answering")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{node.log_tail()}") from None
    assert proc.poll() is None, f"{side} exited with {proc.returncode}:\n{node.log_tail()}"
    assert json.loads(answers(http_port)) == {"side": side}
    return node


def write_app(workdir: Path, side: str) -> Path:
    app = workdir / f"app_{side}.py"
    marks = str(workdir / f"{side}-marks")
    app.write_text(APP.replace("__SIDE__", repr(side.encode())).replace("__MARKS__", repr(marks)))
    return app


@pytest.fixture(scope="module")
def real(request, tmp_path_factory) -> Node:
    workdir = tmp_path_factory.mktemp("uwsgi-rpc-real")
    uwsgi_port, http_port = free_port(), free_port()
    app = write_app(workdir, "uwsgi")
    cmd = [UWSGI, "--master", "--processes", "2", "--socket", f"127.0.0.1:{uwsgi_port}",
           "--http-socket", f"127.0.0.1:{http_port}", "--wsgi-file", str(app), "--need-app"]
    return start(request, workdir, "uwsgi", cmd, uwsgi_port, http_port)


@pytest.fixture(scope="module")
def ours(request, tmp_path_factory) -> Node:
    workdir = tmp_path_factory.mktemp("uwsgi-rpc-ours")
    uwsgi_port, http_port = free_port(), free_port()
    app = write_app(workdir, "ours")
    ini = workdir / "ours.ini"
    ini.write_text(f"[uwsgi]\nsocket = 127.0.0.1:{uwsgi_port}\nhttp-socket = 127.0.0.1:{http_port}\n"
                   f"wsgi-file = {app}\nmaster = true\nprocesses = 2\n")
    return start(request, workdir, "ours", [VASSAL, str(ini)], uwsgi_port, http_port)


def raw(port: int, packet: bytes) -> bytes:
    """Everything a server sends back to ``packet`` before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(packet)
        data = b""
        while chunk := sock.recv(1 << 17):
            data += chunk
    return data


def rpc_packet(name: bytes, *args: bytes, modifier2: int = 0) -> bytes:
    body = b"".join(struct.pack("<H", len(item)) + item for item in (name, *args))
    return struct.pack("<BHB", 173, len(body), modifier2) + body


# --- a uWSGI app calling our vassal ---------------------------------------------


def test_uwsgi_app_calls_our_function(real, ours):
    assert real.rpc(ours.node, b"hello", b"arg") == result(b"ours:arg")
    assert real.rpc(ours.node, b"hello", b"one", b"two", b"three") == result(b"ours:one|two|three")
    assert real.rpc(ours.node, b"hello") == result(b"ours:")


def test_uwsgi_app_signals_our_vassal(real, ours):
    assert real.signal(21, ours.node) == {"result": None}
    pid = ours.marker(21)
    assert pid in ours.tree(), "the handler ran in one of our vassal's workers"
    assert not (real.marks / "signal-21").exists()


# --- our vassal's app calling uWSGI -----------------------------------------------


def test_our_app_calls_uwsgi_function(real, ours):
    assert ours.rpc(real.node, b"hello", b"arg") == result(b"uwsgi:arg")
    assert ours.rpc(real.node, b"hello", b"one", b"two", b"three") == result(b"uwsgi:one|two|three")
    assert ours.rpc(real.node, b"hello") == result(b"uwsgi:")


def test_our_app_signals_uwsgi(real, ours):
    assert ours.signal(22, real.node) == {"result": None}
    pid = real.marker(22)
    assert pid in real.tree(), "the handler ran in one of uWSGI's workers"
    assert not (ours.marks / "signal-22").exists()


# --- calls that fail --------------------------------------------------------------


@pytest.mark.parametrize("target", ["ours", "uwsgi"])
def test_uwsgi_app_sees_a_missing_function_on_ours_as_on_uwsgi(real, ours, target):
    """Our server fails a call to no function as uWSGI's does: nothing back,
    which uWSGI's module turns into None."""
    node = ours.node if target == "ours" else real.node
    assert real.rpc(node, b"no-such-function", b"arg") == {"result": None}


@pytest.mark.parametrize("case", ["missing on uwsgi", "missing on ours", "node not listening"])
def test_our_app_sees_a_failed_call_as_a_uwsgi_app_does(real, ours, case):
    node = {"missing on uwsgi": real.node, "missing on ours": ours.node,
            "node not listening": f"127.0.0.1:{free_port()}"}[case]
    expected = real.rpc(node, b"no-such-function", b"arg")
    assert expected == {"result": None}  # what uWSGI's own module gives
    assert ours.rpc(node, b"no-such-function", b"arg") == expected


def test_a_failed_call_in_our_app_gives_none(real, ours):
    """uWSGI's module gives None for a call without an answer, and does not hang."""
    assert ours.rpc(real.node, b"no-such-function") == {"result": None}


# --- sizes and bytes --------------------------------------------------------------


def test_result_of_65535_bytes_from_ours_to_uwsgi(real, ours):
    assert real.rpc(ours.node, b"big", b"65535") == result(PATTERN[:65535])


def test_result_of_65535_bytes_from_uwsgi_to_ours(real, ours):
    assert ours.rpc(real.node, b"big", b"65535") == result(PATTERN[:65535])


def test_result_over_65535_bytes_from_ours_fails_cleanly(real, ours):
    """Ours caps a result at 65535 bytes (vassal/rpc.py MAX_RESULT): a uWSGI
    client gets no result rather than a cut or garbled one."""
    outcome = real.rpc(ours.node, b"big", b"65536")
    assert outcome in ({"result": None}, result(PATTERN[:65536]))


def test_result_over_65535_bytes_from_uwsgi_to_ours(real, ours):
    assert real.rpc(real.node, b"big", b"65536") == result(PATTERN[:65536])  # uWSGI's own client
    assert ours.rpc(real.node, b"big", b"65536") == result(PATTERN[:65536])


BINARY_ARGS = [b"\x00", b"\xff", b"a\x00b", b"\xff\x00\xff\x00", bytes(range(256)), b"\x00" * 300]


def test_binary_args_from_uwsgi_to_ours(real, ours):
    answer = real.rpc(ours.node, b"echo", *BINARY_ARGS)
    assert unpack_array(bytes.fromhex(answer["result"])) == BINARY_ARGS
    assert real.rpc(ours.node, b"echo", b"\x00\xff") == result(b"\x02\x00\x00\xff")


def test_binary_args_from_ours_to_uwsgi(real, ours):
    answer = ours.rpc(real.node, b"echo", *BINARY_ARGS)
    assert unpack_array(bytes.fromhex(answer["result"])) == BINARY_ARGS
    assert ours.rpc(real.node, b"echo", b"\x00\xff") == result(b"\x02\x00\x00\xff")


@pytest.mark.parametrize("name", [b"hello\xff", b"\xffhello", b"hel"])
def test_names_differing_in_a_byte_do_not_match(real, ours, name):
    """Names are compared whole, 0xff and all, both ways (a NUL is not
    tried: uWSGI reads names as C strings and stops at one)."""
    assert real.rpc(ours.node, name, b"a") == {"result": None}
    outcome = ours.rpc(real.node, name, b"a")
    assert outcome == {"result": None} or outcome.get("valueerror") is True, outcome


# --- the same packets to both servers -----------------------------------------


@pytest.mark.parametrize("packet", [
    rpc_packet(b"echo", b"a", b"\x00\xff"),
    rpc_packet(b"echo", b"a", b"\x00\xff", modifier2=1),
    rpc_packet(b"echo", *BINARY_ARGS),
    rpc_packet(b"big", b"65535"),
    rpc_packet(b"big", b"65535", modifier2=1),
    rpc_packet(b"big", b"1"),
    rpc_packet(b"big", b"0"),  # an empty result: nothing back
    rpc_packet(b"no-such-function", b"arg"),
    rpc_packet(b"no-such-function", b"arg", modifier2=1),
    rpc_packet(b"echo\xff", b"arg"),  # a name one byte longer
    bytes((110, 0, 0, 30)),  # a remote signal with a handler
    bytes((110, 0, 0, 200)),  # ... and one without: taken all the same
], ids=["echo", "echo-raw", "echo-binary", "65535", "65535-raw", "one-byte", "empty", "missing",
        "missing-raw", "name-plus-0xff", "signal", "signal-unregistered"])
def test_same_answer_as_uwsgi(real, ours, packet):
    expected = raw(real.uwsgi_port, packet)
    assert raw(ours.uwsgi_port, packet) == expected


def test_remote_signal_runs_the_handler_on_both(real, ours):
    assert raw(real.uwsgi_port, bytes((110, 0, 0, 31))) == OK_SIGNAL
    assert raw(ours.uwsgi_port, bytes((110, 0, 0, 31))) == OK_SIGNAL
    assert real.marker(31) in real.tree()
    assert ours.marker(31) in ours.tree()
