"""Real jails: namespaces, pivot-root, hook phases, privileges (as root)."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, free_port, hello_ini, wait_for

pytestmark = [pytest.mark.linux_only, pytest.mark.skipif(os.geteuid() != 0, reason="jails need root")]

INFO_APP = '''
import ctypes, json, os, socket

def proc1():
    try:
        return open("/proc/1/cmdline").read().split("\\0")[0].strip()
    except OSError:
        return None


def application(environ, start_response):
    libc = ctypes.CDLL(None, use_errno=True)
    key = int(os.environ.get("SEM_KEY", "0"))
    sem = libc.semget(key, 0, 0) if key else -2
    info = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "host": socket.gethostname(),
        "ifaces": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else None,
        "proc1": proc1(),
        "sem": sem,
        "visible": {p: os.path.exists(p) for p in os.environ.get("CHECK_PATHS", "").split(":") if p},
    }
    body = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


def unix_get(path: str, timeout: float = 5.0) -> dict | None:
    from tests.helpers import unix_http_get

    body = unix_http_get(path, timeout)
    return None if body is None else json.loads(body)


@pytest.fixture
def shared_dir(tmp_path_factory, request):
    """A world-traversable dir (tmp_path is 0700) for apps and sockets."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pyemperor-jail-"))
    path.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    (path / "info.py").write_text(INFO_APP)
    (path / "info.py").chmod(0o644)
    return path


def jail_ini(shared: Path, name: str, extra: str = "") -> str:
    return (
        "[uwsgi]\n"
        f"wsgi-file = {shared}/info.py\n"
        f"http-socket = {shared}/{name}.sock\n"
        "chmod-socket = 666\n"
        f"{extra}"
    )


def semget_host(key: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    semid = libc.semget(key, 1, 0o600 | 0o1000)  # IPC_CREAT
    assert semid >= 0
    return semid


def semrm(semid: int) -> None:
    ctypes.CDLL(None).semctl(semid, 0, 0)  # IPC_RMID


def test_emperor_use_clone_namespaces(start_emperor, shared_dir):
    key = 0x5EED0000 + os.getpid() % 0xFFFF
    semid = semget_host(key)
    try:
        emp = start_emperor("--emperor-use-clone", "ipc,uts,fs,pid,net")
        (emp.dir / "ns.ini").write_text(jail_ini(shared_dir, "ns", f"hostname = jailed-ns\nenv = SEM_KEY={key}\n"))
        info = wait_for(lambda: unix_get(f"{shared_dir}/ns.sock"), 20, what="namespaced vassal answering")
        assert info["pid"] < 50  # a pid of its own namespace
        assert info["proc1"].startswith("vassal ns.ini")  # a fresh /proc whose PID 1 is the top process
        assert info["host"] == "jailed-ns"
        assert info["ifaces"] == ["lo"]
        assert info["sem"] == -1  # the host's semaphore is not visible
        # The host's view is unchanged.
        assert socket.gethostname() != "jailed-ns"
        assert psutil.Process(emp.vassal("ns.ini")["pid"]).name() != ""
        assert os.path.exists("/proc/1") and psutil.Process(1).pid == 1
        with open("/proc/self/mountinfo") as handle:
            assert str(shared_dir) not in handle.read()
    finally:
        semrm(semid)


def test_unshare_key_with_pid_proxy(start_emperor, shared_dir):
    emp = start_emperor()
    (emp.dir / "un.ini").write_text(jail_ini(shared_dir, "un", "unshare = pid,fs,uts,ipc\nhostname = jailed-un\n"))
    info = wait_for(lambda: unix_get(f"{shared_dir}/un.sock"), 20, what="unshared vassal")
    assert info["proc1"].startswith("vassal un.ini")
    assert info["host"] == "jailed-un" and info["pid"] < 50
    assert info["ifaces"] == sorted(os.listdir("/sys/class/net"))  # no net namespace: the host's interfaces
    top = emp.vassal("un.ini")["pid"]
    os.unlink(emp.dir / "un.ini")
    wait_for(lambda: emp.vassal("un.ini") is None, 15, what="stopped")
    assert not psutil.pid_exists(top) or psutil.Process(top).status() == psutil.STATUS_ZOMBIE


def test_hook_phases_in_order_with_uid(start_emperor, shared_dir):
    log = shared_dir / "phases.log"
    log.write_text("")
    log.chmod(0o666)
    lines = "".join(f"exec-{phase} = echo {phase} $(id -u) >> {log}\n" for phase in
                    ("pre-jail", "post-jail", "in-jail", "as-root", "as-user", "pre-app", "post-app", "as-user-atexit"))
    emp = start_emperor("--emperor-use-clone", "fs,uts")
    (emp.dir / "ph.ini").write_text(jail_ini(shared_dir, "ph", lines + "uid = nobody\ngid = nogroup\nhook-as-root = print:hello from as-root\n"))
    info = wait_for(lambda: unix_get(f"{shared_dir}/ph.sock"), 20, what="vassal up")
    assert info["uid"] == 65534
    os.unlink(emp.dir / "ph.ini")
    wait_for(lambda: emp.vassal("ph.ini") is None, 15, what="stopped")
    got = log.read_text().split("\n")
    assert got[:8] == ["pre-jail 0", "post-jail 0", "in-jail 0", "as-root 0", "as-user 65534", "pre-app 65534",
                       "post-app 65534", "as-user-atexit 65534"]
    assert "hello from as-root" in emp.log_text()


def test_failing_hook_is_fatal_and_named(start_emperor, shared_dir):
    emp = start_emperor()
    (emp.dir / "bad.ini").write_text(jail_ini(shared_dir, "bad", "exec-pre-jail = exit 7\n"))
    # (read in backoff: a slow guest may already be spawning it again when asked)
    v = wait_for(lambda: (x := emp.vassal("bad.ini")) and x["last_exit"] and x["state"] == "backoff" and x, 30,
                 what="exit, then backoff")
    assert v["last_exit"]["reason"] == "hook"
    wait_for(lambda: "hook failed in phase pre-jail: exec-pre-jail = exit 7" in (log := emp.log_text())
             and "command exited with 7" in log, 10, what="the hook and its exit code named")


def test_hostname_without_uts_is_invalid(start_emperor, shared_dir):
    emp = start_emperor()
    (emp.dir / "h.ini").write_text(jail_ini(shared_dir, "h", "hostname = nope\nhook-post-jail = mount:tmpfs none /mnt\n"))
    v = emp.wait_state("h.ini", "invalid")
    assert "h.ini:5: key 'hostname': hostname needs the uts namespace" in v["error"]
    assert "h.ini:6: key 'hook-post-jail': action mount needs the fs namespace" in v["error"]


def test_pivot_root_hides_the_host(start_emperor, shared_dir, tmp_path):
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret")
    newroot = shared_dir / "root"
    binds = ["/usr", "/lib", "/etc", sys.prefix, str(ROOT), str(shared_dir)]
    if os.path.isdir("/lib64") and not os.path.islink("/lib64"):
        binds.append("/lib64")
    extra = [f"hook-in-jail = mkdir:{newroot}"]
    extra += [f"hook-in-jail = mount:tmpfs none {newroot}"]
    for source in binds:
        extra.append(f"exec-in-jail = mkdir -p {newroot}{source}")
        extra.append(f"mount-in-jail = none {source} {newroot}{source} bind,rec")
    for link in ("/bin", "/sbin", "/lib64"):
        if os.path.islink(link):
            extra.append(f"exec-in-jail = ln -s {os.readlink(link)} {newroot}{link}")
    extra.append(f"exec-in-jail = mkdir -p {newroot}/proc {newroot}/tmp")
    extra.append(f"mount-in-jail = proc proc {newroot}/proc")
    extra.append(f"pivot-root = {newroot} /.oldroot")
    extra.append(f"env = CHECK_PATHS={marker}:/.oldroot:{shared_dir}/info.py:/usr/bin")
    emp = start_emperor("--emperor-use-clone", "fs,pid,ipc,uts")
    (emp.dir / "pr.ini").write_text(jail_ini(shared_dir, "pr", "\n".join(extra) + "\n"))
    info = wait_for(lambda: unix_get(f"{shared_dir}/pr.sock"), 20, what="pivoted vassal")
    assert info["visible"] == {str(marker): False, "/.oldroot": False, f"{shared_dir}/info.py": True, "/usr/bin": True}
    with open("/proc/self/mountinfo") as handle:
        assert str(newroot) not in handle.read()  # nothing leaked to the host


def test_chroot(start_emperor, shared_dir):
    emp = start_emperor("--emperor-use-clone", "fs")
    root = shared_dir / "croot"
    lines = [f"hook-post-jail = mkdir:{root}", f"hook-post-jail = mount:tmpfs none {root}"]
    for source in ["/usr", "/lib", "/etc", sys.prefix, str(ROOT), str(shared_dir)] + (["/lib64"] if os.path.isdir("/lib64") and not os.path.islink("/lib64") else []):
        lines += [f"exec-post-jail = mkdir -p {root}{source}", f"mount-post-jail = none {source} {root}{source} bind,rec"]
    lines += [f"chroot = {root}", "env = CHECK_PATHS=/work:/usr"]
    (emp.dir / "ch.ini").write_text(jail_ini(shared_dir, "ch", "\n".join(lines) + "\n"))
    info = wait_for(lambda: unix_get(f"{shared_dir}/ch.sock"), 20, what="chrooted vassal")
    assert info["visible"]["/usr"] is True
    if not str(ROOT).startswith("/work"):
        assert info["visible"]["/work"] is False


def test_attach_daemon_drops_privileges(start_emperor, shared_dir):
    out = shared_dir / "daemon.out"
    out.write_text("")
    out.chmod(0o666)
    emp = start_emperor()
    (emp.dir / "dd.ini").write_text(
        f"[uwsgi]\nuid = nobody\ngid = nogroup\nattach-daemon = sh -c 'id -u > {out}; sleep 600'\n")
    wait_for(lambda: out.exists() and out.read_text().strip(), 15, what="daemon ran")
    assert out.read_text().strip() == "65534"


def test_vassal_cli_check_and_unknown_user(tmp_path):
    import subprocess

    f = tmp_path / "u.ini"
    f.write_text(hello_ini(free_port()) + "uid = no-such-user-xyz\n")
    result = subprocess.run([sys.executable, "-m", "vassal", str(f)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 4
    assert "unknown user 'no-such-user-xyz'" in result.stderr


LIMITS_APP = '''
import os, time

def application(environ, start_response):
    path = environ["PATH_INFO"]
    body = b"ok"
    if path == "/hog":
        hoard = [bytearray(1024 * 1024) for _ in range(200)]
        body = b"survived %d" % len(hoard)
    elif path == "/forkbomb":
        count = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(3)
                os._exit(0)
            count += 1
        body = b"%d" % count
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def test_limits_oom_and_forkbomb(start_emperor, shared_dir):
    from tests.helpers import answers, http_get

    (shared_dir / "limits.py").write_text(LIMITS_APP)
    emp = start_emperor()
    hog_port, bomb_port, neighbour = free_port(), free_port(), free_port()
    (emp.dir / "hog.ini").write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/limits.py\nhttp-socket = 127.0.0.1:{hog_port}\nmemory-limit = 64M\ncpu-limit = 0.5\n")
    (emp.dir / "bomb.ini").write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/limits.py\nhttp-socket = 127.0.0.1:{bomb_port}\npids-limit = 16\n")
    (emp.dir / "neighbour.ini").write_text(hello_ini(neighbour))
    for port in (hog_port, bomb_port, neighbour):
        wait_for(lambda p=port: answers(p), 20, what="vassals up")
    tracking = emp.status()["emperor"]["tracking"]
    with open(os.path.join(tracking, "bomb.ini", "pids.max")) as handle:
        assert handle.read().strip() == "16"
    # The fork bomb stays contained.
    status, body = http_get(bomb_port, "/forkbomb", timeout=20)
    assert status == 200 and int(body) < 16
    assert answers(neighbour)
    # The hog is OOM-killed as a whole, reported, and respawned with backoff.
    first_pid = emp.vassal("hog.ini")["pid"]
    try:
        http_get(hog_port, "/hog", timeout=20)
    except OSError:
        pass
    v = wait_for(lambda: (x := emp.vassal("hog.ini")) and x["last_exit"] and x, 15, what="OOM reported")
    assert v["last_exit"]["reason"] == "oom"
    v = wait_for(lambda: (x := emp.vassal("hog.ini"))["state"] == "ready" and x["pid"] != first_pid and x, 15, what="respawned")
    assert v["restarts"] >= 1 and v["last_exit"]["reason"] == "oom"
    assert answers(neighbour)
    assert answers(hog_port)


def test_tyrant_mode(start_emperor, shared_dir):
    tenant_dir = shared_dir / "tenant"
    tenant_dir.mkdir()
    os.chown(tenant_dir, 65534, 65534)
    # Tenants' files are read as the tenants: the dir must be reachable by them.
    emp = start_emperor("--emperor-tyrant", vassal_dir=shared_dir / "vassals")
    # A tenant file runs as its owner, whatever uid it asks for.
    f = emp.dir / "tenant.ini"
    f.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {tenant_dir}/t.sock\nuid = root\n")
    os.chown(f, 65534, 65534)
    info = wait_for(lambda: unix_get(f"{tenant_dir}/t.sock"), 20, what="tenant vassal")
    assert info["uid"] == 65534 and info["gid"] == 65534
    assert os.stat(f"{tenant_dir}/t.sock").st_uid == 65534
    # A root-owned file is refused, clearly.
    (emp.dir / "rooty.ini").write_text(jail_ini(shared_dir, "rooty"))
    v = emp.wait_state("rooty.ini", "invalid")
    assert "tyrant mode: refusing a file owned by root" in v["error"]
    # Privileged ports and chroot without a namespace are refused for tenants
    # (root phases run, but as the tenant: see tests/hostile).
    bad = emp.dir / "bad.ini"
    bad.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = 127.0.0.1:80\nchroot = /tmp\n")
    os.chown(bad, 65534, 65534)
    v = emp.wait_state("bad.ini", "invalid")
    assert "port 80 is privileged" in v["error"]
    assert "chroot needs a namespace in tyrant mode" in v["error"]
    # A tenant socket outside its own dirs is refused at bind time.
    elsewhere = emp.dir / "else.ini"
    elsewhere.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {shared_dir}/not-yours.sock\n")
    os.chown(elsewhere, 65534, 65534)
    wait_for(lambda: "is not owned by uid 65534, refusing to create" in emp.log_text(), 15, what="socket refused")
    assert not os.path.exists(f"{shared_dir}/not-yours.sock")


CAPS_APP = '''
import json

def application(environ, start_response):
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("Cap", "NoNewPrivs")))
    body = json.dumps({k: v.strip() for k, v in status.items()}).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.parametrize("user", ["", "uid = nobody\ngid = nogroup\n"])
def test_capabilities_dropped(start_emperor, shared_dir, user):
    from jails.linux import UNNEEDED_CAPS

    (shared_dir / "caps.py").write_text(CAPS_APP)
    emp = start_emperor()
    (emp.dir / "caps.ini").write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/caps.py\nhttp-socket = {shared_dir}/caps.sock\nchmod-socket = 666\n{user}")
    info = wait_for(lambda: unix_get(f"{shared_dir}/caps.sock"), 20, what="vassal")
    eff, bnd = int(info["CapEff"], 16), int(info["CapBnd"], 16)
    assert info["NoNewPrivs"] == "1"
    if user:
        assert eff == 0 and bnd == 0
    else:
        assert eff != 0  # still root, but without what no app needs
        for cap in UNNEEDED_CAPS.values():
            assert not eff & (1 << cap) and not bnd & (1 << cap)


def test_emperor_hooks_and_prejail_not_rerun(start_emperor, shared_dir):
    log = shared_dir / "ehooks.log"
    log.write_text("")
    log.chmod(0o666)
    emp = start_emperor(
        "--exec-as-root", f"echo emperor-as-root >> {log}",
        "--exec-as-emperor", f"echo as-emperor $UWSGI_VASSAL_CONFIG $UWSGI_VASSAL_PID $UWSGI_VASSAL_UID >> {log}",
        "--hook-as-vassal", f"write:{shared_dir}/as-vassal.txt ran",
    )
    f = emp.dir / "eh.ini"
    f.write_text(jail_ini(shared_dir, "eh", f"exec-pre-jail = echo pre-jail >> {log}\nexec-pre-app = echo pre-app >> {log}\n"))
    first = wait_for(lambda: unix_get(f"{shared_dir}/eh.sock"), 20, what="vassal")
    pid = emp.vassal("eh.ini")["pid"]
    wait_for(lambda: "as-emperor" in log.read_text(), 10, what="as-emperor hook")
    assert (shared_dir / "as-vassal.txt").read_text() == "ran"
    os.utime(f)
    wait_for(lambda: (i := unix_get(f"{shared_dir}/eh.sock")) and i["pid"] != first["pid"], 15, what="reloaded")
    wait_for(lambda: log.read_text().count("pre-app") == 2, 10, what="pre-app again")
    lines = log.read_text().splitlines()
    assert lines[0] == "emperor-as-root"
    assert f"as-emperor {f} {pid} 0" in lines
    assert lines.count("pre-jail") == 1  # not run again on a graceful reload


def test_user_namespace(start_emperor, shared_dir):
    public = shared_dir / "pub"
    public.mkdir()
    public.chmod(0o777)
    # Root in the namespace is uid 200000 outside: its config must be readable by it.
    emp = start_emperor("--emperor-use-clone", "user,ipc,uts,fs,pid,net", vassal_dir=shared_dir / "vassals")
    (emp.dir / "us.ini").write_text(
        f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {public}/us.sock\nchmod-socket = 666\n"
        "hostname = in-userns\nuid-map = 0 200000 65536\ngid-map = 0 200000 65536\n")
    info = wait_for(lambda: unix_get(f"{public}/us.sock"), 20, what="user-namespaced vassal")
    assert info["uid"] == 0 and info["host"] == "in-userns"  # root inside...
    top = emp.vassal("us.ini")["pid"]
    assert psutil.Process(top).uids().real == 200000  # ...an unprivileged uid outside
    assert os.stat(f"{public}/us.sock").st_uid == 200000


def test_unshare_user_key_and_tyrant_composition(start_emperor, shared_dir):
    tenant_dir = shared_dir / "tenant2"
    tenant_dir.mkdir()
    os.chown(tenant_dir, 65534, 65534)
    log = tenant_dir / "hook.log"
    emp = start_emperor("--emperor-tyrant", vassal_dir=shared_dir / "vassals")
    f = emp.dir / "tu.ini"
    # Root phases and mounts are fine for a tenant inside a user namespace mapped to it.
    f.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {tenant_dir}/tu.sock\n"
                 f"unshare = user,fs,uts\nhostname = tenant-ns\nexec-as-root = id -u > {log}\n"
                 "hook-post-jail = mount:tmpfs none /mnt\n")
    os.chown(f, 65534, 65534)
    info = wait_for(lambda: unix_get(f"{tenant_dir}/tu.sock"), 20, what="tenant in a user namespace")
    assert info["uid"] == 0 and info["host"] == "tenant-ns"
    assert psutil.Process(emp.vassal("tu.ini")["pid"]).uids().real == 65534
    assert log.read_text().strip() == "0" and log.stat().st_uid == 65534
    # A tenant cannot choose its own id maps.
    g = emp.dir / "maps.ini"
    g.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {tenant_dir}/m.sock\nunshare = user\nuid-map = 0 0 1\n")
    os.chown(g, 65534, 65534)
    v = emp.wait_state("maps.ini", "invalid")
    assert "uid-map is not allowed in tyrant mode" in v["error"]


def test_tyrant_control_socket_per_owner(start_emperor, shared_dir):
    import subprocess

    from tests.helpers import world_reachable

    if not (world_reachable(ROOT) and world_reachable(sys.executable)):
        pytest.skip("the checkout or the interpreter is not reachable by an unprivileged user")
    tenant_dir = shared_dir / "t3"
    tenant_dir.mkdir()
    os.chown(tenant_dir, 65534, 65534)
    emp = start_emperor("--emperor-tyrant", "--emperor-control-mode", "666", control_dir=shared_dir, vassal_dir=shared_dir / "vassals")
    mine = emp.dir / "mine.ini"
    mine.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {tenant_dir}/mine.sock\n")
    os.chown(mine, 65534, 65534)
    other = emp.dir / "other.ini"
    other.write_text(f"[uwsgi]\nwsgi-file = {shared_dir}/info.py\nhttp-socket = {shared_dir}/other.sock\n")
    os.chown(other, 1, 1)
    emp.wait_state("mine.ini", "ready")
    cmd = [sys.executable, "-m", "emperor.ctl", "--control", str(emp.control)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}

    def as_tenant(*args):
        return subprocess.run([*cmd, *args], capture_output=True, text=True, user=65534, group=65534, env=env, cwd="/", timeout=30)

    result = as_tenant("--json", "status")
    assert result.returncode == 0
    assert [v["name"] for v in json.loads(result.stdout)["vassals"]] == ["mine.ini"]
    assert as_tenant("reload", "mine.ini").returncode == 0
    refused = as_tenant("stop", "other.ini")
    assert refused.returncode == 1 and "not permitted" in refused.stderr
    assert as_tenant("stats").returncode == 1
