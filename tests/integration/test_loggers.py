"""``logger`` destinations against a real rsyslogd (Debian's rsyslog,
started here with its own config on a unix socket and on 127.0.0.1 UDP,
stopped by pid): the priority and prefix as sent, the defaults, a long
line cut or split, and a vassal that keeps serving while rsyslogd is gone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    HELLO,
    ROOT,
    answers,
    free_port,
    hello_ini,
    kill_tree,
    unix_http_get,
    wait_for,
)

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)
VASSAL = Path(sys.executable).parent / "vassal"

pytestmark = pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd is not installed (apt-get install rsyslog)")

CONF = """
global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{dir}/log.sock")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{port}")
template(name="seen" type="string"
         string="%syslogfacility-text%.%syslogseverity-text% tag=%syslogtag% host=%hostname% msg=%msg%|%rawmsg-after-pri%\\n")
*.* action(type="omfile" file="{dir}/seen.log" template="seen")
"""


class Rsyslogd:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_port()
        self.conf = workdir / "rsyslog.conf"
        self.conf.write_text(CONF.format(dir=workdir, port=self.port))
        self.pidfile = workdir / "rsyslogd.pid"
        self.seen = workdir / "seen.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "rsyslogd.err", "wb"))
        wait_for(lambda: (self.dir / "log.sock").exists() and self._udp_up(), 20, what="rsyslogd listening")

    def _udp_up(self) -> bool:
        out = subprocess.run(["ss", "-Hlun", f"sport = :{self.port}"], capture_output=True, text=True).stdout
        return str(self.port) in out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def lines(self) -> list[str]:
        return self.seen.read_text(errors="replace").splitlines() if self.seen.exists() else []

    def wait_line(self, needle: str) -> str:
        return wait_for(lambda: next((line for line in self.lines() if needle in line), None), 15,
                        what=f"rsyslogd seeing {needle!r}")


@pytest.fixture
def rsyslogd(tmp_path):
    daemon = Rsyslogd(tmp_path)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def vassal(tmp_path, request):
    def start(extra: str) -> tuple[int, Path, subprocess.Popen]:
        port = free_port()
        ini = tmp_path / "logged.ini"
        ini.write_text(hello_ini(port, extra))
        log = tmp_path / "vassal.log"
        proc = subprocess.Popen([str(VASSAL), str(ini)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        request.addfinalizer(lambda: (kill_tree(proc.pid), proc.wait(10)))
        wait_for(lambda: answers(port), 20, what="the vassal answering")
        return port, log, proc

    return start


def test_custom_priority_and_prefix_over_udp_and_the_unix_socket(rsyslogd, vassal):
    vassal(f"logger = rsyslog:127.0.0.1:{rsyslogd.port},myapp,134\n"
           f"logger = unix rsyslog:{rsyslogd.dir}/log.sock,sockapp,134\n")
    udp = rsyslogd.wait_line("tag=myapp:")
    unix = rsyslogd.wait_line("tag=sockapp:")
    assert udp.startswith("local0.info ") and unix.startswith("local0.info ")
    # uWSGI's packet: <PRI> then ctime's "Mmm dd hh:mm:ss", the prefix, a colon.
    assert re.fullmatch(r"[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d myapp: .*", udp.split("|", 1)[1])
    assert "ready (pid" in rsyslogd.wait_line("ready (pid")


def test_the_defaults_are_daemon_notice_and_hostname_uwsgi(rsyslogd, vassal):
    vassal(f"logger = rsyslog:127.0.0.1:{rsyslogd.port}\n")
    line = rsyslogd.wait_line("ready (pid")
    assert line.startswith("daemon.notice ")
    assert f"host={socket.gethostname()} " in line and "tag=uwsgi:" in line


@pytest.mark.parametrize("split", [False, True])
def test_a_long_line_is_cut_or_split(rsyslogd, vassal, tmp_path, split):
    marker = "L" * 3000
    (tmp_path / "talk.py").write_text(f"import sys\nprint({marker!r}, flush=True)\nimport time\ntime.sleep(3600)\n")
    vassal(f"logger = rsyslog:127.0.0.1:{rsyslogd.port},long,134\n"
           f"attach-daemon = {sys.executable} {tmp_path}/talk.py\n"
           + ("rsyslog-split-messages = true\n" if split else ""))
    wait_for(lambda: sum(line.count("L") for line in rsyslogd.lines() if "tag=long:" in line) >= (3000 if split else 900),
             15, what="the long line")
    received = "".join(line.split("msg=", 1)[1].split("|", 1)[0].strip() for line in rsyslogd.lines()
                       if "tag=long:" in line and "LLL" in line)
    if split:
        assert received == marker
        assert sum(1 for line in rsyslogd.lines() if "tag=long:" in line and "LLL" in line) == 4  # 994 bytes a packet
    else:
        assert received == "L" * 994  # the packet size (1024) less 30, as uWSGI cuts it


def test_the_vassal_keeps_serving_while_rsyslogd_is_down(rsyslogd, vassal):
    port, log, _ = vassal(f"logger = rsyslog:127.0.0.1:{rsyslogd.port}\nlogger = unix rsyslog:{rsyslogd.dir}/log.sock\n")
    rsyslogd.wait_line("ready (pid")
    rsyslogd.stop()
    (rsyslogd.dir / "log.sock").unlink(missing_ok=True)
    for _ in range(50):
        assert answers(port) is not None
    wait_for(lambda: "destination unavailable" in log.read_text(), 10, what="the dropped lines reported")
    assert "Traceback" not in log.read_text()
    rsyslogd.start()
    answers(port, "/after-restart")
    rsyslogd.wait_line("/after-restart")


@pytest.mark.linux_only
def test_a_chrooted_vassal_still_reaches_the_socket_it_found_at_start(rsyslogd, vassal, tmp_path):
    """The rsyslogd socket is not in the vassal's new root: the logger,
    connected when the vassal started, still reaches it (looked up by name
    per line, every line would be dropped)."""
    root = tmp_path / "croot"
    lines = ["unshare = fs", f"hook-post-jail = mkdir:{root}", f"hook-post-jail = mount:tmpfs none {root}"]
    lib64 = ["/lib64"] if os.path.isdir("/lib64") and not os.path.islink("/lib64") else []
    for source in ["/usr", "/lib", "/etc", sys.prefix, str(ROOT), *lib64]:
        lines += [f"exec-post-jail = mkdir -p {root}{source}", f"mount-post-jail = none {source} {root}{source} bind,rec"]
    lines += [f"chroot = {root}", f"logger = rsyslog:{rsyslogd.dir}/log.sock,jailed,134"]
    port, log, _ = vassal("\n".join(lines) + "\n")
    answers(port, "/from-the-jail")
    assert "tag=jailed:" in rsyslogd.wait_line("/from-the-jail")
    assert "destination unavailable" not in log.read_text()


@pytest.mark.linux_only
@pytest.mark.parametrize("who", ["vassal", "operator"])
def test_network_namespace_chosen_by_the_vassal_or_the_operator(rsyslogd, start_emperor, tmp_path, who):
    """``unshare = net`` (the vassal's own choice) comes after its loggers are
    made: UDP still reaches a syslog on the host's loopback. The operator's
    ``--emperor-use-clone net`` puts the whole vassal in its own network from
    the start: its UDP stays there (no way out of the isolation the operator
    chose), and a unix socket of the host's is the way to the host's syslog."""
    emp = start_emperor(*(("--emperor-use-clone", "net") if who == "operator" else ()))
    sock = tmp_path / "n.sock"
    (emp.dir / "n.ini").write_text(
        f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = {sock}\n" + ("unshare = net\n" if who == "vassal" else "")
        + f"logger = rsyslog:127.0.0.1:{rsyslogd.port},udpapp,134\nlogger = rsyslog:{rsyslogd.dir}/log.sock,unixapp,134\n")
    wait_for(lambda: unix_http_get(str(sock)), 20, what="the vassal answering")
    rsyslogd.wait_line("tag=unixapp:")
    if who == "vassal":
        rsyslogd.wait_line("tag=udpapp:")
    else:
        # (lines logged after the first ones came in over the unix socket:
        # had UDP got out, the first would be in too)
        seen = len([line for line in rsyslogd.lines() if "tag=unixapp:" in line])
        unix_http_get(str(sock))
        wait_for(lambda: len([line for line in rsyslogd.lines() if "tag=unixapp:" in line]) > seen, 15,
                 what="later lines")
        assert not any("tag=udpapp:" in line for line in rsyslogd.lines())


def test_a_logger_added_on_reload_is_said_to_need_a_restart(rsyslogd, vassal, tmp_path):
    """A vassal started with no log keys has no log pipe for its processes'
    output: a logger added by a reload is not silently ignored."""
    port, log, proc = vassal("")
    ini = tmp_path / "logged.ini"
    ini.write_text(ini.read_text() + f"logger = rsyslog:127.0.0.1:{rsyslogd.port}\n")
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "logger added: they take effect when the vassal is restarted" in log.read_text(), 15,
             what="the reload saying so")
    assert answers(port) is not None


def test_bad_logger_values_name_the_line(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text(hello_ini(free_port(), "logger = rsyslog:127.0.0.1:514,app,192\nlogger = carrier-pigeon:coo\n"))
    out = subprocess.run([str(VASSAL), "--check", str(ini)], capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert f"{ini}:6: key 'logger': rsyslog priority must be 0-191" in text
    assert f"{ini}:7: key 'logger': unknown logger 'carrier-pigeon'" in text
