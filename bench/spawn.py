#!/usr/bin/env python3
"""Spawn speed and memory: pyemperor vs uWSGI's emperor, side by side in one run.

(a) vassal file created -> first HTTP 200, median of N (default 20)
(b) M vassal files dropped at once (default 200) -> all answering
(c) PSS per vassal with M running (from /proc/PID/smaps_rollup)
(d) as (a), but every vassal in new ipc,uts,fs,pid,net namespaces
    (emperor-use-clone; HTTP over a unix socket, since the vassal has its own
    network namespace)
(e) as (a), with memory-limit, pids-limit and cpu-limit (cgroups), and the
    ratio (e)/(a): what limits cost a spawn on this machine's cgroup
    hierarchy (v1 or v2; vagrant/linux/guest-check.sh prints both). (a)
    and (e) take turns, one emperor each, so that drift over the run falls
    on both alike. The cpu-limit (--cpu-limit, 2 cores) is one a spawn never reaches: a quota
    that bites measures the throttle doing its job, and that grows with how
    slow the machine is (0.5 of a core made the emulated guest's spawn, which
    needs ~20x the CPU time of the host's, 1.45x slower; 0.02 makes this
    host's 40x slower), not what setting the limits costs

Each vassal is a hello-world app with one worker on http-socket (loopback).
uWSGI runs with --emperor-freq 1 for (a) and its default freq for (b).
Prints the numbers and the ratios ours/uWSGI (lower is better for all three).

    /opt/pyemperor/bin/python bench/spawn.py [--count 200] [--samples 20] [--no-uwsgi] [--limits-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "apps" / "hello.py"
BIN = Path(sys.executable).parent
BASE_PORT = 21000


def answers_unix(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(path)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def wait(predicate, timeout: float, interval: float = 0.0005) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(interval)
    raise TimeoutError("timed out")


LIMITS = "memory-limit = 128M\npids-limit = 64\ncpu-limit = {cpu}\n"


def ini(kind: str, port: int | str, extra: str = "") -> str:
    address = port if isinstance(port, str) else f"127.0.0.1:{port}"
    text = f"[uwsgi]\nhttp-socket = {address}\nwsgi-file = {HELLO}\nprocesses = 1\n{extra}"
    if kind == "uwsgi":
        text += "master = true\ndisable-logging = true\n"
    return text


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


CLONE = "ipc,uts,fs,pid,net"


class Emperor:
    def __init__(self, kind: str, workdir: Path, freq: int | None, clone: bool = False):
        self.kind = kind
        self.dir = workdir / f"{kind}-vassals"
        self.dir.mkdir()
        self.log = open(workdir / f"{kind}.log", "wb")
        if kind == "uwsgi":
            uwsgi = shutil.which("uwsgi", path=str(BIN)) or shutil.which("uwsgi")
            argv = [uwsgi, "--emperor", str(self.dir)]
            if freq:
                argv += ["--emperor-freq", str(freq)]
            if clone:
                argv += ["--emperor-use-clone", CLONE]
        else:
            argv = [str(BIN / "emperor"), "--control", str(workdir / "control.sock"), str(self.dir)]
            if clone:
                argv += ["--emperor-use-clone", CLONE]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        time.sleep(1.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def vassal_pids(self) -> list[int]:
        # The zygote is a template, not part of any vassal; count it once, shared by all.
        return descendants(self.proc.pid)


def spawn_to_first_200(emperor: Emperor, kind: str, name: str, port: int, extra: str = "") -> float:
    """Seconds from a vassal file's rename into place to its first 200;
    the vassal is then removed and waited for."""
    path = emperor.dir / f"{name}.ini"
    tmp = emperor.dir / f".{name}.tmp"
    tmp.write_text(ini(kind, port, extra))
    start = time.perf_counter()
    os.rename(tmp, path)
    wait(lambda: answers(port), 30)
    elapsed = time.perf_counter() - start
    path.unlink()
    wait(lambda: closed(port), 30, 0.005)
    return elapsed


def bench_first_request(kind: str, workdir: Path, samples: int) -> list[float]:
    (workdir / "a").mkdir(exist_ok=True)
    emperor = Emperor(kind, workdir / "a", freq=1)
    try:
        return [spawn_to_first_200(emperor, kind, f"a{i}", BASE_PORT + i) for i in range(samples)]
    finally:
        emperor.stop()


def bench_limits(kind: str, workdir: Path, samples: int, cpu: str) -> tuple[list[float], list[float]]:
    """(a) and (e) in turns, each on its own emperor: what drifts over the
    run (a machine warming up, an emulated guest's caches, a neighbour's
    load) falls on both alike, not on whichever ran first."""
    emperors = []
    try:
        for label in ("a", "e"):
            (workdir / label).mkdir(exist_ok=True)
            emperors.append(Emperor(kind, workdir / label, freq=1))
        plain, limited = [], []
        for i in range(samples):
            plain.append(spawn_to_first_200(emperors[0], kind, f"a{i}", BASE_PORT + i))
            limited.append(spawn_to_first_200(emperors[1], kind, f"e{i}", BASE_PORT + 1000 + i,
                                              LIMITS.format(cpu=cpu)))
        return plain, limited
    finally:
        for emperor in emperors:
            emperor.stop()


def bench_namespaced(kind: str, workdir: Path, samples: int) -> list[float]:
    (workdir / "d").mkdir(exist_ok=True)
    emperor = Emperor(kind, workdir / "d", freq=1, clone=True)
    times = []
    try:
        for i in range(samples):
            sock = str(workdir / "d" / f"d{i}.sock")
            path = emperor.dir / f"d{i}.ini"
            tmp = emperor.dir / f".d{i}.tmp"
            tmp.write_text(ini(kind, sock))
            start = time.perf_counter()
            os.rename(tmp, path)
            wait(lambda s=sock: answers_unix(s), 30)
            times.append(time.perf_counter() - start)
            path.unlink()
            wait(lambda s=sock: not answers_unix(s), 30, 0.005)
    finally:
        emperor.stop()
    return times


def bench_many(kind: str, workdir: Path, count: int) -> tuple[float, float]:
    (workdir / "b").mkdir(exist_ok=True)
    emperor = Emperor(kind, workdir / "b", freq=None)
    try:
        staging = workdir / "b" / f"{kind}-staging"
        staging.mkdir()
        for i in range(count):
            (staging / f"b{i}.ini").write_text(ini(kind, BASE_PORT + 100 + i))
        start = time.perf_counter()
        for i in range(count):
            os.rename(staging / f"b{i}.ini", emperor.dir / f"b{i}.ini")
        pending = set(range(count))
        deadline = time.perf_counter() + 300
        while pending and time.perf_counter() < deadline:
            pending = {i for i in pending if not answers(BASE_PORT + 100 + i)}
            if pending:
                time.sleep(0.01)
        elapsed = time.perf_counter() - start
        if pending:
            raise TimeoutError(f"{len(pending)} vassals never answered")
        time.sleep(2.0)  # let start-up garbage settle before measuring memory
        pids = emperor.vassal_pids()
        total = sum(pss_kb(pid) for pid in pids)
        per_vassal_mb = total / count / 1024
    finally:
        emperor.stop()
    return elapsed, per_vassal_mb


def cgroup_hierarchy() -> str:
    return "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"


def report_limits(firsts: list[float], limited: list[float], cpu: str) -> None:
    plain, costly = statistics.median(firsts) * 1000, statistics.median(limited) * 1000
    print(f"  ours: (e) first 200 with memory/pids/cpu ({cpu}) limits on cgroup {cgroup_hierarchy()}: median {costly:.1f} ms "
          f"vs {plain:.1f} ms without; ratio (e)/(a) {costly / plain:.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--no-uwsgi", action="store_true")
    parser.add_argument("--limits-only", action="store_true", help="only (a) and (e), ours only")
    parser.add_argument("--cpu-limit", default="2", help="(e)'s cpu-limit in cores (default 2)")
    args = parser.parse_args()
    if args.limits_only:
        with tempfile.TemporaryDirectory(prefix="bench-spawn-limits-") as tmp:
            report_limits(*bench_limits("ours", Path(tmp), args.samples, args.cpu_limit), args.cpu_limit)
        return 0
    kinds = ["ours"] + ([] if args.no_uwsgi else ["uwsgi"])
    results: dict[str, dict[str, float]] = {}
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"bench-spawn-{kind}-") as tmp:
            work = Path(tmp)
            firsts = bench_first_request(kind, work, args.samples)
            if kind == "ours":
                limits_dir = work / "limits"
                limits_dir.mkdir()
                report_limits(*bench_limits(kind, limits_dir, args.samples, args.cpu_limit), args.cpu_limit)
            many, pss = bench_many(kind, work, args.count)
            namespaced = bench_namespaced(kind, work, args.samples)
            results[kind] = {"a_median_ms": statistics.median(firsts) * 1000, "b_seconds": many, "c_pss_mb": pss,
                             "d_median_ms": statistics.median(namespaced) * 1000}
            print(f"{kind:>6}: (a) first 200 median {results[kind]['a_median_ms']:.1f} ms "
                  f"(min {min(firsts) * 1000:.1f}, max {max(firsts) * 1000:.1f}); "
                  f"(b) {args.count} vassals answering in {many:.2f} s; "
                  f"(c) PSS per vassal {pss:.2f} MB; "
                  f"(d) namespaced first 200 median {results[kind]['d_median_ms']:.1f} ms "
                  f"(+{results[kind]['d_median_ms'] - results[kind]['a_median_ms']:.1f} ms over (a))", flush=True)
    if "uwsgi" in results:
        ours, theirs = results["ours"], results["uwsgi"]
        print("ratios ours/uWSGI (lower is better): "
              f"(a) {ours['a_median_ms'] / theirs['a_median_ms']:.3f}  "
              f"(b) {ours['b_seconds'] / theirs['b_seconds']:.3f}  "
              f"(c) {ours['c_pss_mb'] / theirs['c_pss_mb']:.3f}  "
              f"(d) {ours['d_median_ms'] / theirs['d_median_ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
