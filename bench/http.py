#!/usr/bin/env python3
"""HTTP throughput of the vassal app server, side by side in one run:

- our http-socket vs uWSGI's http11-socket (its keep-alive one) vs gunicorn's
  sync worker (direct)
- nginx + our socket (uwsgi protocol) vs nginx + uWSGI's socket
- ours routed (three routing rules: two that miss, one adding a header) vs
  ours unrouted: what the routing costs
- ours with 4 workers, thunder-lock on vs off (the ratio: what serializing
  accept costs or saves)
- gevent mode: one worker with gevent = 100, wrk -c100 with a connection per
  request (uWSGI's gevent mode has no keep-alive), ours vs uWSGI's gevent
  plugin (needs the gevent package: pip install .[gevent])
- reload under load: wrk -c50 keep-alive against 4 workers while the server
  reloads 10 times (ours and uWSGI's emperor: the vassal file touched;
  gunicorn: SIGHUP); errors and p99 for each (--reloads 0 skips it)

Hello-world WSGI app, one worker, wrk with keep-alive from another process,
loopback only. Prints requests/s, p99 latency and ratios to uWSGI.
Needs wrk (apt-get install wrk), nginx, and pip's uwsgi and gunicorn.

    /opt/pyemperor/bin/python bench/http.py [--seconds 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "apps" / "hello.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def wrk(port: int, seconds: int, connections: int, close: bool = False) -> tuple[float, float]:
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency", *extra,
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    if wrk_errors(out) and not close:
        # (uWSGI's plain http-socket closes after every answer: wrk counts each as a
        # read error and reconnects; its http11-socket keeps the connection)
        print(f"  (port {port}: wrk saw {wrk_errors(out)} errors: not a keep-alive measurement)", file=sys.stderr)
    return rps, float(p99.group(1)) * scale


def wrk_errors(out: str) -> int:
    errors = 0
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    return errors


def reload_under_load(port: int, reload, reloads: int, connections: int = 50) -> tuple[int, float, float]:
    """(errors, p99 ms, req/s) of wrk while ``reload()`` runs ``reloads`` times."""
    seconds = max(5, reloads + 3)
    proc = subprocess.Popen(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency",
                             f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    for _ in range(reloads):
        reload()
        time.sleep(0.8)
    out, _ = proc.communicate(timeout=seconds + 30)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)] if p99 else 0.0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return wrk_errors(out), float(p99.group(1)) * scale if p99 else 0.0, float(rps.group(1)) if rps else 0.0


def start(argv: list[str], work: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(work / f"{name}.log", "wb"), stderr=subprocess.STDOUT, cwd=work)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def nginx_front(work: Path, upstream: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = work / f"nginx-{port}.conf"
    conf.write_text(f"""
user root; worker_processes 1; pid {work}/nginx-{port}.pid; error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  upstream app {{ server {upstream}; }}
  server {{ listen 127.0.0.1:{port}; location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass app; }} }} }}
""")
    proc = subprocess.Popen(["nginx", "-e", str(work / "nginx-error.log"), "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


# A routed request: three rules, two that do not match and one that adds a
# header to every answer.
ROUTES = ("route = ^/old/(.*) redirect:/new/$1\n"
          "route-host = ^admin\\. return:403\n"
          "route-run = addheader:X-Served-By: pyemperor\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--reloads", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench/http.py needs wrk: apt-get install -y wrk", file=sys.stderr)
        return 2
    uwsgi = shutil.which("uwsgi", path=str(BIN))
    gunicorn = shutil.which("gunicorn", path=str(BIN))
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)

        def measure(name: str, argv: list[str], port: int, front: str | None = None, connections: int | None = None,
                    close: bool = False) -> None:
            proc = start(argv, work, name)
            nginx = None
            try:
                if front is None:
                    wait_port(port)
                    target = port
                else:
                    time.sleep(1.0)
                    nginx, target = nginx_front(work, front)
                wrk(target, 1, connections or args.connections, close)  # warm up
                results[name] = wrk(target, args.seconds, connections or args.connections, close)
            finally:
                if nginx is not None:
                    stop(nginx)
                stop(proc)

        port = free_port()
        cfg = work / "ours.ini"
        cfg.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\ndisable-logging = true\n")
        measure("ours http-socket", [str(BIN / "vassal"), str(cfg)], port)
        port = free_port()
        cfgr = work / "ours-routed.ini"
        cfgr.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                        f"disable-logging = true\n{ROUTES}")
        measure("ours routed", [str(BIN / "vassal"), str(cfgr)], port)
        for lock in (False, True):
            port = free_port()
            cfg4 = work / f"ours4-{lock}.ini"
            cfg4.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 4\n"
                            f"disable-logging = true\nthunder-lock = {str(lock).lower()}\n")
            measure(f"ours 4 workers{' thunder-lock' if lock else ''}", [str(BIN / "vassal"), str(cfg4)], port)
        try:
            import gevent  # noqa: F401
        except ImportError:
            print("  (no gevent package: no gevent rows)", file=sys.stderr)
        else:
            port = free_port()
            cfgg = work / "ours-gevent.ini"
            cfgg.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\ngevent = 100\n"
                            "disable-logging = true\n")
            # A connection per request: uWSGI's gevent mode has no HTTP keep-alive.
            measure("ours gevent", [str(BIN / "vassal"), str(cfgg)], port, connections=100, close=True)
            if uwsgi:
                port = free_port()
                measure("uWSGI gevent", [uwsgi, "--http-socket", f"127.0.0.1:{port}", "--wsgi-file", str(HELLO), "--master",
                                         "--processes", "1", "--gevent", "100", "--disable-logging"],
                        port, connections=100, close=True)
        if uwsgi:
            port = free_port()
            measure("uWSGI http-socket", [uwsgi, "--http11-socket", f"127.0.0.1:{port}", "--wsgi-file", str(HELLO),
                                          "--master", "--processes", "1", "--disable-logging", "--http-keepalive"], port)
        if gunicorn:
            port = free_port()
            measure("gunicorn sync", [gunicorn, "-w", "1", "-b", f"127.0.0.1:{port}", "--chdir", str(HELLO.parent), "hello:application"], port)
        if shutil.which("nginx"):
            sock = work / "ours.sock"
            cfg2 = work / "ours-uwsgi.ini"
            cfg2.write_text(f"[uwsgi]\nwsgi-file = {HELLO}\nsocket = {sock}\nchmod-socket = 666\nprocesses = 1\ndisable-logging = true\n")
            measure("nginx + ours socket", [str(BIN / "vassal"), str(cfg2)], 0, front=f"unix:{sock}")
            if uwsgi:
                usock = work / "uwsgi.sock"
                measure("nginx + uWSGI socket", [uwsgi, "--socket", str(usock), "--chmod-socket=666", "--wsgi-file", str(HELLO),
                                                 "--master", "--processes", "1", "--disable-logging"], 0, front=f"unix:{usock}")
        reloaded: dict[str, tuple[int, float, float]] = {}
        if args.reloads:
            reloaded = reload_rows(work, uwsgi, gunicorn, args.reloads)
    for name, (rps, p99) in results.items():
        print(f"{name:>22}: {rps:9.0f} req/s  p99 {p99:7.2f} ms", flush=True)
    pairs = [("ours http-socket", "uWSGI http-socket"), ("ours routed", "ours http-socket"), ("ours http-socket", "gunicorn sync"),
             ("ours 4 workers thunder-lock", "ours 4 workers"), ("ours gevent", "uWSGI gevent"),
             ("nginx + ours socket", "nginx + uWSGI socket")]
    for ours, theirs in pairs:
        if ours in results and theirs in results and results[theirs][0]:
            print(f"{ours} / {theirs}: {results[ours][0] / results[theirs][0]:.2f}")
    for name, (errors, p99, rps) in reloaded.items():
        print(f"{name:>22}: {errors:6d} errors in {args.reloads} reloads under wrk -c50  p99 {p99:7.2f} ms  {rps:9.0f} req/s")
    return 0


def reload_rows(work: Path, uwsgi: str | None, gunicorn: str | None, reloads: int) -> dict[str, tuple[int, float, float]]:
    rows: dict[str, tuple[int, float, float]] = {}

    def touch(path: Path):
        return lambda: os.utime(path)

    def emperor_row(label: str, kind: str, ini: str, argv) -> None:
        """A 4-worker vassal under an emperor (``argv(vassal dir)``), reloaded by touching its file."""
        port = free_port()
        vassals = work / f"reload-{kind}"
        vassals.mkdir()
        path = vassals / "r.ini"
        path.write_text(ini.format(hello=HELLO, port=port))
        proc = start(argv(vassals), work, f"reload-{kind}")
        try:
            wait_port(port)
            rows[label] = reload_under_load(port, touch(path), reloads)
        finally:
            stop(proc)

    emperor_row("ours (emperor)", "ours",
                "[uwsgi]\nwsgi-file = {hello}\nhttp-socket = 127.0.0.1:{port}\nprocesses = 4\ndisable-logging = true\n",
                lambda d: [str(BIN / "emperor"), "--control", str(work / "reload.sock"), str(d)])
    if uwsgi:
        emperor_row("uWSGI (emperor)", "uwsgi",
                    "[uwsgi]\nwsgi-file = {hello}\nhttp11-socket = 127.0.0.1:{port}\nmaster = true\nprocesses = 4\n"
                    "disable-logging = true\nhttp-keepalive = 1\n",
                    lambda d: [uwsgi, "--emperor", str(d)])
    if gunicorn:
        port = free_port()
        proc = start([gunicorn, "-w", "4", "--keep-alive", "5", "-b", f"127.0.0.1:{port}", "--chdir", str(HELLO.parent),
                      "hello:application"], work, "reload-gunicorn")
        try:
            wait_port(port)
            rows["gunicorn (SIGHUP)"] = reload_under_load(port, lambda: proc.send_signal(signal.SIGHUP), reloads)
        finally:
            stop(proc)
    return rows


if __name__ == "__main__":
    sys.exit(main())
