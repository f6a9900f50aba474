"""End to end: a real emperor, real vassal processes, real HTTP."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import HELLO as HELLO_PATH
from tests.helpers import TIME_SCALE, answers, free_port, hello_ini, wait_for


def vassal_pids(emp, name: str) -> set[int]:
    """Every process of the vassal, from its cgroup (grandchildren included)."""
    tracking = emp.status()["emperor"]["tracking"]
    path = os.path.join(tracking, name, "cgroup.procs")
    with open(path) as handle:
        return {int(x) for x in handle.read().split()}


@pytest.mark.parametrize("zygote", ["true", "false"])
def test_twenty_vassals_answer(start_emperor, zygote):
    emp = start_emperor(f"--emperor-zygote={zygote}")
    ports = {}
    for i in range(20):
        port = free_port()
        ports[f"app{i}.ini"] = port
        (emp.dir / f"app{i}.ini").write_text(hello_ini(port))
    for name, port in ports.items():
        body = wait_for(lambda p=port: answers(p), 20, what=f"{name} answering")
        assert f"Hello, {name[:-4]}!".encode() in body
    doc = emp.status()
    assert len(doc["vassals"]) == 20
    for v in doc["vassals"]:
        for key in ("name", "config", "state", "pid", "restarts", "last_exit", "loyal", "started_at",
                    "ready_at", "backoff_until", "error", "rss_bytes", "cpu_percent"):
            assert key in v
    assert emp.stop() == 0


def test_touch_reloads_with_new_workers(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "t.ini").write_text(hello_ini(port))
    first = wait_for(lambda: answers(port), what="first answer")
    top_pid = emp.wait_state("t.ini", "ready")["pid"]
    os.utime(emp.dir / "t.ini")
    second = wait_for(lambda: (b := answers(port)) and b != first and b, what="answer from a new worker")
    assert second != first
    v = emp.wait_state("t.ini", "ready")
    assert v["pid"] == top_pid  # graceful: same top process


def test_rewrite_with_new_port(start_emperor):
    emp = start_emperor()
    old, new = free_port(), free_port()
    path = emp.dir / "p.ini"
    path.write_text(hello_ini(old))
    wait_for(lambda: answers(old), what="old port")
    path.write_text(hello_ini(new))
    wait_for(lambda: answers(new), what="new port")
    wait_for(lambda: answers(old) is None, what="old port closed")


def test_rename_in_out_and_over(start_emperor, tmp_path):
    emp = start_emperor()
    outside = tmp_path / "outside"
    outside.mkdir()
    port = free_port()
    (outside / "r.ini").write_text(hello_ini(port))
    os.rename(outside / "r.ini", emp.dir / "r.ini")  # rename in
    wait_for(lambda: answers(port), what="renamed-in vassal")
    port2 = free_port()
    (outside / "r.ini").write_text(hello_ini(port2))
    os.rename(outside / "r.ini", emp.dir / "r.ini")  # rename over
    wait_for(lambda: answers(port2), what="renamed-over config")
    wait_for(lambda: answers(port) is None, what="old port closed")
    os.rename(emp.dir / "r.ini", outside / "r.ini")  # rename away
    wait_for(lambda: emp.vassal("r.ini") is None, what="vassal gone")
    assert answers(port2) is None
    # A file with another extension is ignored.
    (emp.dir / "notes.txt").write_text("[uwsgi]\n")
    time.sleep(0.3)
    assert emp.vassal("notes.txt") is None


@pytest.mark.linux_only
@pytest.mark.parametrize("zygote", ["true", "false"])
def test_delete_leaves_nothing(start_emperor, tmp_path, zygote):
    emp = start_emperor(f"--emperor-zygote={zygote}")
    port = free_port()
    marker = tmp_path / "escapee.pid"
    # A daemon that double-forks and setsids away from its process group.
    daemon = f"python3 -c \"import os,time; os.fork() and os._exit(0); os.setsid(); os.fork() and os._exit(0); open('{marker}','w').write(str(os.getpid())); time.sleep(600)\""
    (emp.dir / "d.ini").write_text(hello_ini(port, processes=2, extra=f"attach-daemon = {daemon}\n"))
    wait_for(lambda: answers(port), what="vassal up")
    wait_for(marker.exists, what="escapee started")
    escapee = int(wait_for(lambda: marker.read_text().strip(), what="escapee pid"))
    pids = vassal_pids(emp, "d.ini")
    assert escapee in pids
    assert len(pids) >= 5  # top, master, 2 workers, escapee
    os.unlink(emp.dir / "d.ini")
    wait_for(lambda: emp.vassal("d.ini") is None, what="vassal removed")
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert answers(port) is None


def test_invalid_file_and_fix(start_emperor):
    emp = start_emperor()
    good = free_port()
    (emp.dir / "good.ini").write_text(hello_ini(good))
    wait_for(lambda: answers(good), what="good vassal")
    good_pid = emp.wait_state("good.ini", "ready")["pid"]
    bad = free_port()
    (emp.dir / "bad.ini").write_text(hello_ini(bad) + "no-such-option = 1\n")
    v = emp.wait_state("bad.ini", "invalid")
    assert "bad.ini:6" in v["error"] and "no-such-option" in v["error"]
    time.sleep(0.5)
    assert emp.vassal("bad.ini")["state"] == "invalid"  # no respawn loop
    assert emp.vassal("good.ini")["pid"] == good_pid
    (emp.dir / "bad.ini").write_text(hello_ini(bad))
    wait_for(lambda: answers(bad), what="fixed vassal")
    assert emp.vassal("bad.ini")["error"] is None


def test_broken_rewrite_keeps_running(start_emperor):
    emp = start_emperor()
    port = free_port()
    path = emp.dir / "k.ini"
    path.write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="vassal up")
    pid = emp.wait_state("k.ini", "ready")["pid"]
    path.write_text(hello_ini(port) + "processes = many\n")
    v = wait_for(lambda: (x := emp.vassal("k.ini")) and x["error"] and x, what="error set")
    assert "processes" in v["error"] and "integer" in v["error"]
    assert v["state"] == "ready" and v["pid"] == pid
    assert answers(port)


def test_backoff_grows_and_reset(start_emperor):
    # The delay after the n-th crash in a row is throttle * 2**(n-1) (the
    # fixture's throttle is 200 ms). Polls can miss a short backoff on a
    # slow machine, so each delay seen is checked against the crash count
    # it belongs to, not against the delay polled before it.
    def delay(x):
        return x["backoff_until"] - x["last_exit"]["at"]

    def expected(crashes):
        return pytest.approx(0.2 * 2 ** (crashes - 1), abs=0.15)

    emp = start_emperor()
    (emp.dir / "crash.ini").write_text(f"[uwsgi]\nwsgi-file = {emp.dir}/missing.py\nhttp-socket = 127.0.0.1:{free_port()}\n")
    v = emp.wait_state("crash.ini", "backoff")
    assert v["last_exit"]["reason"] == "app-load"
    seen = [(v["restarts"], delay(v))]
    for _ in range(3):
        v = wait_for(lambda r=v["restarts"]: (x := emp.vassal("crash.ini")) and x["state"] == "backoff" and x["restarts"] > r and x, 15, what="next backoff")
        seen.append((v["restarts"], delay(v)))
    assert [d for _, d in seen] == [expected(n) for n, _ in seen], seen
    before = v["restarts"]
    emp.ctl("reset", "crash.ini")
    wait_for(lambda: emp.vassal("crash.ini")["restarts"] > before, 3, what="reset retried now")
    # (its crash takes a moment on a slow machine: then it is in backoff again)
    after = wait_for(lambda: (x := emp.vassal("crash.ini")) and x["state"] == "backoff" and x["restarts"] > before and x,
                     15, what="back in backoff")
    assert delay(after) == expected(after["restarts"] - before), (seen, after)


def test_killed_master_respawns(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "m.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="vassal up")
    top = emp.wait_state("m.ini", "ready")["pid"]
    os.kill(top, signal.SIGKILL)
    wait_for(lambda: (v := emp.vassal("m.ini")) and v["pid"] not in (None, top) and v["state"] == "ready", 15, what="respawned")
    v = emp.vassal("m.ini")
    assert v["restarts"] == 1 and v["last_exit"]["reason"] == "signal" and v["last_exit"]["signal"] == 9
    wait_for(lambda: answers(port), what="answers again")


def test_app_master_killed_is_replaced_inside_vassal(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "am.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="vassal up")
    top = emp.wait_state("am.ini", "ready")["pid"]
    master = psutil.Process(top).children()[0]
    master.kill()
    wait_for(lambda: answers(port), what="answers after master kill")
    assert emp.vassal("am.ini")["pid"] == top


@pytest.mark.linux_only
def test_sigterm_stops_everything(start_emperor):
    emp = start_emperor()
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        (emp.dir / f"s{i}.ini").write_text(hello_ini(port, processes=2))
    for port in ports:
        wait_for(lambda p=port: answers(p), what="vassal up")
    tracking = emp.status()["emperor"]["tracking"]
    pids = set()
    for i in range(3):
        pids |= vassal_pids(emp, f"s{i}.ini")
    emp.proc.send_signal(signal.SIGTERM)
    assert emp.proc.wait(20) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(tracking)
    assert not emp.control.exists()


def test_second_emperor_refused(start_emperor, tmp_path):
    emp = start_emperor()
    other = tmp_path / "other"
    other.mkdir()
    result = subprocess.run([sys.executable, "-m", "emperor", "--control", str(emp.control), str(other)],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert "another emperor" in result.stderr
    assert emp.control.exists()
    assert emp.ctl("status").returncode == 0


def test_stop_start_restart(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "h.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="up")
    emp.ctl("stop", "h.ini")
    emp.wait_state("h.ini", "stopped")
    assert answers(port) is None
    time.sleep(0.5)
    assert emp.vassal("h.ini")["state"] == "stopped"
    emp.ctl("start", "h.ini")
    wait_for(lambda: answers(port), what="started")
    pid = emp.wait_state("h.ini", "ready")["pid"]
    emp.ctl("restart", "h.ini")
    wait_for(lambda: (v := emp.vassal("h.ini"))["pid"] not in (None, pid) and v["state"] == "ready", what="restarted")


def test_ctl_exit_codes(start_emperor, tmp_path):
    emp = start_emperor()
    assert emp.ctl("stop", "nope.ini", check=False).returncode == 1
    assert emp.ctl("bogus", check=False).returncode == 2
    missing = subprocess.run([sys.executable, "-m", "emperor.ctl", "--control", str(tmp_path / "none.sock"), "status"],
                             capture_output=True, text=True)
    assert missing.returncode == 3
    for verb in ("status", "stats", "router", "help"):
        out = emp.ctl("--json", verb)
        json.loads(out.stdout)


def test_logs_and_follow(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "l.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="up")
    out = emp.ctl("logs", "l.ini", "-n", "5").stdout
    assert "ready" in out
    follower = subprocess.Popen([sys.executable, "-m", "emperor.ctl", "--control", str(emp.control), "logs", "l.ini", "-n", "0", "-f"],
                                stdout=subprocess.PIPE, text=True)
    try:
        # Touched until the follower, subscribed whenever it gets there on a
        # slow machine, shows a reload (each read bounded).
        line = ""
        deadline = time.monotonic() + 30 * TIME_SCALE
        while "reload" not in line and time.monotonic() < deadline:
            os.utime(emp.dir / "l.ini")
            if select.select([follower.stdout], [], [], 1.0)[0]:
                line = follower.stdout.readline()
        assert "reload" in line
    finally:
        follower.kill()
        follower.wait()


def test_stats_server(start_emperor, tmp_path):
    stats = tmp_path / "stats.sock"
    emp = start_emperor("--emperor-stats", str(stats))
    port = free_port()
    (emp.dir / "st.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="up")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(stats))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    doc = json.loads(data)
    assert doc["vassals"][0]["id"] == "st.ini"
    assert "emperor" in doc and "blacklist" in doc


def test_sighup_reloads_all(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "hup.ini").write_text(hello_ini(port))
    first = wait_for(lambda: answers(port), what="up")
    emp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: (b := answers(port)) and b != first, what="reloaded worker")


def test_heartbeat_missing_curses(start_emperor, tmp_path):
    # A wrapped vassal that sends ready and one heartbeat, then goes silent.
    wrapper = tmp_path / "beat-wrapper"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, socket, time\n"
        "s = socket.socket(fileno=int(os.environ['UWSGI_EMPEROR_FD']))\n"
        "s.send(bytes([5, 26]))\n"
        "time.sleep(600)\n"
    )
    wrapper.chmod(0o755)
    emp = start_emperor("--emperor-required-heartbeat", "1", "--emperor-wrapper", str(wrapper))
    (emp.dir / "hb.ini").write_text("[uwsgi]\nmaster = true\nsome-uwsgi-only-option = 1\n")
    v = wait_for(lambda: (x := emp.vassal("hb.ini")) and x["last_exit"] and x, 20, what="exit")
    assert v["last_exit"]["reason"] == "curse"
    assert v["state"] in ("backoff", "starting", "ready")


@pytest.mark.parametrize("ext", [".ini", ".toml"])
def test_toml_and_ini_vassals(start_emperor, ext):
    emp = start_emperor()
    port = free_port()
    if ext == ".toml":
        from tests.helpers import HELLO

        (emp.dir / "x.toml").write_text(f'[vassal]\nwsgi-file = "{HELLO}"\nhttp-socket = "127.0.0.1:{port}"\nenv = ["HELLO_NAME=%n"]\n')
    else:
        (emp.dir / "x.ini").write_text(hello_ini(port))
    body = wait_for(lambda: answers(port), what="answer")
    assert b"Hello, x!" in body


def test_zygote_killed_is_replaced(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "z1.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="first vassal")
    zygotes = [c for c in psutil.Process(emp.proc.pid).children() if "emperor.zygote" in " ".join(c.cmdline()) or c.name() == "emperor zygote"]
    assert len(zygotes) == 1
    zygotes[0].kill()
    wait_for(lambda: "starting a new one" in emp.log_text(), what="zygote restart logged")
    time.sleep(1.2)
    port2 = free_port()
    (emp.dir / "z2.ini").write_text(hello_ini(port2))
    wait_for(lambda: answers(port2), what="vassal spawned by the new zygote")
    assert answers(port)  # the running vassal was not disturbed


def test_vassal_dir_replaced(start_emperor, tmp_path):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "one.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="first vassal")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    port2 = free_port()
    (fresh / "two.ini").write_text(hello_ini(port2))
    old = tmp_path / "old"
    os.rename(emp.dir, old)
    os.rename(fresh, emp.dir)  # the watched dir is replaced as a whole
    wait_for(lambda: answers(port2), what="vassal of the new dir")
    wait_for(lambda: emp.vassal("one.ini") is None, what="vassal of the old dir gone")
    port3 = free_port()
    (emp.dir / "three.ini").write_text(hello_ini(port3))  # and it is watched
    wait_for(lambda: answers(port3), what="new file in the new dir")


def test_scan_fallback(start_emperor):
    emp = start_emperor("--scan", "--emperor-freq", "1")
    assert emp.status()["emperor"]["monitor"].startswith("scan")
    port = free_port()
    path = emp.dir / "sc.ini"
    path.write_text(hello_ini(port))
    first = wait_for(lambda: answers(port), 10, what="scanned vassal")
    os.utime(path, (time.time() + 5, time.time() + 5))
    wait_for(lambda: (b := answers(port)) and b != first, 10, what="reload on touch")
    path.unlink()
    wait_for(lambda: emp.vassal("sc.ini") is None, 10, what="stopped on delete")


def test_control_socket_mode_and_pidfile(start_emperor, tmp_path):
    pidfile = tmp_path / "emperor.pid"
    emp = start_emperor("--emperor-pidfile", str(pidfile))
    assert (os.stat(emp.control).st_mode & 0o777) == 0o600
    assert int(pidfile.read_text()) == emp.proc.pid
    other = tmp_path / "other"
    other.mkdir()
    result = subprocess.run([sys.executable, "-m", "emperor", "--control", str(tmp_path / "c2.sock"),
                             "--emperor-pidfile", str(pidfile), str(other)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1 and "pidfile" in result.stderr
    assert emp.stop() == 0
    assert not pidfile.exists()


def test_unprivileged_peer_refused(start_emperor, request):
    from tests.helpers import ROOT, world_reachable

    if not (world_reachable(ROOT) and world_reachable(sys.executable)):
        pytest.skip("the checkout or the interpreter is not reachable by an unprivileged user")
    public = Path(tempfile.mkdtemp(prefix="pyemperor-ctl-"))
    request.addfinalizer(lambda: shutil.rmtree(public, ignore_errors=True))
    public.chmod(0o755)
    emp = start_emperor("--emperor-control-mode", "666", control_dir=public)
    port = free_port()
    (emp.dir / "priv.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="up")
    cmd = [sys.executable, "-m", "emperor.ctl", "--control", str(emp.control)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*cmd, "stop", "priv.ini"], capture_output=True, text=True, user=65534, group=65534, env=env, cwd="/")
    assert result.returncode == 1, result.stderr
    assert "not permitted" in result.stderr
    result = subprocess.run([*cmd, "--json", "status"], capture_output=True, text=True, user=65534, group=65534, env=env, cwd="/")
    assert result.returncode == 1 and "not permitted" in result.stderr
    assert emp.vassal("priv.ini")["state"] == "ready"


@pytest.mark.linux_only
def test_vassals_exit_when_emperor_dies(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "orphan.ini").write_text(hello_ini(port, processes=2))
    wait_for(lambda: answers(port), what="up")
    tracking = emp.status()["emperor"]["tracking"]
    pids = vassal_pids(emp, "orphan.ini")
    emp.proc.kill()
    emp.proc.wait()
    try:
        # End of file on the emperor pipe: the vassal shuts itself down.
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids), 15,
                 what="vassal gone after its emperor")
    finally:
        # An emperor killed outright cannot clean up: every cgroup it made
        # (the vassal's, the zygote's spare) goes once its processes are gone.
        subs = [e.path for e in os.scandir(tracking) if e.is_dir()] if os.path.isdir(tracking) else []
        # (v2: and the leaf it had moved itself into)
        for sub in [*subs, tracking, tracking + ".emperor"]:
            wait_for(lambda s=sub: not os.path.exists(s) or (os.rmdir(s) or True), 10, what=f"rmdir {sub}")
        stale = emp.control
        for path in (stale, stale.with_name(stale.name + ".lock")):
            if path.exists():
                path.unlink()


def test_heartbeat_from_our_vassal(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "beat.ini").write_text(hello_ini(port, extra="heartbeat = 1\n"))
    wait_for(lambda: answers(port), what="up")
    v = wait_for(lambda: (x := emp.vassal("beat.ini")) and x["last_heartbeat_age"] is not None and x, 5, what="heartbeat seen")
    assert v["last_heartbeat_age"] < 2


def test_sigusr1_logs_status_and_top(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "u1.ini").write_text(hello_ini(port))
    wait_for(lambda: answers(port), what="up")
    emp.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "1 vassal(s):" in emp.log_text() and "u1.ini" in emp.log_text(), what="status table logged")
    out = emp.ctl("top", "--iterations", "1").stdout
    assert "u1.ini" in out


@pytest.mark.linux_only
def test_examples_run(start_emperor):
    """The README's demo: every example vassal (one per feature) works."""
    import shutil

    from tests.helpers import ROOT

    ports = range(8001, 8010)
    for port in ports:
        if answers(port) is not None:
            pytest.skip(f"port {port} is busy")
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx is not installed (the jailed nginx example)")
    emp = start_emperor(vassal_dir=ROOT / "examples" / "vassals")
    expected = {8001: b"Hello, world!", 8002: b"Hello, shop!", 8003: b"Hello, blog from vassals!",
                8004: b"Hello, namespaces! (pid 2)",  # the top is PID 1 of its pid namespace, the app its child
                8005: b"Hello, hooks!", 8006: b"Hello, cheaper!", 8007: b"Hello from a jailed nginx",
                8008: b"Hello, logging!", 8009: b"Hello, pivot-root!"}
    for port, text in expected.items():
        body = wait_for(lambda p=port: answers(p), 20, what=f"example on {port}")
        assert body.startswith(text), (port, body)
    wait_for(lambda: (v := emp.vassal("ticker.ini")) and v["state"] == "ready", what="daemon-only vassal ready")
    wait_for(lambda: "tick from ticker" in emp.ctl("logs", "ticker.ini").stdout, what="daemon output in logs")
    hooks = wait_for(lambda: (out := emp.ctl("logs", "hooks.ini").stdout) and "post-app:" in out and out, what="hook lines")
    order = [hooks.index(f"{phase}:") for phase in ("pre-jail", "post-jail", "as-root", "as-user", "pre-app", "post-app")]
    assert order == sorted(order)
    line = next(x for x in emp.ctl("logs", "logging.ini").stdout.splitlines() if x.startswith("{"))
    record = json.loads(line)
    assert record["msg"].startswith("[logging] ") and isinstance(record["unix"], int)
    doc = json.loads(emp.ctl("--json", "stats").stdout)
    cheaper = next(v for v in doc["vassals"] if v["name"] == "cheaper.ini")
    assert cheaper["workers"] == 1  # cheaper = 1, nothing to grow for


@pytest.mark.linux_only
def test_other_platform_key_is_refused_clearly(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "future.ini").write_text(hello_ini(port) + "jail = /usr/jails/x\n")
    v = emp.wait_state("future.ini", "invalid")
    assert "future.ini:6: key 'jail': jail is FreeBSD only" in v["error"]


def test_emperor_options_from_ini_and_tcp_stats(start_emperor, tmp_path):
    stats_port = free_port()
    ini = tmp_path / "emperor.ini"
    ini.write_text(f"[emperor]\nemperor-stats = 127.0.0.1:{stats_port}\nemperor-max-throttle = 4000\n")
    emp = start_emperor("--ini", str(ini))
    assert emp.status()["emperor"]["max_throttle_ms"] == 4000
    with socket.create_connection(("127.0.0.1", stats_port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert json.loads(data)["pid"] == emp.proc.pid


def test_bad_emperor_option_names_it(tmp_path):
    ini = tmp_path / "emperor.ini"
    ini.write_text("[emperor]\nemperor-throttle = fast\nemperor-bogus = 1\n")
    result = subprocess.run([sys.executable, "-m", "emperor", "--ini", str(ini), "--control", str(tmp_path / "c.sock"), str(tmp_path)],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert f"{ini}:2: key 'emperor-throttle'" in result.stderr
    assert f"{ini}:3: key 'emperor-bogus': unknown option" in result.stderr


def test_vassal_dying_at_once_is_seen(start_emperor):
    """A vassal that exits before the zygote reports its pid still counts."""
    emp = start_emperor()
    (emp.dir / "quick.ini").write_text(f"[uwsgi]\nwsgi-file = {HELLO_PATH}\nhttp-socket = /nonexistent/dir/quick.sock\n")
    v = wait_for(lambda: (x := emp.vassal("quick.ini")) and x["restarts"] >= 2 and x, 15, what="repeated exits seen")
    assert v["last_exit"]["code"] == 1
    assert "cannot bind http socket /nonexistent/dir/quick.sock" in emp.log_text()
    assert emp.stop() == 0


def test_status_shows_workers_and_cheaper(start_emperor):
    emp = start_emperor()
    port = free_port()
    (emp.dir / "ch.ini").write_text(hello_ini(port, extra="cheaper = 1\ncheaper-initial = 2\n", processes=3))
    wait_for(lambda: answers(port), what="up")
    v = wait_for(lambda: (x := emp.vassal("ch.ini")) and x["cheaper"] and x["cheaper"]["last"] and x, 10,
                 what="cheaper state in status")
    # Reported by the app master over its status socket (not read off process titles).
    assert v["workers"] >= 1 and len(v["worker_rss_bytes"]) == v["workers"]
    assert all(rss > 1 << 20 for rss in v["worker_rss_bytes"])
    assert {w["index"] for w in v["worker_detail"]} <= {1, 2, 3}
    assert v["cheaper"]["minimum"] == 1 and v["cheaper"]["maximum"] == 3
    assert v["cheaper"]["last"]["action"] in ("spawn", "remove", "hold") and v["cheaper"]["last"]["reason"]
    stats = json.loads(emp.ctl("--json", "stats").stdout)
    assert stats["vassals"][0]["cheaper"]["minimum"] == 1


def test_full_stderr_pipe_never_blocks_the_emperor(tmp_path):
    """Nobody reads the emperor's stderr (a stuck journald): it keeps serving."""
    from tests.helpers import TEST_TAG, EmperorProc

    vassals = tmp_path / "vassals"
    vassals.mkdir()
    control = tmp_path / "c.sock"
    proc = subprocess.Popen([sys.executable, "-m", "emperor", "--control", str(control), str(vassals)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTEST_TAG": TEST_TAG})
    emp = EmperorProc(vassals, control, tmp_path / "none.log", proc)
    try:
        wait_for(control.exists, 10, what="control socket")
        (vassals / "chatty.ini").write_text("[uwsgi]\nattach-daemon = sh -c 'while true; do echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; done'\n")
        wait_for(lambda: emp.status()["emperor"]["dropped_log_lines"] > 0, 20, what="log lines dropped, not blocking")
        port = free_port()
        (vassals / "web.ini").write_text(hello_ini(port))
        wait_for(lambda: answers(port), 15, what="a new vassal still spawned")
        assert "aaaa" in emp.ctl("logs", "chatty.ini", "-n", "2").stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_status_channel_survives_junk_from_the_app(start_emperor, tmp_path):
    """The app can write to the status socket too: junk is ignored, a
    report that is not an object is ignored, the emperor keeps serving."""
    app = tmp_path / "junk.py"
    app.write_text(
        "import os, socket\n"
        "s = socket.socket(fileno=os.dup(int(os.environ['PYEMPEROR_STATUS_FD'])))\n"
        "for junk in (b'not json', b'[1, 2]', b'{\"workers\": 5}', b'{\"workers\": [{\"rss_bytes\": \"x\"}], \"cheaper\": 3}', b'\\xff' * 1000):\n"
        "    s.send(junk)\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n")
    app.chmod(0o644)
    tmp_path.chmod(0o755)
    emp = start_emperor()
    port = free_port()
    (emp.dir / "junk.ini").write_text(f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n")
    wait_for(lambda: answers(port), what="up")
    v = wait_for(lambda: (x := emp.vassal("junk.ini")) and x["workers"] == 2 and x["worker_detail"] and x, 10,
                 what="the master's report")
    assert all(w["pid"] > 0 and w["rss_bytes"] > 0 for w in v["worker_detail"]) and v["cheaper"] is None
    assert emp.proc.poll() is None
