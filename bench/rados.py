#!/usr/bin/env python3
"""rados-mount throughput, side by side in one run: GET and PUT of a 4 MiB
object over HTTP through a vassal (one worker, keep-alive, one client)
against the python3-rados client reading and writing the same object
directly, on a single-node memstore cluster started here
(tests/ceph_cluster.py). Prints MB/s and the ratio HTTP / direct (the
target: at least 0.7).

    /opt/pyemperor/bin/python bench/rados.py [--rounds 50]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # (this dir's http.py would hide the http package; the tests' helpers from the root)

import argparse  # noqa: E402
import http.client  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from tests import ceph_cluster  # noqa: E402
from tests.helpers import free_port, kill_tree, wait_for  # noqa: E402

SIZE = 4 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    import rados

    data = os.urandom(SIZE)
    with tempfile.TemporaryDirectory(prefix="bench-rados-") as tmp:
        work = Path(tmp)
        cluster = ceph_cluster.Cluster(work / "ceph")
        (work / "ceph").mkdir()
        try:
            cluster.start()
            cluster.create_pool("bench")
            port = free_port()
            ini = work / "rados.ini"
            ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\ndisable-logging = true\n"
                           f"rados-mount = mountpoint=/,pool=bench,config={cluster.conf},allow_put=1\n")
            proc = subprocess.Popen([str(Path(sys.executable).parent / "vassal"), str(ini)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

                def http_put() -> None:
                    conn.request("PUT", "/obj", body=data)
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 201

                def http_get() -> None:
                    conn.request("GET", "/obj")
                    resp = conn.getresponse()
                    assert resp.status == 200 and len(resp.read()) == SIZE

                wait_for(lambda: subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode
                         in (0, 22), 30, what="the vassal")
                http_put()
                client = rados.Rados(conffile=str(cluster.conf))
                client.connect()
                ioctx = client.open_ioctx("bench")

                def direct_put() -> None:
                    ioctx.write_full("obj", data)

                def direct_get() -> None:
                    assert len(ioctx.read("obj", SIZE)) == SIZE

                rates = {}
                for name, step in (("direct PUT", direct_put), ("HTTP PUT", http_put),
                                   ("direct GET", direct_get), ("HTTP GET", http_get)):
                    step()  # warm up
                    started = time.perf_counter()
                    for _ in range(args.rounds):
                        step()
                    rates[name] = SIZE * args.rounds / (time.perf_counter() - started) / 1e6
                client.shutdown()
                conn.close()
            finally:
                kill_tree(proc.pid)
                proc.wait(10)
        finally:
            cluster.stop()
    for name, rate in rates.items():
        print(f"{name:>11}: {rate:8.1f} MB/s (4 MiB objects, {args.rounds} rounds)")
    for kind in ("GET", "PUT"):
        print(f"HTTP / direct {kind}: {rates[f'HTTP {kind}'] / rates[f'direct {kind}']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
