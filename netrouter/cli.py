"""``netrouter DEV SOCKET [--firewall-in RULE]... [--firewall-out RULE]...
[--stats ADDR] [--socket-group GROUP]``: run the userspace router alone (the
emperor runs the same thing for ``tuntap-router``)."""

from __future__ import annotations

import argparse
import grp
import os
import signal
import socket
import sys

from jails.linux import interface_up
from netrouter.firewall import RuleError
from netrouter.router import Router, say
from netrouter.tun import TunError, disable_ipv6, open_tun, set_offloads
from vassal.loop import Loop

REPORT_INTERVAL = 1.0


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

    def accept() -> None:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        try:
            conn.setblocking(False)
            conn.send(router.stats_json())
        except OSError:
            pass
        conn.close()

    loop.add_reader(sock, accept)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        interface_up(args.device)
    except (TunError, OSError) as exc:
        print(f"netrouter: {exc}", file=sys.stderr)
        return 1
    loop = Loop()
    try:
        router = Router(tun_fd, os.path.abspath(args.socket), args.firewall_in, args.firewall_out, loop=loop,
                        socket_mode=0o660 if gid is not None else 0o600, socket_gid=gid,
                        vnet=not args.no_offloads)
    except RuleError as exc:
        print(f"netrouter: firewall: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"netrouter: cannot listen on {args.socket}: {exc.strerror}", file=sys.stderr)
        return 1
    stats = _stats_server(loop, router, args.stats) if args.stats else None
    if args.report_fd is not None:
        report = socket.socket(fileno=args.report_fd)
        report.setblocking(False)

        def push() -> None:
            try:
                report.send(router.stats_json() + b"\n")
            except BlockingIOError:
                pass
            except OSError:
                loop.stop()  # the emperor is gone
                return
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
