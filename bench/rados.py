#!/usr/bin/env python3
"""rados-mount throughput, side by side in one run: GET and PUT of a 4 MiB
object over HTTP through a vassal (one worker, keep-alive, one client)
against the python3-rados client reading and writing the same object
directly, on a single-node memstore cluster started here
(tests/ceph_cluster.py). Prints MB/s and the ratio HTTP / direct (the
target: at least 0.7); "direct" is one read() or write_full() of the
whole object, as a client would call it. The vassal cuts an object into
PIECE operations with WINDOW of them in flight (a memstore OSD serves
those about 1.5x faster than one big call), and overlaps them with the
HTTP transfer (a PUT body streams in while earlier pieces are written):
"pipelined" is the same aio pattern from the client directly, the ceiling
for the HTTP path, printed beside it.

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
from vassal.rados import PIECE  # noqa: E402

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

                into = memoryview(bytearray(SIZE))

                def http_get() -> None:
                    # (into a buffer of its own, as a client that keeps
                    # what it downloads would, not through read()'s copies)
                    conn.request("GET", "/obj")
                    resp = conn.getresponse()
                    got = 0
                    while got < SIZE and (count := resp.readinto(into[got:])):
                        got += count
                    assert resp.status == 200 and got == SIZE and resp.read() == b""

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

                def pipelined_put() -> None:
                    done = [ioctx.aio_write_full("obj", data[:PIECE])]
                    done += [ioctx.aio_write("obj", data[at:at + PIECE], at) for at in range(PIECE, SIZE, PIECE)]
                    for completion in done:
                        completion.wait_for_complete_and_cb()
                        assert completion.get_return_value() == 0

                def pipelined_get() -> None:
                    pieces: list[bytes] = []
                    done = [ioctx.aio_read("obj", PIECE, at, lambda _c, got: pieces.append(got)) for at in range(0, SIZE, PIECE)]
                    for completion in done:
                        completion.wait_for_complete_and_cb()
                        assert completion.get_return_value() == PIECE
                    assert sum(map(len, pieces)) == SIZE

                steps = {"direct PUT": direct_put, "pipelined PUT": pipelined_put, "HTTP PUT": http_put,
                         "direct GET": direct_get, "pipelined GET": pipelined_get, "HTTP GET": http_get}
                spent = dict.fromkeys(steps, 0.0)
                for step in steps.values():
                    step()  # warm up
                # (round-robin: a drift in the machine's speed hits every path alike)
                for _ in range(args.rounds):
                    for name, step in steps.items():
                        started = time.perf_counter()
                        step()
                        spent[name] += time.perf_counter() - started
                rates = {name: SIZE * args.rounds / spent[name] / 1e6 for name in steps}
                client.shutdown()
                conn.close()
            finally:
                kill_tree(proc.pid)
                proc.wait(10)
        finally:
            cluster.stop()
    for name, rate in rates.items():
        print(f"{name:>13}: {rate:8.1f} MB/s (4 MiB objects, {args.rounds} rounds)")
    for kind in ("GET", "PUT"):
        print(f"HTTP / direct {kind}: {rates[f'HTTP {kind}'] / rates[f'direct {kind}']:.2f}"
              f"  (HTTP / pipelined direct: {rates[f'HTTP {kind}'] / rates[f'pipelined {kind}']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
