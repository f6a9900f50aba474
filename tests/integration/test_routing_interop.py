"""Internal routing side by side: one rule table, loaded by a real uWSGI 2.0
(built with PCRE, so it has ``route*``) and by our vassal, asked the same
requests. Status, body and the headers the rules are about must agree, and
so must the routing table each prints at startup.

What the two frame differently is left out on purpose: our http-socket
is HTTP/1.1 with keep-alive and gives every answer a Content-Length (and a
Content-Type to an action's own answer and to a static file), where
uWSGI's plain http-socket closes and often leaves them out.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, kill_tree, wait_for

BIN = Path(sys.executable).parent
UWSGI = shutil.which("uwsgi", path=str(BIN)) or shutil.which("uwsgi")
VASSAL = shutil.which("vassal", path=str(BIN))


def _uwsgi_routes() -> bool:
    if UWSGI is None:
        return False
    out = subprocess.run([UWSGI, "--help"], capture_output=True, text=True, timeout=30).stdout
    return "--route-if-not" in out


pytestmark = [
    pytest.mark.uwsgi,
    pytest.mark.skipif(VASSAL is None, reason="the vassal script is not installed"),
    pytest.mark.skipif(not _uwsgi_routes(), reason="uWSGI is missing or was built without PCRE (no route* options: "
                       "apt-get install libpcre2-dev, then pip install --no-binary :all: --no-cache-dir uwsgi)"),
]

APP = '''
import json

def application(env, start_response):
    keys = ("PATH_INFO", "QUERY_STRING", "REQUEST_URI", "REMOTE_USER", "MY_VAR", "REQUEST_METHOD", "SCRIPT_NAME")
    body = json.dumps({k: env.get(k) for k in keys}).encode()
    status = "404 Not Found" if env["PATH_INFO"].startswith("/missing") else "200 OK"
    start_response(status, [("Content-Type", "application/json"), ("X-Secret", "s3"), ("Content-Length", str(len(body)))])
    return [body]
'''

RULES = r"""
route = ^/old/(.*)$ redirect:/new/$1
route = ^/perm redirect-301:http://example.test${REQUEST_URI}
route = ^/gone return:410
route = ^/café return:451
route = ^/forbid break:403
route = ^/drop break:
route = ^/rw/(\w+) rewrite:/rewritten/$1?from=rw
route = ^/rwl/(\w+) rewrite-last:/last/$1
route = ^/last return:500
route = ^/spi setpathinfo:/set
route = ^/av addvar:MY_VAR=${qs[x]}-${cookie[c]}
route = ^/ah addheader:X-Added: ${PATH_INFO}
route = ^/del delheader:X-Secret
route-host = ^special\.test$ return:418
route-qs = secret=1 return:403
route-uri = \?uri=yes$ return:409
route-user-agent = ^BadBot return:429
route-referer = evil\.test log:referer ${HTTP_REFERER}
route-if = equal:${PATH_INFO};/eq return:201
route-if = startswith:${PATH_INFO};/sw return:202
route-if = endswith:${PATH_INFO};.ew return:203
route-if = regexp:${PATH_INFO};^/re/(\d+)$ redirect:/num/$1
route-if = isfile:DIR/file.txt addheader:X-Isfile: 1
route-if = isdir:DIR addheader:X-Isdir: 1
route-if-not = exists:DIR/nope addheader:X-Nope: absent
route = ^/jump goto:skip
route = ^/jump return:500
route-label = skip
route = ^/jump addheader:X-Jumped: yes
route = ^/auth basicauth:Realm,bob:secret
route = ^/htauth basicauth:Files,DIR/htpasswd
route = ^/next basicauth-next:Realm,carol:pw
route = ^/next addheader:X-After-Auth: ${REMOTE_USER}
route = ^/static static:DIR/file.txt
route = ^/cont continue:
route = ^/cont return:500
route-run = addheader:X-Run: ${REQUEST_METHOD}
error-route-status = 404 redirect:/notfound
error-route = ^/err404 addheader:X-Error-Chain: seen
final-route-run = log:final ${REQUEST_URI}
"""


def _basic(creds: bytes) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(creds).decode()}


REQUESTS = [
    ("GET", "/old/abc?q=1", {}), ("GET", "/perm/x?y=2", {}), ("GET", "/gone", {}), ("GET", "/forbid", {}),
    ("GET", "/drop", {}), ("GET", "/rw/foo?orig=1", {}), ("GET", "/rw/foo", {}), ("GET", "/rwl/x?k=v", {}),
    ("GET", "/spi", {}), ("GET", "/av?x=1&y=2", {"Cookie": "a=b; c=choc"}), ("GET", "/av", {}),
    ("GET", "/ah/p", {}), ("GET", "/del", {}), ("GET", "/", {"Host": "special.test"}),
    ("GET", "/q?secret=1", {}), ("GET", "/any?uri=yes", {}), ("GET", "/", {"User-Agent": "BadBot/1"}),
    ("GET", "/r", {"Referer": "http://evil.test/"}), ("GET", "/eq", {}), ("GET", "/eqx", {}), ("GET", "/sw/x", {}),
    ("GET", "/a.ew", {}), ("GET", "/re/42", {}), ("GET", "/re/x", {}), ("GET", "/jump", {}), ("POST", "/plain", {}),
    ("GET", "/auth", {}), ("GET", "/auth", _basic(b"bob:secret")), ("GET", "/auth", _basic(b"bob:wrong")),
    ("GET", "/auth", {"Authorization": "Digest x"}), ("GET", "/htauth", _basic(b"alice:wonder")),
    ("GET", "/htauth", _basic(b"alice:no")), ("GET", "/htauth", _basic(b"mallory:wonder")),
    ("GET", "/next", {}), ("GET", "/next", _basic(b"carol:pw")),
    ("GET", "/static", {}), ("HEAD", "/static", {}), ("GET", "/cont", {}), ("GET", "/missing", {}),
    ("GET", "/err404", {}), ("GET", "/plain", {}),
    # Dot segments are resolved before any rule sees the path (both servers).
    ("GET", "/x/../gone", {}), ("GET", "/./gone", {}), ("GET", "/gone/../plain", {}),
    ("GET", "/x/..%2fgone", {}), ("GET", "/x/.%2e/gone", {}),  # (encoded ones are not segments: the app gets them)
    # A UTF-8 rule meets the UTF-8 bytes the client sent.
    ("GET", "/caf%C3%A9", {}),
]

# The headers the rules are about (framing headers differ by design).
COMPARED = ("location", "x-added", "x-secret", "x-isfile", "x-isdir", "x-nope", "x-jumped", "www-authenticate",
            "last-modified", "x-run", "x-after-auth", "x-error-chain")


def ask(port: int, method: str, path: str, headers: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, sorted((k.lower(), v) for k, v in resp.getheaders() if k.lower() in COMPARED), body
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return "closed without an answer"
    finally:
        conn.close()


def _start(cmd: list[str], log: Path, port: int, request) -> subprocess.Popen:
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)
    request.addfinalizer(lambda: (kill_tree(proc.pid), proc.wait(10)))

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            return ask(port, "GET", "/plain", {})[0] == 200
        except OSError:
            return False

    wait_for(up, 30, what=f"{cmd[0]} answering")
    return proc


@pytest.fixture(scope="module")
def servers(tmp_path_factory, request):
    work = tmp_path_factory.mktemp("routing")
    (work / "app.py").write_text(APP)
    (work / "file.txt").write_text("hello static\n")
    sha = base64.b64encode(hashlib.sha1(b"wonder").digest()).decode()
    (work / "htpasswd").write_text(f"alice:{{SHA}}{sha}\n")
    ports = {"uwsgi": free_port(), "ours": free_port()}
    for side, port in ports.items():
        ini = work / f"{side}.ini"
        ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nwsgi-file = {work}/app.py\n"
                       + RULES.replace("DIR", str(work)))
    _start([UWSGI, "--ini", str(work / "uwsgi.ini")], work / "uwsgi.log", ports["uwsgi"], request)
    _start([VASSAL, str(work / "ours.ini")], work / "ours.log", ports["ours"], request)
    return work, ports


@pytest.mark.parametrize(("method", "path", "headers"), REQUESTS, ids=[f"{m} {p} {sorted(h)}" for m, p, h in REQUESTS])
def test_same_answer_as_uwsgi(servers, method, path, headers):
    _, ports = servers
    theirs = ask(ports["uwsgi"], method, path, headers)
    ours = ask(ports["ours"], method, path, headers)
    assert ours == theirs


def _dump(text: str) -> list[str]:
    lines = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[[^]]*\] ", "", line) for line in text.splitlines()]
    return [line for line in lines if line.startswith(("[rule: ", "*** dumping internal", "*** end of the internal"))]


def test_same_routing_table_dump(servers):
    work, _ = servers
    theirs = _dump((work / "uwsgi.log").read_text(errors="replace"))
    ours = _dump((work / "ours.log").read_text(errors="replace"))
    assert len(theirs) == len(RULES.strip().splitlines()) + 6
    assert ours == theirs


def test_log_and_final_chain_lines(servers):
    work, ports = servers
    ask(ports["ours"], "GET", "/r?log=me", {"Referer": "http://evil.test/x"})
    log = work / "ours.log"
    wait_for(lambda: "final /r?log=me" in log.read_text(errors="replace"), 10, what="the final chain's log line")
    assert "referer http://evil.test/x" in log.read_text(errors="replace")
    assert json.loads(ask(ports["ours"], "GET", "/plain", {})[2])["PATH_INFO"] == "/plain"
