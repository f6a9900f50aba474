"""``netrouter DEV SOCKET [--firewall-in RULE]... [--firewall-out RULE]...
[--stats ADDR] [--socket-group GROUP] [--max-connections N]``: run the
userspace router alone (the emperor runs the same thing for
``tuntap-router``)."""

from __future__ import annotations

import argparse
import grp
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable

import jails
from bedrock.loop import Loop
from jails.tun import TunError, disable_ipv6, open_tun, set_offloads
from netrouter.firewall import RuleError
from netrouter.hostaddr import AddressError
from netrouter.router import DEFAULT_MAX_CONNECTIONS, Router, say

REPORT_INTERVAL = 1.0
STATS_TIMEOUT = 5.0  # a stats reader that does not read is dropped after this
MAX_STATS_READERS = 16


class Sender:
    """Documents to one socket without blocking the router: a stats
    document of a thousand connections is larger than a socket's buffer,
    and a single send would cut it short. ``closed`` runs when the socket
    fails or, for a ``once`` sender, when its one document is out."""

    def __init__(self, loop: Loop, sock: socket.socket, closed: Callable[[], object], once: bool = False) -> None:
        self.loop = loop
        self.sock = sock
        self.pending = bytearray()
        self.closed = closed
        self.once = once

    def send(self, data: bytes) -> bool:
        """Queue ``data`` unless the previous document is still going out
        (False then: the reader is slow, it gets a later one)."""
        if self.pending or self.sock.fileno() == -1:
            return False
        self.pending += data
        self._flush()
        return True

    def _flush(self) -> None:
        try:
            while self.pending:
                sent = self.sock.send(self.pending)
                del self.pending[:sent]
        except (BlockingIOError, InterruptedError):
            self.loop.add_writer(self.sock, self._flush)
            return
        except OSError:
            self.close()
            return
        self.loop.remove_writer(self.sock)
        if self.once:
            self.close()

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        self.pending.clear()
        self.loop.forget(self.sock)
        self.sock.close()
        self.closed()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netrouter", description="Route IPv4 between a tun device and vassal tun devices connected over a unix socket.")
    parser.add_argument("device", metavar="DEV", help="tun device in this namespace (created if missing)")
    parser.add_argument("socket", metavar="SOCKET", help="unix socket the vassals connect to")
    parser.add_argument("--firewall-in", action="append", default=[], metavar="RULE", help="router -> vassal rule (repeatable)")
    parser.add_argument("--firewall-out", action="append", default=[], metavar="RULE", help="vassal -> router rule (repeatable)")
    parser.add_argument("--stats", metavar="ADDR", help="stats server: a unix path or host:port; JSON on connect")
    parser.add_argument("--socket-group", metavar="GROUP", help="group of SOCKET (mode 0660 instead of 0600)")
    parser.add_argument("--no-offloads", action="store_true",
                        help="plain packets only: no TUN offloads on DEV, none offered to peers (slower; for debugging)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"connections accepted from unprivileged peers, and as many from root (default {DEFAULT_MAX_CONNECTIONS}); "
                             "more are refused and counted")
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    return parser


def _stats_server(loop: Loop, router: Router, address: str) -> socket.socket:
    if "/" in address:
        if os.path.exists(address):
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        os.chmod(address, 0o600)
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "127.0.0.1", int(port)))
    sock.listen(16)
    sock.setblocking(False)

    readers: set[Sender] = set()

    def accept() -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if len(readers) >= MAX_STATS_READERS:
            conn.close()
            return
        conn.setblocking(False)
        sender = Sender(loop, conn, lambda: readers.discard(sender), once=True)
        readers.add(sender)
        loop.call_later(STATS_TIMEOUT, sender.close)
        sender.send(router.stats_json())

    loop.add_reader(sock, accept)
    return sock


def _raise_fd_limit(wanted: int) -> None:
    """Room for the connections allowed and a direct tun fd for each of ours;
    the soft limit (often 1024) would otherwise be hit first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_connections < 1:
        parser.error("--max-connections must be at least 1")
    _raise_fd_limit(4 * args.max_connections + 64)  # two classes of peers, a socket and a tun fd each
    gid = None
    if args.socket_group:
        try:
            gid = int(args.socket_group) if args.socket_group.isdigit() else grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            print(f"netrouter: unknown group {args.socket_group!r}", file=sys.stderr)
            return 2
    try:
        tun_fd = open_tun(args.device, vnet=not args.no_offloads)
        if not args.no_offloads:
            set_offloads(tun_fd, True)
        disable_ipv6(args.device)
        jails.backend().interface_up(args.device)
    except (TunError, OSError) as exc:
        print(f"netrouter: {exc}", file=sys.stderr)
        return 1
    loop = Loop()
    try:
        router = Router(tun_fd, os.path.abspath(args.socket), args.firewall_in, args.firewall_out, loop=loop,
                        socket_mode=0o660 if gid is not None else 0o600, socket_gid=gid,
                        vnet=not args.no_offloads, device=args.device, max_connections=args.max_connections)
    except RuleError as exc:
        print(f"netrouter: firewall: {exc}", file=sys.stderr)
        return 2
    except AddressError as exc:
        print(f"netrouter: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"netrouter: cannot listen on {args.socket}: {exc.strerror}", file=sys.stderr)
        return 1
    stats = _stats_server(loop, router, args.stats) if args.stats else None
    if args.report_fd is not None:
        report = socket.socket(fileno=args.report_fd)
        report.setblocking(False)
        sender = Sender(loop, report, loop.stop)  # closed: the emperor is gone

        def push() -> None:
            if report.fileno() == -1:
                return
            sender.send(router.stats_json() + b"\n")  # whole lines only: the emperor parses the last one
            loop.call_later(REPORT_INTERVAL, push)

        loop.call_later(0, push)
    loop.add_signal(signal.SIGTERM, lambda s: loop.stop())
    loop.add_signal(signal.SIGINT, lambda s: loop.stop())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    say(f"routing {args.device} <-> {args.socket} (in: {len(router.chain_in.rules)} rules, out: {len(router.chain_out.rules)} rules)")
    loop.run()
    for path in (args.socket, args.stats if stats is not None and args.stats and "/" in args.stats else None):
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
    return 0
