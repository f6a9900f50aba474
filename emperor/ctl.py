"""``emperorctl [--control PATH] [--json] VERB ...``: the operator's tool.

Exit codes: 0 done, 1 the emperor refused, 2 usage, 3 no emperor at that socket.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from emperor import untrusted
from emperor.commands import NO_EMPEROR, REFUSED, USAGE
from emperor.names import printable

DEFAULT_CONTROL = os.environ.get("EMPEROR_CONTROL", "/run/emperor/control.sock")
# Whatever answers at --control is read with bounds too: a status document
# of thousands of vassals fits, a hostile stand-in's nesting does not.
MAX_REPLY = 256 * 1024 * 1024
MAX_REPLY_DEPTH = 64


class NoEmperor(Exception):
    pass


class Refused(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def request(path: str, command: str, args: dict, timeout: float | None = 30.0) -> Iterator[dict]:
    """Send one request; yield the reply, then any pushed lines (``logs -f``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + (timeout or 30.0)
    while True:
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise NoEmperor(f"no emperor at {path} ({exc.strerror})") from None
        except PermissionError:
            sock.close()
            raise Refused(f"not permitted to connect to {path}", 1) from None
        except BlockingIOError:
            # The emperor's backlog is full (someone floods it with connects): try again a while.
            if time.monotonic() > deadline:
                sock.close()
                raise NoEmperor(f"the emperor at {path} is not accepting connections (its backlog is full)") from None
            time.sleep(0.05)
    with sock:
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        buf = b""
        first = True
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise NoEmperor(f"the emperor at {path} did not answer") from None
            if not data:
                if first:
                    raise NoEmperor(f"the emperor at {path} closed the connection")
                return
            buf += data
            if len(buf) > MAX_REPLY:
                raise NoEmperor(f"the emperor at {path} sent a line of more than {MAX_REPLY} bytes")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    message = untrusted.loads(line, max_bytes=MAX_REPLY, max_depth=MAX_REPLY_DEPTH)
                except ValueError as exc:
                    raise NoEmperor(f"the emperor at {path} sent a garbled reply ({exc})") from None
                if not isinstance(message, dict):
                    raise NoEmperor(f"the emperor at {path} sent a garbled reply (not an object)")
                if first:
                    first = False
                    if not message.get("ok"):
                        raise Refused(message.get("error", "refused"), int(message.get("code", 1)))
                    sock.settimeout(None)
                yield message


def call(path: str, command: str, args: dict | None = None) -> dict:
    """The result of one command (every verb's is an object)."""
    for message in request(path, command, args or {}):
        result = message.get("result")
        if not isinstance(result, dict):
            raise NoEmperor(f"the emperor at {path} sent a garbled reply (no result object)")
        return result
    raise NoEmperor(f"the emperor at {path} closed the connection")


def _ago(stamp: float | None) -> str:
    if not stamp:
        return "-"
    delta = time.time() - stamp
    if delta < 0:
        return f"in {-delta:.0f}s"
    if delta < 120:
        return f"{delta:.0f}s"
    if delta < 7200:
        return f"{delta / 60:.0f}m"
    return f"{delta / 3600:.1f}h"


def _shown(text: object) -> str:
    """Tenant-chosen text (a file name, an error quoting it) as inert text:
    no terminal escape sequence, no rich markup."""
    from rich.markup import escape

    return escape(printable(str(text)))


def status_table(doc: dict):
    from rich.table import Table

    emperor = doc["emperor"]
    table = Table(title=f"emperor pid {emperor['pid']} · {emperor['vassal_count']} vassal(s) · {_shown(', '.join(emperor['dirs']))}")
    for column in ("name", "state", "pid", "up", "restarts", "loyal", "rss", "cpu%", "last exit", "error"):
        table.add_column(column, overflow="fold")
    colours = {"ready": "green", "starting": "yellow", "reloading": "yellow", "backoff": "red", "invalid": "red", "stopped": "dim", "stopping": "yellow"}
    for v in doc["vassals"]:
        last = v["last_exit"]
        last_text = f"{last['reason']} ({last['detail']}) {_ago(last['at'])} ago" if last else "-"
        state = v["state"]
        if state == "backoff" and v["backoff_until"]:
            state += f" ({_ago(v['backoff_until'])})"
        table.add_row(
            _shown(v["name"]),
            f"[{colours.get(v['state'], 'white')}]{state}[/]",
            str(v["pid"] or "-"),
            _ago(v["started_at"]) if v["pid"] else "-",
            str(v["restarts"]),
            "yes" if v["loyal"] else "no",
            f"{v['rss_bytes'] / 1048576:.1f}M" if v["rss_bytes"] else "-",
            f"{v['cpu_percent']:.1f}",
            _shown(last_text),
            _shown((v["error"] or "").splitlines()[0]) if v["error"] else "",
        )
    return table


def router_table(doc: dict):
    from rich.table import Table

    table = Table(title="netrouter" + ("" if doc.get("running", True) else " (not running)"))
    for column in ("vassal", "address", "mode", "pkts in", "pkts out", "bytes in", "bytes out", "drops"):
        table.add_column(column, no_wrap=column in ("address", "mode"))  # an address cut in two is no address
    for c in doc.get("connections", []):
        # direct: the router reads the vassal's device; offloads: 64 KB
        # frames over the socket; plain: uWSGI's framing (a uWSGI peer).
        mode = "direct" if c.get("direct") else "offloads" if c.get("offloads") else "plain"
        table.add_row(*(_shown(c.get(k)) for k in ("vassal", "address")), mode,
                      *(_shown(c.get(k)) for k in ("packets_in", "packets_out", "bytes_in", "bytes_out", "drops")))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emperorctl", description="Talk to a running emperor.")
    parser.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH", help=f"control socket (default {DEFAULT_CONTROL})")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    p = sub.add_parser("status", help="state of the vassals")
    p.add_argument("names", nargs="*")
    p = sub.add_parser("reload", help="graceful reload")
    p.add_argument("names", nargs="*")
    p.add_argument("--all", action="store_true")
    for verb, text in (("stop", "hold vassals down"), ("start", "bring held vassals back"),
                       ("restart", "stop and spawn a new jail"), ("reset", "clear backoff and try now")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("names", nargs="+")
    p = sub.add_parser("logs", help="a vassal's captured output")
    p.add_argument("name")
    p.add_argument("-n", type=int, default=50, dest="lines", help="lines of history (default 50)")
    p.add_argument("-f", action="store_true", dest="follow", help="keep printing new lines")
    sub.add_parser("stats", help="the stats document")
    p = sub.add_parser("top", help="live view")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    sub.add_parser("router", help="netrouter counters")
    p = sub.add_parser("help", help="documentation of the verbs")
    p.add_argument("names", nargs="*")
    return parser


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    path = args.control
    verb = args.verb
    if verb == "reload" and not args.names and not args.all:
        print("emperorctl: reload needs NAME... or --all", file=sys.stderr)
        return USAGE
    if verb == "logs":
        messages = request(path, "logs", {"names": [args.name], "lines": args.lines, "follow": args.follow}, timeout=30.0)
        first = next(messages)
        lines = first["result"]["lines"]
        if args.json and not args.follow:
            _print(first["result"])
            return 0
        # A vassal's output is the tenant's: on a terminal it must stay text
        # (no window titles, clipboard writes, screen clears).
        for line in lines:
            print(json.dumps({"line": line}) if args.json else printable(str(line)), flush=True)
        if args.follow:
            try:
                for message in messages:
                    if "note" in message:
                        # The emperor dropped us (we fell behind): say so, and fail.
                        print(f"emperorctl: {message['note']}", file=sys.stderr, flush=True)
                        return REFUSED
                    line = message.get("line", "")
                    print(json.dumps({"line": line}) if args.json else printable(str(line)), flush=True)
            except KeyboardInterrupt:
                pass
        return 0
    if verb == "top":
        return top(console, path, args)
    command_args: dict = {}
    if hasattr(args, "names"):
        command_args["names"] = args.names
    if getattr(args, "all", False):
        command_args["all"] = True
    result = call(path, verb, command_args)
    if args.json:
        _print(result)
        return 0
    if verb == "status":
        console.print(status_table(result))
    elif verb == "router":
        console.print(router_table(result))
    elif verb == "stats":
        _print(result)
    elif verb == "help":
        for name, text in result.items():
            console.print(f"[bold]{name}[/]\n{text}\n", highlight=False)
    else:
        for key, value in result.items():
            if value:
                print(f"{key}: {' '.join(map(printable, value)) if isinstance(value, list) else printable(str(value))}")
    return 0


def top(console, path: str, args: argparse.Namespace) -> int:
    from rich.live import Live

    count = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                doc = call(path, "status")
                if args.json:
                    print(json.dumps(doc, default=str), flush=True)
                else:
                    live.update(status_table(doc), refresh=True)
                count += 1
                if args.iterations and count >= args.iterations:
                    return 0
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return USAGE if exc.code else 0
    try:
        return run(args)
    except NoEmperor as exc:
        print(f"emperorctl: {exc}", file=sys.stderr)
        return NO_EMPEROR
    except Refused as exc:
        print(f"emperorctl: {printable(str(exc))}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
