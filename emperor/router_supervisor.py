"""``tuntap-router = DEV SOCKET [STATS]``: the netrouter as a supervised
child of the emperor.

The emperor creates DEV persistent (TUNSETPERSIST) before its own
``exec-as-root`` runs, so addresses set there survive router restarts; it
removes the device at exit. The router reports its stats every second on a
socketpair, so ``emperorctl router`` never waits on it.

``tuntap-router-tenant-range = USER|UID CIDR`` (repeatable): in tyrant mode,
the addresses a tenant's files may give their router devices
(``address_problems``, checked with the config and again before brokering).
The router itself keeps every address to one vassal, whatever the ranges.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from bedrock import protocol
from bedrock.config import Config, Problem
from bedrock.proc import exec_child
from bedrock.sockets import recv_or_eof
from jails.tun import TunError, delete_persistent, open_tun
from netrouter.client import DEFAULT_ROUTER_SOCKET
from netrouter.firewall import Chain, RuleError
from netrouter.router import DROP_REASONS
from netrouter.wire import BROKER, frame

if TYPE_CHECKING:
    from emperor.core import Emperor
    from emperor.lifecycle import Vassal

TENANT_RANGE = "tuntap-router-tenant-range"


class RangeError(RuleError):
    """A bad ``tuntap-router-tenant-range`` (a RuleError: the emperor refuses
    to start on it, as on a bad firewall rule)."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def _tenant_range(who: str, cidr: str) -> tuple[int, ipaddress.IPv4Network]:
    try:
        network = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        raise ValueError("expected an IPv4 network like 198.18.1.0/24") from None
    if who.isascii() and who.isdigit():
        return int(who), network
    try:
        return pwd.getpwnam(who).pw_uid, network
    except KeyError:
        raise ValueError(f"unknown user {who!r}") from None


def tenant_ranges(settings: Config) -> dict[int, list[ipaddress.IPv4Network]]:
    """uid -> its networks, from the emperor's ``tuntap-router-tenant-range``
    values; RangeError names the first bad one (an unknown user is an error,
    not a silent "no range": a typo would otherwise lock a tenant out)."""
    ranges: dict[int, list[ipaddress.IPv4Network]] = {}
    for (who, cidr), entry in zip(settings.getlist(TENANT_RANGE), settings.sources.get(TENANT_RANGE, []), strict=False):
        try:
            uid, network = _tenant_range(who, cidr)
        except ValueError as exc:
            raise RangeError(Problem(entry.file, entry.line, TENANT_RANGE, f"{who} {cidr}: {exc}")) from None
        ranges.setdefault(uid, []).append(network)
    return ranges


def _owner_text(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def address_problems(settings: Config, config: Config, owner_uid: int | None) -> list[Problem]:
    """What a tenant's vassal may not declare as its router address: one
    Problem (file, line, key ``net-iface``) per offending ``net-iface``.

    Only in tyrant mode (``owner_uid`` is the file's owner; None: not tyrant,
    nothing to check) and only once the operator set any
    ``tuntap-router-tenant-range`` (none set: no limit). Checked: every
    ``net-iface`` on one of the vassal's ``tuntap-device`` devices (the
    addresses a router sees; one on ``lo`` or another device of the
    vassal's own namespace is its business), by its address alone (the
    prefix only shapes the vassal's own routes). The address must lie in
    one of the owner's ranges; an owner without any range while ranges are
    set may declare none (deny by default: a tenant the operator forgot is
    refused with a clear message rather than let loose on every address).
    A bad range in the settings is reported as a Problem naming it.
    Uniqueness (an address already held by another vassal, the router's own
    address) is the router's to enforce, at registration.
    """
    if owner_uid is None or not settings.has(TENANT_RANGE):
        return []
    try:
        ranges = tenant_ranges(settings)
    except RangeError as exc:
        return [exc.problem]
    allowed = ranges.get(owner_uid, [])
    devices = {str(words[0]) for words in config.getlist("tuntap-device")}
    found: list[Problem] = []
    for (device, cidr), entry in zip(config.getlist("net-iface"), config.sources.get("net-iface", []), strict=False):
        if device not in devices:
            continue
        try:
            address = ipaddress.IPv4Interface(cidr).ip
        except ValueError:
            found.append(Problem(entry.file, entry.line, "net-iface", f"{device} {cidr}: expected an IPv4 ADDR/PREFIX"))
            continue
        if any(address in network for network in allowed):
            continue
        if allowed:
            why = f"{address} is outside the {TENANT_RANGE} of {_owner_text(owner_uid)} ({', '.join(map(str, allowed))})"
        else:
            why = f"{address} is not allowed: {_owner_text(owner_uid)} has no {TENANT_RANGE} (the operator sets one per tenant)"
        found.append(Problem(entry.file, entry.line, "net-iface", why))
    return found

BROKER_RETRY = 0.5

RESTART_DELAY = 1.0
REPORT_FD = 3


def idle_stats() -> dict:
    """The router report of a router that has not reported (or does not run)."""
    return {"running": False, "connections": [], "rules": {"in": [], "out": []},
            "drops": dict.fromkeys(DROP_REASONS, 0), "refused": {"claims": 0, "connections": 0}}


class RouterSupervisor:
    def __init__(self, emperor: Emperor, spec: tuple[str, ...], rules_in: list[str], rules_out: list[str]):
        self.emperor = emperor
        self.device = spec[0]
        self.socket_path = os.path.abspath(spec[1])
        self.stats_address = spec[2] if len(spec) > 2 else None
        self.rules_in = rules_in
        self.rules_out = rules_out
        # Refuse bad rules and ranges at emperor start, naming them (RuleError).
        Chain("in", rules_in)
        Chain("out", rules_out)
        tenant_ranges(emperor.settings)
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
            exec_child(argv, what="emperor: cannot start the router", fds=[(theirs.fileno(), REPORT_FD)])
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
        # Second line of defence: the config was checked when read, but a
        # refused address must never reach the router, whatever let it by.
        try:
            owner = self.emperor.launcher.tyrant_owner(vassal.path)
        except OSError as exc:
            vassal.note(f"not brokering a router connection: cannot stat {vassal.path}: {exc.strerror}")
            return
        if owner is not None and (problems := address_problems(self.emperor.settings, vassal.config, owner[0])):
            vassal.note("not brokering a router connection: " + "; ".join(map(str, problems)))
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
        data = recv_or_eof(self.report, 1 << 20)
        if data is None:
            return
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
        doc = dict(self.latest) if self.latest else idle_stats()
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
