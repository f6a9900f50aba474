"""``tuntap-router = DEV SOCKET [STATS]``: the netrouter as a supervised
child of the emperor.

The emperor creates DEV persistent (TUNSETPERSIST) before its own
``exec-as-root`` runs, so addresses set there survive router restarts; it
removes the device at exit. The router reports its stats every second on a
socketpair, so ``emperorctl router`` never waits on it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from netrouter.firewall import Chain
from netrouter.tun import TunError, delete_persistent, open_tun
from netrouter.wire import BROKER, frame
from vassal import protocol
from vassal.tuntap import DEFAULT_ROUTER_SOCKET

if TYPE_CHECKING:
    from emperor.core import Emperor
    from emperor.instance import Vassal

BROKER_RETRY = 0.5

RESTART_DELAY = 1.0
REPORT_FD = 3


class RouterSupervisor:
    def __init__(self, emperor: Emperor, spec: tuple[str, ...], rules_in: list[str], rules_out: list[str]):
        self.emperor = emperor
        self.device = spec[0]
        self.socket_path = os.path.abspath(spec[1])
        self.stats_address = spec[2] if len(spec) > 2 else None
        self.rules_in = rules_in
        self.rules_out = rules_out
        # Refuse bad rules at emperor start, naming the rule (RuleError).
        Chain("in", rules_in)
        Chain("out", rules_out)
        self.pid: int | None = None
        self.report: socket.socket | None = None
        self.buffer = b""
        self.latest: dict | None = None
        self.restarts = 0
        self.started_at: float | None = None

    def create_device(self) -> None:
        os.close(open_tun(self.device, persist=True))

    def start(self) -> None:
        if self.emperor.shutting_down:
            return
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-P", "-m", "netrouter", self.device, self.socket_path, "--report-fd", str(REPORT_FD)]
        for rule in self.rules_in:
            argv += ["--firewall-in", rule]
        for rule in self.rules_out:
            argv += ["--firewall-out", rule]
        if self.stats_address:
            argv += ["--stats", self.stats_address]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - execs
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGPIPE):
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.dup2(theirs.fileno(), REPORT_FD)
                os.closerange(REPORT_FD + 1, os.sysconf("SC_OPEN_MAX"))
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        theirs.close()
        ours.setblocking(False)
        self.pid = pid
        self.report = ours
        self.buffer = b""
        self.started_at = time.time()
        self.emperor.loop.add_reader(ours, self._on_report)
        self.emperor.log(f"netrouter started (pid {pid}) on {self.device} <-> {self.socket_path}")
        # A new router: every running vassal of ours gets a fresh connection.
        for vassal in list(self.emperor.vassals.values()):
            if vassal.pipe is not None and self.serves(vassal):
                self.emperor.loop.call_later(BROKER_RETRY, lambda v=vassal: self.broker(v))

    def serves(self, vassal: Vassal) -> bool:
        """Whether ``vassal``'s first tuntap-device connects to this router."""
        config = vassal.config
        if config is None or vassal.wrapped:
            return False
        devices = config.getlist("tuntap-device")
        if not devices:
            return False
        path = devices[0][1] if len(devices[0]) > 1 else DEFAULT_ROUTER_SOCKET
        return os.path.abspath(path) == self.socket_path

    def broker(self, vassal: Vassal, tries: int = 20) -> None:
        """Connect to the router as root, tell it whose connection this is and
        which address net-iface gives it, and pass the fd to the vassal."""
        if vassal.pipe is None or vassal.config is None or self.pid is None:
            return
        device = vassal.config.getlist("tuntap-device")[0][0]
        address = next((cidr.partition("/")[0] for dev, cidr in vassal.config.getlist("net-iface") if dev == device), None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.socket_path)
            sock.send(frame(json.dumps({"vassal": vassal.name, "address": address}).encode(), BROKER))
            socket.send_fds(vassal.pipe, [bytes([protocol.ROUTER_FD])], [sock.fileno()])
        except OSError as exc:
            if tries > 1:
                self.emperor.loop.call_later(BROKER_RETRY, lambda: self.broker(vassal, tries - 1))
            else:
                vassal.note(f"cannot broker a router connection: {exc}")
        finally:
            sock.close()

    def _on_report(self) -> None:
        assert self.report is not None
        try:
            data = self.report.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.emperor.loop.forget(self.report)
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if lines:
            try:
                self.latest = json.loads(lines[-1])
            except ValueError:
                pass

    def exited(self, status: int) -> None:
        self.pid = None
        if self.report is not None:
            self.emperor.loop.forget(self.report)
            self.report.close()
            self.report = None
        self.latest = None
        if self.emperor.shutting_down:
            return
        self.restarts += 1
        self.emperor.log(f"netrouter exited ({os.waitstatus_to_exitcode(status)}), restarting in {RESTART_DELAY:g}s")
        self.emperor.loop.call_later(RESTART_DELAY, self.start)

    def stats(self) -> dict:
        doc = dict(self.latest) if self.latest else {
            "running": False, "connections": [], "rules": {"in": [], "out": []},
            "drops": {"firewall": 0, "spoofed": 0, "unknown_destination": 0, "ipv6": 0, "oversize": 0, "malformed": 0},
        }
        doc["restarts"] = self.restarts
        doc["device"] = self.device
        return doc

    def stop(self) -> None:
        """At emperor exit: stop the router, wait for it, remove the device."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = None
        if self.report is not None:
            self.report.close()
            self.report = None
        try:
            delete_persistent(self.device)
        except (OSError, TunError):
            pass
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
