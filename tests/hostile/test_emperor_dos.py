"""Issue 10: a vassal or a control client must not take the emperor down or
starve it. Each test plays a real tenant (tyrant mode, a 666 control
socket) against a real emperor, and fails on the code before the fix:
nested JSON killed it (8), non-reading ``logs -f`` clients grew it without
bound and running out of fds spun it (10), a flooding vassal filled its log
(11), file names and vassal lines forged its log lines (19), and ``status``
told another tenant's vassal from an unknown one (20)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import answers, free_port, hello_ini, wait_for
from tests.hostile.tenant import Tenant

pytestmark = [pytest.mark.linux_only, pytest.mark.timeout(120)]

CTL = [sys.executable, "-m", "emperor.ctl"]


def tyrant_emperor(start_emperor, hostile_base: Path):
    return start_emperor("--emperor-tyrant", "--emperor-control-mode", "666",
                         vassal_dir=hostile_base / "vassals", control_dir=hostile_base)


def as_tenant_ctl(tenant: Tenant, emp, *args: str) -> subprocess.CompletedProcess:
    return tenant.run(*CTL, "--control", str(emp.control), *args)


def raw_request(tenant: Tenant, emp, request: object) -> dict:
    """One request line straight to the socket (for verbs emperorctl has no
    subcommand for); the first reply line."""
    send = ("import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
            "s.sendall(sys.argv[2].encode() + b'\\n'); data = b''\n"
            "while b'\\n' not in data and (chunk := s.recv(65536)): data += chunk\n"
            "sys.stdout.write(data.decode())\n")
    return json.loads(tenant.run(sys.executable, "-c", send, str(emp.control), json.dumps(request)).stdout)


def script(hostile_base: Path, name: str, text: str) -> Path:
    """A world-readable script the tenants' processes can run."""
    path = hostile_base / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def spawn_as(tenant: Tenant, *argv: str) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tenant.home)}
    return subprocess.Popen(list(argv), user=tenant.uid, group=tenant.gid, extra_groups=[], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def first_line(proc: subprocess.Popen, timeout: float = 20) -> dict:
    """The helper's report (one JSON line); its stderr if it died first."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        stop(proc)
        raise AssertionError(f"helper said nothing: {proc.stderr.read() if proc.stderr else ''}")
    return json.loads(line)


# A tenant's client: COUNT connections asking MODE ("follow": logs -f NAME
# and never read; "read": logs -f NAME and keep reading; "idle": send
# nothing). Reports what the emperor answered, then (follow) drains one
# accepted connection to its end and reports its last message.
CLIENTS = '''
import json, select, socket, sys, time
path, name, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    if mode != "idle":
        s.sendall(json.dumps({"command": "logs", "args": {"names": [name], "lines": 0, "follow": True}}).encode() + b"\\n")
    socks.append(s)
time.sleep(1.5)
kinds = {"accepted": [], "refused": [], "other": []}
for s in socks:
    try:
        head = s.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        head = b""
    kind = "accepted" if head.startswith(b'{"ok":true') else "refused" if head.startswith(b'{"ok":false') else "other"
    kinds[kind].append(s)
print(json.dumps({k: len(v) for k, v in kinds.items()}), flush=True)
if mode == "follow" and kinds["accepted"]:
    s = kinds["accepted"][0]
    s.settimeout(15)
    data = b""
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except OSError:
        pass
    lines = [l for l in data.split(b"\\n") if l]
    print(json.dumps({"last": json.loads(lines[-1]) if lines else None, "closed": True}), flush=True)
while True:
    if mode == "read":
        ready, _, _ = select.select(socks, [], [], 1)
        for s in ready:
            try:
                s.recv(1 << 16)
            except OSError:
                pass
    else:
        time.sleep(1)
'''

# Writes long lines to stdout as fast as the pipe takes them.
FLOOD = '''
import os
line = ("flood " + "x" * 4000 + "\\n").encode()
chunk = line * 16
while True:
    os.write(1, chunk)
'''


# --- 8: nested JSON -------------------------------------------------------------

BOMB_APP = '''
import os, socket
s = socket.socket(fileno=os.dup(int(os.environ["PYEMPEROR_STATUS_FD"])))
for bomb in (b"[" * 50000, b'{"a":' * 30000, b"[" * 50000):
    s.send(bomb)

def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "4")])
    return [b"bomb"]
'''


def test_nested_json_on_the_status_fd_costs_that_report_only(start_emperor, hostile_base, tenant):
    emp = tyrant_emperor(start_emperor, hostile_base)
    app = script(hostile_base, "bomb.py", BOMB_APP)
    bomb_port, calm_port = free_port(), free_port()
    tenant.write(emp.dir / "calm.ini", hello_ini(calm_port))
    wait_for(lambda: answers(calm_port), 20, what="the bystander up")
    tenant.write(emp.dir / "bomb.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{bomb_port}\n")
    wait_for(lambda: answers(bomb_port), 20, what="the bomb vassal up (its reports were read)")
    assert emp.proc.poll() is None, emp.log_text()
    assert answers(calm_port) and emp.vassal("bomb.ini")["state"] == "ready"
    # Three bad reports, one line about them.
    wait_for(lambda: "ignoring a malformed status report" in emp.log_text(), 10, what="the bad report noted")
    assert emp.log_text().count("ignoring a malformed status report") == 1


def test_nested_json_on_the_control_socket_is_a_usage_error(start_emperor, hostile_base, tenant):
    emp = tyrant_emperor(start_emperor, hostile_base)
    port = free_port()
    tenant.write(emp.dir / "calm.ini", hello_ini(port))
    wait_for(lambda: answers(port), 20, what="the bystander up")
    send = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
            "s.sendall(b'[' * 5000 + b'\\n'); sys.stdout.write(s.recv(65536).decode())\n")
    reply = tenant.run(sys.executable, "-c", send, str(emp.control))
    answer = json.loads(reply.stdout)
    assert answer["ok"] is False and answer["code"] == 2 and "nested" in answer["error"]
    assert emp.proc.poll() is None, emp.log_text()
    assert answers(port)
    assert as_tenant_ctl(tenant, emp, "status", "calm.ini").returncode == 0


# --- 10: control and log resources ----------------------------------------------------

def test_non_reading_followers_are_bounded_and_root_still_served(start_emperor, hostile_base, tenant):
    from emperor.control_server import MAX_PER_UID

    emp = tyrant_emperor(start_emperor, hostile_base)
    flood = script(hostile_base, "flood.py", FLOOD)
    clients = script(hostile_base, "clients.py", CLIENTS)
    tenant.write(emp.dir / "chatty.ini", f"[uwsgi]\nattach-daemon = {sys.executable} {flood}\n")
    wait_for(lambda: len(emp.ctl("logs", "chatty.ini", "-n", "3").stdout) > 100, 20, what="chatty's lines")
    emperor = psutil.Process(emp.proc.pid)
    before = emperor.memory_info().rss
    helper = spawn_as(tenant, sys.executable, str(clients), str(emp.control), "chatty.ini", "150", "follow")
    try:
        counts = first_line(helper)
        # The uid's cap held; the rest got an answer, not a hang.
        assert counts["accepted"] == MAX_PER_UID and counts["refused"] == 150 - MAX_PER_UID, counts
        peak = before
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            peak = max(peak, emperor.memory_info().rss)
            started = time.monotonic()
            status = json.loads(emp.ctl("--json", "status").stdout)
            assert time.monotonic() - started < 10
            time.sleep(0.2)
        assert peak - before < 100 << 20, f"the emperor grew by {(peak - before) >> 20} MiB"
        assert status["emperor"]["control_clients"]["followers_dropped"] > 0
        # A dropped follower is told why, after what it had not read.
        drained = first_line(helper)
        assert drained["last"] and "dropped by the emperor" in drained["last"].get("note", ""), drained
    finally:
        stop(helper)
    assert emp.proc.poll() is None


def test_out_of_fds_no_spin_and_root_still_served(start_emperor, hostile_base, tenant):
    emp = tyrant_emperor(start_emperor, hostile_base)
    clients = script(hostile_base, "clients.py", CLIENTS)
    port = free_port()
    tenant.write(emp.dir / "quiet.ini", hello_ini(port))
    wait_for(lambda: answers(port), 20, what="quiet up")
    pid = emp.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 12, limits[1]))
    # Followers that keep reading: nothing to drop or time out, only fds held.
    helper = spawn_as(tenant, sys.executable, str(clients), str(emp.control), "quiet.ini", "30", "read")
    try:
        counts = first_line(helper)
        assert counts["accepted"] < 30 and counts["other"] == 0, counts  # the rest were told, not left hanging
        assert psutil.Process(pid).cpu_percent(interval=1.0) < 50, "accept spins on EMFILE"
        started = time.monotonic()
        result = emp.ctl("--json", "status", check=False)
        assert result.returncode == 0, result.stderr
        # Well before any of the tenant's connections would time out.
        assert time.monotonic() - started < 4
        assert answers(port)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        stop(helper)


def test_idle_and_oversized_requests_are_cut_off(start_emperor, hostile_base, tenant):
    from emperor.control_server import MAX_REQUEST, REQUEST_TIMEOUT

    emp = tyrant_emperor(start_emperor, hostile_base)
    talk = ("import socket, sys, time\n"
            "idle = socket.socket(socket.AF_UNIX); idle.connect(sys.argv[1]); idle.settimeout(30)\n"
            "big = socket.socket(socket.AF_UNIX); big.connect(sys.argv[1]); big.settimeout(30)\n"
            "try:\n"
            "    big.sendall(b'x' * (int(sys.argv[2]) + 10))\n"
            "except OSError:\n"
            "    pass\n"
            "print(big.recv(65536).decode().strip(), flush=True)\n"
            "start = time.monotonic(); data = idle.recv(65536)\n"
            "while data and idle.recv(65536): pass\n"
            "print(round(time.monotonic() - start, 1), data.decode().strip(), flush=True)\n")
    result = tenant.run(sys.executable, "-c", talk, str(emp.control), str(MAX_REQUEST), timeout=60)
    big, idle = result.stdout.splitlines()
    assert "request too long" in json.loads(big)["error"]
    waited, _, reply = idle.partition(" ")
    assert float(waited) <= REQUEST_TIMEOUT + 2 and "no request line" in json.loads(reply)["error"]


# --- 11: log floods -----------------------------------------------------------------

def test_flooding_vassal_is_not_echoed_beyond_its_rate(start_emperor, hostile_base, tenant):
    emp = tyrant_emperor(start_emperor, hostile_base)
    flood = script(hostile_base, "flood.py", FLOOD)
    port = free_port()
    tenant.write(emp.dir / "calm.ini", hello_ini(port))
    wait_for(lambda: answers(port), 20, what="the bystander up")
    tenant.write(emp.dir / "flood.ini", f"[uwsgi]\nattach-daemon = {sys.executable} {flood}\n")
    wait_for(lambda: (v := emp.vassal("flood.ini")) and v.get("log_not_echoed", 0) > 1000, 20, what="lines held back")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert answers(port), "the bystander starved"
        assert emp.ctl("status", "calm.ini").returncode == 0
        time.sleep(0.2)
    doc = emp.status()
    flood_status = next(v for v in doc["vassals"] if v["name"] == "flood.ini")
    assert doc["emperor"]["log_not_echoed"] >= flood_status["log_not_echoed"] > 1000
    # Echo stays at its rate (a burst, then 32 KiB/s); the old code echoed ~80 MB/s.
    assert emp.log.stat().st_size < 2 << 20, f"{emp.log.stat().st_size >> 10} KiB of emperor log"
    wait_for(lambda: re.search(r"\[emperor\] \[flood\.ini\] \d+ line\(s\) not echoed \(rate limit", emp.log_text()), 5,
             what="the not-echoed note")
    # Everything still goes to the ring buffer.
    assert "flood xxxx" in emp.ctl("logs", "flood.ini", "-n", "2").stdout


# --- 19: forged log lines ----------------------------------------------------------

FORGE = '''
import sys
sys.stdout.write("ok\\r2024-01-01 00:00:00 [emperor] forged by a line\\x1b[2K\\n")
sys.stdout.flush()
import time
time.sleep(30)
'''


def test_names_and_lines_cannot_forge_emperor_lines(start_emperor, hostile_base, tenant):
    emp = tyrant_emperor(start_emperor, hostile_base)
    forge = script(hostile_base, "forge.py", FORGE)
    tenant.write(emp.dir / "evil\n2024-01-01 00:00:00 [emperor] forged by a name.ini", "[uwsgi]\nbogus-key = 1\n")
    raw = os.fsencode(str(emp.dir)) + b"/bad\xff.ini"
    with open(raw, "w") as handle:
        handle.write("[uwsgi]\nbogus-key = 1\n")
    os.chown(raw, tenant.uid, tenant.gid)
    tenant.write(emp.dir / "liar.ini", f"[uwsgi]\nattach-daemon = {sys.executable} {forge}\n")
    wait_for(lambda: "forged by a line" in emp.ctl("logs", "liar.ini").stdout, 20, what="the liar's line")
    wait_for(lambda: "bad\\xff.ini" in emp.log_text() and "[emperor] [evil\\x0a2024" in emp.log_text(), 10,
             what="both names logged, escaped")
    wait_for(lambda: "ok\\x0d2024-01-01" in emp.log_text(), 10, what="the liar's line echoed, escaped")
    text = emp.log.read_bytes()
    assert b"\r" not in text and b"\x1b" not in text
    for line in text.decode("utf-8", "replace").split("\n"):
        assert not line.startswith("2024-01-01 00:00:00 [emperor] forged"), line
        assert "[emperor] forged" not in line or line.startswith(("[liar.ini] ", "    ")) or "\\x0a" in line, line


def test_name_problem_contract():
    from emperor.names import name_problem

    assert name_problem("web.ini") is None and name_problem("café.ini") is None
    for bad in ("a\nb.ini", "a\rb.ini", "a\x1b[2Kb.ini", "tab\there.ini", "bad\udcff.ini", "x" * 250 + ".ini",
                "a\u2028b.ini", "a\u202eb.ini"):
        problem = name_problem(bad)
        assert problem and "rename" in problem
        assert "\n" not in problem and "\r" not in problem and "\x1b" not in problem
        problem.encode("utf-8")  # representable: loggable as is


# --- 20: no existence oracle, every verb gated ---------------------------------------------

def test_other_tenants_vassal_and_unknown_name_answer_alike(start_emperor, hostile_base, make_tenant):
    alice, bob = make_tenant(), make_tenant()
    emp = tyrant_emperor(start_emperor, hostile_base)
    alice.write(emp.dir / "alice.ini", "[uwsgi]\nbogus-key = 1\n")
    bob.write(emp.dir / "bob.ini", "[uwsgi]\nbogus-key = 1\n")
    wait_for(lambda: {v["name"] for v in emp.status()["vassals"]} == {"alice.ini", "bob.ini"}, 10, what="both vassals")
    assert as_tenant_ctl(alice, emp, "status", "alice.ini").returncode == 0
    for verb in (["status", "{}"], ["reload", "{}"], ["stop", "{}"], ["start", "{}"], ["restart", "{}"],
                 ["reset", "{}"], ["logs", "{}"], ["logs", "{}", "-f"], ["--json", "status", "{}"],
                 ["--json", "logs", "{}"], ["status", "alice.ini", "{}"]):
        seen = []
        for name in ("bob.ini", "nobody.ini"):
            result = as_tenant_ctl(alice, emp, *(arg.format(name) for arg in verb))
            seen.append((result.returncode, result.stdout.replace(name, "NAME"), result.stderr.replace(name, "NAME")))
        assert seen[0] == seen[1], (verb, seen)
        assert seen[0][0] == 1 and "not permitted" in seen[0][2], (verb, seen)
    # log-status writes every vassal into the operator's log: root only.
    refused = raw_request(alice, emp, {"command": "log-status"})
    assert refused["ok"] is False and refused["code"] == 1 and "not permitted" in refused["error"]
    for verb in ("stats", "router", "shutdown"):
        reply = raw_request(alice, emp, {"command": verb})
        assert reply["ok"] is False and reply["code"] == 1 and "not permitted" in reply["error"], reply
    # A tenant's status counts its own vassals only.
    mine = json.loads(as_tenant_ctl(alice, emp, "--json", "status").stdout)
    assert [v["name"] for v in mine["vassals"]] == ["alice.ini"] and mine["emperor"]["vassal_count"] == 1
    time.sleep(0.3)
    assert "vassal(s):" not in emp.log_text()
    assert emp.proc.poll() is None
    # Root still tells them apart.
    assert emp.ctl("status", "bob.ini", check=False).returncode == 0
    unknown = emp.ctl("status", "nobody.ini", check=False)
    assert unknown.returncode == 1 and "no vassal named" in unknown.stderr



# --- second review: floods through the vassal's own channels, bombs in files ----------------


PIPE_FLOOD = '''
import os, threading, time

def go():
    def flood():
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                os.write(3, b"\\x1a" * 65536)   # heartbeat bytes on the emperor pipe
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return
    threading.Thread(target=flood, daemon=True).start()
'''

STATUS_FLOOD = '''
import json, os, socket, threading, time
report = json.dumps({"workers": [{"index": i, "pid": i, "rss_bytes": i} for i in range(600)]}).encode()

def flood():
    sock = socket.socket(fileno=os.dup(4))
    end = time.monotonic() + 4
    while time.monotonic() < end:
        try:
            sock.send(report)
        except OSError:
            time.sleep(0.001)

threading.Thread(target=flood, daemon=True).start()

def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
'''


def _emperor_cost(emp, seconds: float) -> tuple[float, int]:
    """(CPU seconds used, RSS growth in bytes) of the emperor over ``seconds``."""
    proc = psutil.Process(emp.proc.pid)
    cpu0, rss0 = sum(proc.cpu_times()[:2]), proc.memory_info().rss
    time.sleep(seconds)
    return sum(proc.cpu_times()[:2]) - cpu0, proc.memory_info().rss - rss0


@pytest.mark.parametrize("channel", ["pipe", "status"])
def test_floods_on_the_vassals_own_channels_are_cheap(start_emperor, hostile_base, tenant, channel):
    """Heartbeat bytes flooding fd 3 (from a call hook in the top process)
    took the emperor to 3 GB and 100% CPU; reports flooding fd 4 (from the
    app) kept it at 90%."""
    from tests.helpers import TIME_SCALE, unix_http_get, wait_for

    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    app = hostile_base / "flood_app.py"
    if channel == "pipe":
        hook = tenant.write(tenant.home / "pipeflood.py", PIPE_FLOOD)
        app.write_text(STATUS_FLOOD.replace("threading.Thread(target=flood, daemon=True).start()", ""))
        extra = f"hook-as-root = call:runpy.run_path {hook}\n"
        # runpy.run_path only defines go(); call it from the same file.
        hook.write_text(PIPE_FLOOD + "\ngo()\n")
    else:
        app.write_text(STATUS_FLOOD)
        extra = ""
    app.chmod(0o644)
    tenant.write(emp.dir / "flood.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/f.sock\n{extra}")
    wait_for(lambda: unix_http_get(str(tenant.home / "f.sock")), 20, what="the flooding vassal")
    cpu, rss = _emperor_cost(emp, 3.0)
    # (emulated, as in the TCG guest, the same work costs several times the
    # CPU: there the bound is only that the emperor is not pinned at 100%)
    limit = 1.5 if TIME_SCALE == 1 else 2.7
    assert cpu < limit, f"the emperor spent {cpu:.1f}s of CPU in 3s"
    assert rss < 64 * 1024 * 1024, f"the emperor grew by {rss >> 20} MiB"
    assert json.loads(emp.ctl("--json", "status").stdout)["vassals"]


def test_reload_storm_on_a_stopped_vassal_pins_no_memory(start_emperor, hostile_base, tenant):
    """A tenant SIGSTOPs its top process and touches its file in a loop: each
    reload handed over a 2 MB memfd nobody read (278 MB of shmem)."""
    import signal as _signal

    from tests.helpers import HELLO, unix_http_get

    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    app = hostile_base / "hello.py"
    app.write_text(HELLO.read_text())
    app.chmod(0o644)
    big = "B" * 60000
    f = tenant.write(emp.dir / "storm.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/s.sock\nbig = {big}\n"
                     + "".join(f"env = A{i}=%(big)\n" for i in range(30)))
    wait_for(lambda: unix_http_get(str(tenant.home / "s.sock")), 20, what="the vassal")
    top = emp.vassal("storm.ini")["pid"]
    # The memfds in flight are nobody's mapping: the system's shmem counts them.
    shmem0 = psutil.virtual_memory().shared
    os.kill(top, _signal.SIGSTOP)
    try:
        for _ in range(100):
            os.utime(f)
            time.sleep(0.01)
        time.sleep(1.5)
        grown = psutil.virtual_memory().shared - shmem0
        assert grown < 32 * 1024 * 1024, f"{grown >> 20} MiB of config handovers in flight"
    finally:
        os.kill(top, _signal.SIGCONT)


def test_nesting_bombs_cost_only_their_file(start_emperor, hostile_base, tenant):
    """Two nesting bombs in a row made the monitor's fd "keep failing" and be
    dropped (the emperor went blind), and with a bomb in the dir the emperor
    could not start again."""
    from tests.helpers import HELLO, unix_http_get

    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    chain = "[uwsgi]\n" + "".join(f"a{i} = %(a{i + 1})\n" for i in range(400)) + "a400 = x\nenv = X=%(a0)\n"
    for name in ("bomb1.ini", "bomb2.ini"):
        tenant.write(emp.dir / name, chain)
    tenant.write(emp.dir / "deep.toml", "[vassal]\nenv = " + "[" * 3000 + "]" * 3000 + "\n")
    for name in ("bomb1.ini", "bomb2.ini", "deep.toml"):
        assert "nested" in emp.wait_state(name, "invalid")["error"]
    app = hostile_base / "hello.py"
    app.write_text(HELLO.read_text())
    app.chmod(0o644)
    tenant.write(emp.dir / "after.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/after.sock\n")
    from tests.helpers import wait_for

    wait_for(lambda: unix_http_get(str(tenant.home / "after.sock")), 20, what="a vassal dropped after the bombs")
    # And an emperor starting on that dir starts.
    emp.stop()
    again = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    again.wait_state("after.ini", "ready")
    assert again.vassal("bomb1.ini")["state"] == "invalid"


ESCAPES_APP = r'''
import sys
sys.stderr.write(("\x01" * 15000 + "\n") * 70)
sys.stderr.write("\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mFAKE: all vassals OK\x1b[0m\n")
sys.stderr.flush()

def application(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
'''


def test_logs_reach_the_operator_as_text_and_bounded(start_emperor, hostile_base, tenant):
    """`emperorctl logs` printed a vassal's escape sequences raw to the
    operator's terminal (window title, clear screen, clipboard), and a
    `logs` reply of control characters encoded to 6 MB that an unread
    connection pinned in the emperor."""
    from tests.helpers import unix_http_get, wait_for

    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    app = hostile_base / "escapes.py"
    app.write_text(ESCAPES_APP)
    app.chmod(0o644)
    tenant.write(emp.dir / "esc.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/esc.sock\n")
    wait_for(lambda: unix_http_get(str(tenant.home / "esc.sock")), 20, what="the vassal")
    shown = emp.ctl("logs", "esc.ini", "-n", "100000").stdout
    assert "\x1b" not in shown and "\x07" not in shown and "\x01" not in shown
    assert "FAKE: all vassals OK" in shown  # the text itself is still there, inert
    reply = emp.ctl("--json", "logs", "esc.ini", "-n", "100000").stdout
    assert len(reply) < 1_200_000 and json.loads(reply)["omitted"] > 0


def test_config_read_short_of_fds_is_retried(start_emperor, hostile_base, tenant):
    """Item 10: at the fd limit a vassal dropped in stayed `invalid` until its
    file changed; its read is tried again once fds are there."""
    from tests.helpers import HELLO, unix_http_get

    emp = start_emperor("--emperor-tyrant", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    app = hostile_base / "hello.py"
    app.write_text(HELLO.read_text())
    app.chmod(0o644)
    wait_for(lambda: " watching " in emp.log_text(), 10, what="the emperor fully started")  # not only its control socket
    pid = emp.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Below what it holds (a short-lived fd counted here must not leave room
    # for the read): open fds stay, new ones fail.
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use - 3, limits[1]))
    try:
        tenant.write(emp.dir / "late.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/late.sock\n")
        wait_for(lambda: "trying again in" in emp.log_text(), 10, what="the retry note")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    wait_for(lambda: unix_http_get(str(tenant.home / "late.sock")), 20, what="the vassal, once fds are there")
