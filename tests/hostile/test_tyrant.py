"""A hostile tenant against tyrant mode (issue 10, items 1-7, 9, 16-18, 22).

Each tenant is a real user owning one file in a sticky 1777 vassal dir; the
emperor runs as root. Nothing a tenant controls may run, open, bind, chown or
signal as host root (DESIGN 3's tyrant security contract)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port, unix_http_get, wait_for
from tests.hostile.tenant import Tenant

pytestmark = [pytest.mark.linux_only]

ENV_APP = '''
import json, os

def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "uid": os.getuid(), "env": dict(os.environ)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def app(hostile_base: Path) -> Path:
    path = hostile_base / "envapp.py"
    path.write_text(ENV_APP)
    path.chmod(0o644)
    return path


@pytest.fixture
def tyrant(start_emperor, hostile_base):
    def start(*extra: str, env_extra: dict | None = None):
        emp = start_emperor("--emperor-tyrant", "--emperor-control-mode", "666", *extra,
                            vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
        return emp
    return start


def info(sock: Path, timeout: float = 20) -> dict:
    return json.loads(wait_for(lambda: unix_http_get(str(sock)), timeout, what=f"an answer on {sock}"))


def vassal_procs(emp, name: str) -> list[psutil.Process]:
    top = psutil.Process(emp.vassal(name)["pid"])
    return [top, *top.children(recursive=True)]


def assert_all_owner(procs: list[psutil.Process], tenant: Tenant) -> None:
    for proc in procs:
        uids, gids = proc.uids(), proc.gids()
        assert set(uids) == {tenant.uid}, f"{proc.pid} {proc.cmdline()} runs with uids {uids}"
        assert set(gids) == {tenant.gid}, f"{proc.pid} {proc.cmdline()} runs with gids {gids}"


def in_own_user_namespace(pid: int) -> bool:
    return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")


# --- 1 and 7: nothing of a tenant's runs as host root --------------------------------


@pytest.mark.parametrize("unshare", ["", "unshare = user\n", "unshare = user,fs,uts\n"])
def test_root_phase_hooks_run_as_the_owner(tyrant, tenant, app, unshare):
    """Item 1: with `unshare = user` the pre-jail hook ran as host root (it
    could copy /etc/shadow); without a user namespace the top process was
    root too. Every root phase now runs as the owner, or as root of a user
    namespace mapped to the owner."""
    emp = tyrant()
    home = tenant.home
    hooks = "".join(
        f"exec-{phase} = id -u > {home}/{phase}.id; cat /etc/shadow > {home}/{phase}.shadow 2>/dev/null || true\n"
        for phase in ("pre-jail", "post-jail", "in-jail", "as-root")
    )
    tenant.write(emp.dir / "hooks.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {home}/h.sock\n{unshare}{hooks}")
    info(home / "h.sock")
    for phase in ("pre-jail", "post-jail", "in-jail", "as-root"):
        assert (home / f"{phase}.id").stat().st_uid == tenant.uid, f"{phase} ran as host root"
        assert "root:" not in (home / f"{phase}.shadow").read_text(), f"{phase} read /etc/shadow"
    procs = vassal_procs(emp, "hooks.ini")
    assert_all_owner(procs, tenant)
    assert in_own_user_namespace(procs[0].pid) == bool(unshare)


def test_user_namespace_is_mapped_to_the_owner_before_any_tenant_step(tyrant, tenant, app):
    emp = tyrant()
    tenant.write(emp.dir / "ns.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/ns.sock\nunshare = fs,pid,uts\nhostname = t\n")
    seen = info(tenant.home / "ns.sock")
    assert seen["uid"] == 0  # root of its namespace...
    top = emp.vassal("ns.ini")["pid"]
    assert Path(f"/proc/{top}/uid_map").read_text().split() == ["0", str(tenant.uid), "1"]  # ...which is the owner
    assert_all_owner(vassal_procs(emp, "ns.ini"), tenant)


# --- 2: the vassal runs exactly what the emperor validated -------------------------------


@pytest.mark.parametrize("spawner", ["zygote", "fork+exec"])
def test_one_parse_template_named_by_the_vassals_environment(tyrant, tenant, app, spawner):
    """Item 2: `vassals-inherit = tpl-$(UWSGI_EMPEROR_FD).ini` made the emperor
    and the vassal read different templates; the vassal ran as host root and
    bound a privileged port. Now the vassal never reads the file."""
    emp = tyrant(*(["--emperor-zygote=false"] if spawner == "fork+exec" else []))
    sock = tenant.home / "two.sock"
    port = 81
    tenant.write(emp.dir / "tpl-$(UWSGI_EMPEROR_FD).ini", "[uwsgi]\nunshare = user\n")
    tenant.write(emp.dir / "tpl-3.ini", f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\n")
    tenant.write(emp.dir / "two.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {sock}\n"
                 "vassals-inherit = tpl-$(UWSGI_EMPEROR_FD).ini\nattach-daemon = sleep 1000\n")
    info(sock)
    wait_for(lambda: len(vassal_procs(emp, "two.ini")) >= 3, 10, what="the daemon")
    procs = vassal_procs(emp, "two.ini")
    assert_all_owner(procs, tenant)
    assert all(in_own_user_namespace(p.pid) for p in procs)  # the template the emperor read
    assert not _listens(port)
    # A reload is validated again, and the vassal is handed the new config.
    tenant.write(emp.dir / "tpl-$(UWSGI_EMPEROR_FD).ini", "[uwsgi]\nunshare = user\nenv = RELOADED=1\n")
    os.utime(emp.dir / "two.ini")
    wait_for(lambda: info(sock)["env"].get("RELOADED") == "1", 20, what="the reloaded config")
    assert not _listens(port)


def test_privileged_port_refused_on_reload(tyrant, tenant, app):
    emp = tyrant()
    sock = tenant.home / "p.sock"
    f = tenant.write(emp.dir / "p.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {sock}\n")
    first = info(sock)
    tenant.write(f, f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {sock}\nhttp-socket = 127.0.0.1:82\n")
    v = wait_for(lambda: (x := emp.vassal("p.ini")) and x["error"] and x, 15, what="the refused reload")
    assert "port 82 is privileged" in v["error"]
    assert info(sock)["pid"] == first["pid"] and not _listens(82)


def _listens(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- 3: files a tenant names are opened as the tenant -------------------------------------


def test_logto_is_opened_as_the_tenant(tyrant, tenant, app, hostile_base):
    """Item 3: `logto = /etc/passwd` with a format encoder appended a root
    account. Here a root-owned 0644 file stands in for /etc/passwd."""
    emp = tyrant()
    victim = hostile_base / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    victim.chmod(0o644)
    before = victim.read_bytes()
    created = hostile_base / "created-by-root"
    tenant.write(emp.dir / "log.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/l.sock\nlogto = {victim}\n"
                 "log-encoder = format x::0:0::/root:/bin/sh\nlog-encoder = nl\n")
    tenant.write(emp.dir / "log2.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/l2.sock\nlogto = {created}\n")
    wait_for(lambda: emp.vassal("log.ini")["restarts"] >= 1 and emp.vassal("log2.ini")["restarts"] >= 1, 20, what="refused logto")
    assert victim.read_bytes() == before and victim.stat().st_uid == 0
    assert not created.exists()
    assert "Permission denied" in emp.log_text()


# --- 4: sockets are never chmodded or chowned by a path a tenant can swap ------------------


RACER = r'''
import os, sys, time
from inotify_simple import INotify, flags
directory, name, target = sys.argv[1:4]
link = os.path.join(directory, ".swap")
notify = INotify()
notify.add_watch(directory, flags.CREATE)
print("ready", flush=True)
while True:
    for event in notify.read():
        if event.name == name:
            try:
                os.unlink(link)
            except FileNotFoundError:
                pass
            os.symlink(target, link)
            os.replace(link, os.path.join(directory, name))
            # Out of the way again, so that the next spawn can bind (and be raced).
            time.sleep(0.3)
            os.unlink(os.path.join(directory, name))
'''


def test_socket_chmod_cannot_be_redirected_by_a_symlink(tyrant, tenant, app, hostile_base):
    """Item 4: a tenant racing a symlink onto its socket's name (inotify
    IN_CREATE) got a root-owned 0600 file chowned to it and made 0666."""
    emp = tyrant()
    victim = hostile_base / "root-secret"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    racer = tenant.home / "racer.py"
    tenant.write(racer, RACER)
    proc = subprocess.Popen([sys.executable, str(racer), str(tenant.home), "race.sock", str(victim)], user=tenant.uid, group=tenant.gid,
                            extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        tenant.write(emp.dir / "race.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/race.sock\nchmod-socket = 666\n")
        for spawns in range(1, 4):
            wait_for(lambda n=spawns: emp.vassal("race.ini")["restarts"] >= n - 1 and emp.vassal("race.ini")["pid"], 15, what="spawned")
            time.sleep(0.5)
            emp.ctl("restart", "race.ini")
        time.sleep(1)
    finally:
        proc.kill()
        proc.wait()
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


# --- 5: templates only of the owner, or root's world-readable ones --------------------------


def test_templates_of_other_owners_are_refused(tyrant, make_tenant, app, hostile_base):
    emp = tyrant()
    mallory, victim = make_tenant(), make_tenant()
    secret = victim.write(victim.home / "secret.ini", "[uwsgi]\nenv = DB_PASSWORD=hunter2\n", 0o644)  # in a 0700 home
    public = victim.write(hostile_base / f"{victim.name}.ini", "[uwsgi]\nenv = DB_PASSWORD=hunter4\n", 0o644)
    root_only = hostile_base / "root-only.ini"
    root_only.write_text("[uwsgi]\ndb_password = hunter3\n")
    root_only.chmod(0o600)
    shared = hostile_base / "shared.ini"
    shared.write_text("[uwsgi]\nenv = SHARED=yes\n")
    shared.chmod(0o644)
    tenant_link = emp.dir / "link.ini"
    mallory.write(emp.dir / "steal.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {mallory.home}/s.sock\nvassals-inherit = {secret}\n")
    mallory.write(emp.dir / "leak.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {mallory.home}/k.sock\n"
                  f"vassals-inherit = {root_only}\nenv = LEAK=%(db_password)\n")
    mallory.write(emp.dir / "public.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {mallory.home}/p.sock\nvassals-inherit = {public}\n")
    os.symlink(public, mallory.home / "via-link.ini")
    mallory.own(mallory.home / "via-link.ini")
    mallory.write(emp.dir / "vialink.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {mallory.home}/v.sock\n"
                  f"vassals-inherit = {mallory.home}/via-link.ini\n")
    mallory.write(emp.dir / "ok.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {mallory.home}/ok.sock\nvassals-inherit = {shared}\n")
    # Read as the tenant, a file in another's 0700 home or root's 0600 one is
    # out of reach; a readable file of another tenant is refused by owner.
    for name, why in (("steal.ini", "permission denied"), ("leak.ini", "not by the vassal's owner"),
                      ("public.ini", "tyrant mode: owned by uid"), ("vialink.ini", "tyrant mode: owned by uid")):
        v = emp.wait_state(name, "invalid")
        assert why in v["error"], v["error"]
    assert info(mallory.home / "ok.sock")["env"]["SHARED"] == "yes"  # the operator's shared template
    listing = emp.ctl("--json", "status").stdout + emp.log_text()
    assert not any(word in listing for word in ("hunter2", "hunter3", "hunter4"))
    # A symlinked vassal file of another tenant's config is refused too (item 18).
    os.symlink(public, tenant_link)
    mallory.own(tenant_link)
    assert "a symlink of uid" in emp.wait_state("link.ini", "invalid")["error"]
    # Into another's private dir, it is followed as its owner: not even whether the file exists is told.
    private_link = emp.dir / "private-link.ini"
    os.symlink(secret, private_link)
    mallory.own(private_link)
    error = emp.wait_state("private-link.ini", "invalid")["error"]
    assert "Permission denied" in error and str(victim.uid) not in error


# --- 6: only the vassal's own processes are ever signalled ---------------------------------


def test_smart_daemon_pidfile_cannot_signal_others(tyrant, tenant, app):
    """Item 6: at stop the top process SIGTERMed whatever pid the tenant had
    written into its pidfile (the emperor's took every vassal down)."""
    emp = tyrant()
    # A process of the tenant's own, outside the vassal (its shell, say), and one of root's.
    theirs = subprocess.Popen(["sleep", "1000"], user=tenant.uid, group=tenant.gid, extra_groups=[])
    roots = subprocess.Popen(["sleep", "1000"])
    try:
        for victim, name in ((theirs, "own"), (roots, "root"), (emp.proc, "emperor")):
            pidfile = tenant.home / f"{name}.pid"
            f = tenant.write(emp.dir / f"smart-{name}.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/{name}.sock\n"
                             f"smart-attach-daemon = {pidfile} sh -c 'echo {victim.pid} > {pidfile}'\n")
            info(tenant.home / f"{name}.sock")
            wait_for(lambda p=pidfile: p.exists() and p.read_text().strip(), 10, what="the pidfile")
            f.unlink()
            wait_for(lambda n=name: emp.vassal(f"smart-{n}.ini") is None, 20, what="stopped")
        time.sleep(0.5)
        assert theirs.poll() is None and roots.poll() is None and emp.proc.poll() is None
    finally:
        for proc in (theirs, roots):
            proc.kill()
            proc.wait()


# --- 9: templates that are not regular files ------------------------------------------------


def test_fifo_device_and_huge_templates(tyrant, tenant, app):
    emp = tyrant()
    fifo = tenant.home / "fifo.ini"
    os.mkfifo(fifo)
    tenant.own(fifo)
    zero = tenant.home / "zero.ini"
    os.symlink("/dev/zero", zero)
    tenant.own(zero)
    huge = tenant.write(tenant.home / "huge.ini", "[uwsgi]\n" + "; padding\n" * 120_000)
    for name, template, words in (("fifo", fifo, "is a FIFO"), ("zero", zero, "is a character device"), ("huge", huge, "too large")):
        tenant.write(emp.dir / f"{name}.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/{name}.sock\nvassals-inherit = {template}\n")
        assert words in emp.wait_state(f"{name}.ini", "invalid")["error"]
    tenant.write(emp.dir / "fine.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/fine.sock\n")
    info(tenant.home / "fine.sock")  # the loop was never blocked
    emp.proc.send_signal(signal.SIGTERM)
    assert emp.proc.wait(30) == 0


# --- 16: a clean environment ----------------------------------------------------------------

MEMSCAN_APP = '''
import json

def application(environ, start_response):
    """Whether the emperor's secret is anywhere in this process's memory."""
    import ctypes
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: our own /proc/self/mem (the uid change cleared it)
    # The secret must not sit in our own memory as the needle: we hold it
    # shifted by one and shift what we read, so only a real copy matches.
    shift = bytes.maketrans(bytes(range(256)), bytes(range(1, 256)) + b"\\x00")
    needle = NEEDLE_SHIFTED
    found = False
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start).translate(shift):
                    found = True
            except (OSError, OverflowError, ValueError):
                continue
    body = json.dumps({"found": found}).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.parametrize("spawner", ["zygote", "fork+exec"])
def test_emperor_environment_is_not_in_vassal_memory(start_emperor, hostile_base, tenant, monkeypatch, spawner):
    """os.environ cleared after a fork still leaves the zygote's environment
    strings in every vassal's memory: the zygote itself starts clean."""
    monkeypatch.setenv("EMPEROR_SECRET", "s3cret-in-the-emperor")
    app = hostile_base / "memscan.py"
    app.write_text(MEMSCAN_APP.replace("NEEDLE_SHIFTED", repr(bytes((b + 1) % 256 for b in b"s3cret-in-the-emperor"))))
    app.chmod(0o644)
    emp = start_emperor("--emperor-tyrant", *(["--emperor-zygote=false"] if spawner == "fork+exec" else []),
                        vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    tenant.write(emp.dir / "mem.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/mem.sock\n")
    assert info(tenant.home / "mem.sock") == {"found": False}



def test_vassals_get_a_clean_environment(start_emperor, hostile_base, tenant, app, monkeypatch):
    monkeypatch.setenv("EMPEROR_SECRET", "s3cret")
    monkeypatch.setenv("OPERATOR_SHARED", "shared")
    emp = start_emperor("--emperor-tyrant", "--vassal-env-pass", "OPERATOR_*", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    tenant.write(emp.dir / "env.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/e.sock\n"
                 "env = GOT=$(EMPEROR_SECRET)\nenv = PASSED=$(OPERATOR_SHARED)\n")
    env = info(tenant.home / "e.sock")["env"]
    assert "EMPEROR_SECRET" not in env and "s3cret" not in json.dumps(env)
    assert env["GOT"] == "$(EMPEROR_SECRET)"  # undefined for the vassal, so verbatim
    assert env["OPERATOR_SHARED"] == "shared" and env["PASSED"] == "shared"
    assert "PATH" in env and env["UWSGI_EMPEROR_FD"] == "3"


# --- 17: a tenant's tuntap-device connects as the tenant ----------------------------------


@pytest.fixture
def world_tun():
    """/dev/net/tun as Debian and Ubuntu hosts have it (0666; some container
    machines make it 0600), so that a tenant's vassal gets as far as the
    socket; restored after."""
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    os.chmod("/dev/net/tun", 0o666)
    yield
    os.chmod("/dev/net/tun", mode)


def test_tuntap_socket_is_connected_as_the_tenant(tyrant, tenant, app, hostile_base, world_tun):
    private = hostile_base / "private"
    private.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(private / "router.sock"))
    os.chmod(private / "router.sock", 0o600)
    listener.listen(4)
    listener.settimeout(0.2)
    try:
        emp = tyrant()
        tenant.write(emp.dir / "tun.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/tun.sock\n"
                     f"unshare = net\ntuntap-device = uwsgi0 {private}/router.sock\n")
        # The device is made (root of its namespace may), the socket is dialled as the tenant.
        wait_for(lambda: f"cannot reach the router at {private}/router.sock: Permission denied" in emp.log_text(), 20,
                 what="the refused connection")
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


# --- 18: chown-socket only to the owner ----------------------------------------------------


def test_chown_socket_to_another_user_is_refused(tyrant, tenant, app):
    emp = tyrant()
    tenant.write(emp.dir / "chown.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/c.sock\nchown-socket = root:root\n")
    assert "in tyrant mode a socket may only go to its owner" in emp.wait_state("chown.ini", "invalid")["error"]
    tenant.write(emp.dir / "mine.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/m.sock\nchown-socket = {tenant.name}\n")
    info(tenant.home / "m.sock")


# --- 22: unshare = user under emperor-use-clone = pid ---------------------------------------


def test_unshare_user_under_a_cloned_pid_namespace(start_emperor, hostile_base, app):
    public = hostile_base / "pub"
    public.mkdir()
    public.chmod(0o777)
    emp = start_emperor("--emperor-use-clone", "pid", vassal_dir=hostile_base / "vassals")
    (emp.dir / "pu.ini").write_text(f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {public}/pu.sock\nchmod-socket = 666\n"
                                     "unshare = user\nuid-map = 0 200000 65536\ngid-map = 0 200000 65536\n")
    seen = info(public / "pu.sock")
    assert seen["uid"] == 0
    assert psutil.Process(emp.vassal("pu.ini")["pid"]).children(recursive=True)[-1].uids().real == 200000


def test_tyrant_http_port_still_works(tyrant, tenant, app):
    """The ordinary case keeps working: a tenant on an unprivileged port."""
    emp = tyrant()
    port = free_port()
    tenant.write(emp.dir / "web.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:{port}\n")
    from tests.helpers import http_get

    status, body = wait_for(lambda: http_get(port), 20, what="the tenant's port")
    assert status == 200 and json.loads(body)["uid"] == tenant.uid


def test_hard_linked_vassal_file_is_refused(tyrant, make_tenant, app):
    """Item 18's other half: whoever makes a hard link names the vassal, yet
    the owner we see is the file's; refuse what we cannot attribute."""
    emp = tyrant()
    victim = make_tenant()
    original = victim.write(victim.home / "app.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {victim.home}/hl.sock\n")
    os.link(original, emp.dir / "hardlink.ini")
    assert "hard links" in emp.wait_state("hardlink.ini", "invalid")["error"]


# --- what the emperor builds from a tenant's processes is bounded ---------------------------


FAN = r'''
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)"] + ["x" * 60000] * 8)
time.sleep(1000)
'''


def test_status_of_a_huge_process_tree_is_bounded(tyrant, tenant, app):
    """A tenant's 100 processes with 0.5 MB command lines each made one
    `status` reply 149 MB; twenty unread ones took the emperor to 3 GB."""
    emp = tyrant()
    tenant.write(tenant.home / "fan.py", FAN)
    tenant.write(emp.dir / "fan.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/fan.sock\n"
                 f"attach-daemon = /usr/bin/python3 {tenant.home}/fan.py 100\n")
    info(tenant.home / "fan.sock")
    wait_for(lambda: emp.vassal("fan.ini")["processes"] > 100, 20, what="the fan-out")
    reply = emp.ctl("--json", "status", "fan.ini").stdout
    v = json.loads(reply)["vassals"][0]
    assert len(reply) < 64 * 1024, len(reply)
    assert len(v["tree"]) <= 64 and all(len(p["title"]) <= 200 for p in v["tree"])
    assert v["processes"] > 100  # counted, not listed


def test_a_name_reused_by_another_tenant_is_a_new_vassal(tyrant, make_tenant, app):
    """Re-creating a name while its previous owner's vassal was stopping gave
    the newcomer that vassal's logs (and control over it)."""
    # Bob's vassal stays in "stopping" until the test ends it, however slow
    # the machine is between the unlink and alice's look.
    emp = tyrant("--emperor-curse-tolerance", "300")
    alice, bob = make_tenant(), make_tenant()
    name = emp.dir / "shop.ini"
    # Bob's vassal says a secret and is slow to stop (its daemon ignores SIGTERM).
    bob.write(bob.home / "slow.sh", "echo DB_PASSWORD=hunter2-of-bob\ntrap '' TERM\nwhile :; do sleep 0.2; done\n")
    bob.write(name, f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {bob.home}/shop.sock\nattach-daemon = /bin/sh {bob.home}/slow.sh\n")
    wait_for(lambda: "hunter2-of-bob" in emp.ctl("logs", "shop.ini").stdout, 15, what="bob's log line")
    name.unlink()
    emp.wait_state("shop.ini", "stopping")
    alice.write(name, f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {alice.home}/shop.sock\n")
    as_alice = alice.run(sys.executable, "-m", "emperor.ctl", "--control", str(emp.control), "logs", "shop.ini")
    assert "hunter2" not in as_alice.stdout + as_alice.stderr
    assert as_alice.returncode == 1  # still bob's, so not hers to see
    assert emp.vassal("shop.ini")["state"] == "stopping"
    for proc in psutil.process_iter(["uids", "cmdline"]):
        if proc.info["uids"] and proc.info["uids"].real == bob.uid and f"{bob.home}/slow.sh" in " ".join(proc.info["cmdline"] or ()):
            proc.kill()
    info(alice.home / "shop.sock", timeout=40)  # hers once bob's is gone
    as_alice = alice.run(sys.executable, "-m", "emperor.ctl", "--control", str(emp.control), "logs", "shop.ini")
    assert as_alice.returncode == 0 and "hunter2" not in as_alice.stdout


def test_template_through_a_proc_magic_link(tyrant, tenant, app):
    """/proc/self/fd/2 resolves to the emperor's own log whatever its
    effective ids: quoted in errors, it showed other tenants' log lines."""
    emp = tyrant()
    link = tenant.home / "log.ini"
    os.symlink("/proc/self/fd/2", link)
    tenant.own(link)
    tenant.write(emp.dir / "magic.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {tenant.home}/m.sock\nvassals-inherit = {link}\n")
    error = emp.wait_state("magic.ini", "invalid")["error"]
    assert "[emperor]" not in error and "watching" not in error, error


def test_vassals_per_owner_are_capped(start_emperor, hostile_base, make_tenant, app):
    """A tenant dropping thousands of files would get thousands of vassals:
    past emperor-tyrant-max-vassals a file waits, invalid, for a place."""
    emp = start_emperor("--emperor-tyrant", "--emperor-tyrant-max-vassals", "2", vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    greedy, other = make_tenant(), make_tenant()
    for number in range(3):
        greedy.write(emp.dir / f"g{number}.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {greedy.home}/g{number}.sock\n")
    emp.wait_state("g0.ini", "ready")
    emp.wait_state("g1.ini", "ready")
    assert "quota reached" in emp.wait_state("g2.ini", "invalid")["error"]
    os.utime(emp.dir / "g2.ini")  # touching it does not get it past the quota
    time.sleep(1)
    assert emp.vassal("g2.ini")["state"] == "invalid"
    other.write(emp.dir / "o.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {other.home}/o.sock\n")
    emp.wait_state("o.ini", "ready")  # the quota is per owner
    (emp.dir / "g0.ini").unlink()
    emp.wait_state("g2.ini", "ready", timeout=20)  # a place freed up


SLOW_STOP = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n"


def test_renaming_files_does_not_get_past_the_cap(start_emperor, hostile_base, tenant, app):
    """Renaming a slow-to-stop vassal's file in a loop kept 22 of one
    tenant's vassals alive under a cap of 2: a vassal on its way out counts
    while anything of it runs."""
    emp = start_emperor("--emperor-tyrant", "--emperor-tyrant-max-vassals", "2", "--emperor-curse-tolerance", "4",
                        vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    slow = tenant.write(tenant.home / "slow.py", SLOW_STOP)
    text = f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:0\nattach-daemon = /usr/bin/python3 {slow}\n"
    for number in range(3):
        tenant.write(emp.dir / f"x{number}.ini", text)
    emp.wait_state("x0.ini", "ready")
    emp.wait_state("x1.ini", "ready")
    most = 0
    for step in range(3, 18):
        os.rename(emp.dir / f"x{step - 3}.ini", emp.dir / f"x{step}.ini")
        time.sleep(0.2)
        running = [v for v in emp.status()["vassals"] if v["pid"] is not None]
        most = max(most, len(running))
    assert most <= 2, f"{most} of one tenant's vassals ran at once under a cap of 2"


def test_a_change_while_spawning_is_not_lost(tyrant, tenant, app):
    """A file changed in the milliseconds before the zygote reported the pid
    was stored but never applied: the vassal served the old config for good
    (and an invalid version in that window left it `invalid` while serving)."""
    emp = tyrant()
    sock = tenant.home / "r.sock"
    target = emp.dir / "r.ini"
    for attempt in range(5):
        old = tenant.write(emp.dir / f".r-old-{attempt}", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {sock}\nenv = STAGE=old{attempt}\n")
        new = tenant.write(emp.dir / f".r-new-{attempt}", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = {sock}\nenv = STAGE=new{attempt}\n")
        os.rename(old, target)
        time.sleep(0.002)
        os.rename(new, target)
        wait_for(lambda a=attempt: (unix_http_get(str(sock)) or b"").find(f'"new{a}"'.encode()) >= 0, 20, what="the newer config")
        target.unlink()
        wait_for(lambda: emp.vassal("r.ini") is None, 20, what="stopped")


# --- the operator's per-vassal hooks, fed what a tenant controls ------------------------------


def test_as_emperor_hooks_get_the_validated_owner_and_no_shell_syntax(start_emperor, hostile_base, make_tenant, app):
    """A tenant swapped its file for a symlink to /etc/passwd right after the
    spawn: root's exec-as-emperor hook was told uid 0 (or another tenant's);
    and a file named `x * y.ini` was globbed and split by root's shell."""
    log = hostile_base / "hook.log"
    log.write_text("")
    emp = start_emperor("--emperor-tyrant", "--exec-as-emperor", f"echo uid=$UWSGI_VASSAL_UID cfg=$UWSGI_VASSAL_CONFIG >> {log}",
                        vassal_dir=hostile_base / "vassals", control_dir=hostile_base)
    mallory, victim = make_tenant(), make_tenant()
    theirs = victim.write(victim.home / "v.ini", "[uwsgi]\n", 0o644)
    victim.home.chmod(0o711)
    for number in range(5):
        f = mallory.write(emp.dir / f"r{number}.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:0\n")
        link = emp.dir / f".l{number}"
        os.symlink(theirs if number % 2 else "/etc/passwd", link)
        mallory.own(link)
        os.replace(link, f)
    glob = mallory.write(emp.dir / "x * y.ini", f"[uwsgi]\nwsgi-file = {app}\nhttp-socket = 127.0.0.1:0\n")
    assert "shell character" in emp.wait_state(glob.name, "invalid")["error"]
    time.sleep(2)
    for line in log.read_text().splitlines():
        assert line.startswith(f"uid={mallory.uid} "), line
    assert "x * y" not in log.read_text()


def test_blocking_as_emperor_actions_are_refused_at_start(tmp_path):
    """A wait_for_file as-emperor hook ran inline at every spawn: three
    tenant files froze the emperor for 24 s."""
    result = subprocess.run([sys.executable, "-m", "emperor", "--control", str(tmp_path / "c.sock"),
                             "--hook-as-emperor", "wait_for_file:/nonexistent 8", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "action wait_for_file cannot run as-emperor" in result.stderr
