"""Internal routing in process: the grammar's errors (each naming the file,
the line and the key), the tables' checks, the startup dump, templates,
and every action run through the WSGI wrapper against a stub app."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess

import pytest

from bedrock.config import ConfigError, Entry, build
from vassal import routing
from vassal.http import DONOTLOG, CloseConnection, FileWrapper


def config(*lines: str, path: str = "/etc/vassals/app.ini"):
    entries = []
    for number, line in enumerate(lines, start=2):
        key, _, value = line.partition(" = ")
        entries.append(Entry(key.strip(), value, path, number))
    return build(path, entries)


def problems(*lines: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(*lines)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(("line", "message"), [
    ("route = ^/x cache:key=foo", "'cache' is a uWSGI action pyemperor does not build"),
    ("route = ^/x frobnicate:1", "unknown routing action 'frobnicate'"),
    ("route = ^/x last", "expected ACTION:ARGS"),
    ("route = ^/x", "expected 'SUBJECT ACTION:ARGS'"),
    ("route = ^/(x return:404", "bad regexp '^/(x'"),
    ("route-if = ipv4in:${REMOTE_ADDR};10.0.0.0/8 return:403", "'ipv4in' is a uWSGI condition pyemperor does not build"),
    ("route-if = nosuch:x return:403", "unknown routing condition 'nosuch'"),
    ("route-if = equal:${PATH_INFO} return:403", "needs two values split by ';'"),
    ("route-if = regexp:${PATH_INFO};( return:403", "bad regexp '('"),
    ("route-if = equal return:403", "expected CONDITION:ARGS"),
    ("route = ^/x return:4x4", "needs an HTTP status"),
    ("route = ^/x return:404x", "needs an HTTP status"),
    ("route = ^/x return:2000", "needs an HTTP status"),
    ("route = ^/x return:100", "cannot answer with an interim status (1xx)"),
    ("route = ^/x break:101", "cannot answer with an interim status (1xx)"),
    ("route = ^/x continue:now", "takes no arguments"),
    ("route = ^/x addvar:novalue", "needs KEY=VALUE"),
    ("route = ^/x addheader:Bad Name: v", "needs 'Name: value'"),
    ("route = ^/x addheader:Content-Length: 0", "Content-Length frames the answer"),
    ("route = ^/x log:${httptime[--5]}", "${httptime[N]} needs N seconds"),
    ("route = ^/x basicauth:realm", "needs REALM,USER:PASSWORD or REALM,HTPASSWD_FILE"),
    ("route = ^/x goto:", "needs an argument"),
    ("route = ^/x log:${nosuch[x]}", "unknown routing variable ${nosuch[x]}"),
    ("route = ^/x log:${uwsgi[nosuch]}", "unknown ${uwsgi[...]} field 'nosuch'"),
    ("route-status = abc log:x", "route-status needs an HTTP status"),
    ("route-label = two words", "a label is one word"),
    ("response-route = ^/x addheader:A: b", "the response chain (response-route*) is a uWSGI routing feature pyemperor does not build"),
    ("route-frobnicate = ^/x last:", "not a routing key pyemperor builds"),
])
def test_bad_rules_are_named_with_file_line_and_key(line, message):
    key = line.partition(" = ")[0]
    found = problems("wsgi-file = app.py", line)
    assert len(found) == 1
    assert found[0].startswith(f"/etc/vassals/app.ini:3: key '{key}': "), found[0]
    assert message in found[0]


def test_goto_must_jump_forward_to_a_label_of_its_own_chain():
    found = problems("route-label = top", "route = ^/a goto:top", "route = ^/b goto:nowhere",
                     "error-route-run = goto:top", "route-label = dup", "route-label = dup")
    assert found == [
        "/etc/vassals/app.ini:7: key 'route-label': the label 'dup' is defined twice in the request chain",
        "/etc/vassals/app.ini:3: key 'route': goto:top jumps backwards (goto can only jump forward)",
        "/etc/vassals/app.ini:4: key 'route': goto: no label 'nowhere' in the request chain",
        "/etc/vassals/app.ini:5: key 'error-route-run': goto: no label 'top' in the error chain",
    ]
    config("route = ^/a goto:3", "route-run = log:x", "route-run = log:y", "route-run = log:z")  # a rule number, as uWSGI allows
    config("route = ^/a goto:${qs[to]}")  # decided per request


def test_the_dump_is_uwsgis(monkeypatch):
    cfg = config("route = ^/old/(.*)$ redirect:/new/$1", "route-if-not = equal:${PATH_INFO};/x log:not x",
                 "route-label = here", "route-run = donotlog:", "error-route-status = 404 return:410",
                 "final-route-host = ^h$ log:${HTTP_HOST}")
    lines: list[str] = []
    monkeypatch.setattr(routing, "log", lambda text: lines.extend(text.splitlines()))
    routing.log_tables(cfg)
    assert lines == [
        "*** dumping internal routing table ***",
        "[rule: 0] subject: path_info regexp: ^/old/(.*)$ action: redirect:/new/$1",
        "[rule: 1] subject: ${PATH_INFO};/x func: !equal action: log:not x",
        "[rule: 2] label: here",
        "[rule: 3] action: donotlog:",
        "*** end of the internal routing table ***",
        "*** dumping internal error routing table ***",
        "[rule: 0] subject: 404 func: 404 action: return:410",
        "*** end of the internal error routing table ***",
        "*** dumping internal final routing table ***",
        "[rule: 0] subject: http_host regexp: ^h$ action: log:${HTTP_HOST}",
        "*** end of the internal final routing table ***",
    ]


def test_templates_expand_captures_and_variables_once():
    state = routing.State()
    env = {"PATH_INFO": "/a", "QUERY_STRING": "x=1&y=${PATH_INFO}&x=2", "HTTP_COOKIE": "a=1; sid=abc ; z",
           "REQUEST_METHOD": "GET", "wsgi.input": object()}
    match = __import__("re").search(r"^/(a)(b)?", "/a")
    t = routing.Template("$1-$2-$9-${qs[x]}-${qs[y]}-${cookie[sid]}-${NOPE}-${wsgi.input}-${base64[PATH_INFO]}-${hex[PATH_INFO]}")
    assert t.render(env, state, match) == "a---1-${PATH_INFO}-abc---L2E=-2f61"
    assert routing.Template("$1 stays").render(env, state, None) == "$1 stays"
    assert routing.Template("plain").constant == "plain"


class App:
    """A stub app that records what it was given and answers 200 (or what
    the test sets)."""

    def __init__(self, status: str = "200 OK", headers=(("X-App", "1"), ("X-Secret", "s")), body=(b"app",)):
        self.status, self.headers, self.body = status, list(headers), list(body)
        self.env: dict | None = None
        self.closed = False

    def __call__(self, env, start_response):
        self.env = env
        start_response(self.status, self.headers)
        return self

    def __iter__(self):
        return iter(self.body)

    def close(self):
        self.closed = True


def serve(cfg, app: App, path: str = "/", **env):
    """What the server would send: (status, headers, body bytes), and the environ."""
    wrapped = routing.wrap(app, cfg)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "REQUEST_URI": path, **env}
    seen: dict = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers
        return lambda data: None

    result = wrapped(environ, start_response)
    if isinstance(result, FileWrapper):
        body = b"".join(result)
        result.close()
    else:
        body = b"".join(result)
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return seen.get("status"), seen.get("headers"), body, environ


def test_no_rules_no_wrapper():
    app = App()
    assert routing.wrap(app, config("wsgi-file = app.py")) is app


def test_header_changes_reach_the_apps_answer():
    cfg = config("route = ^/ addheader:X-Path: ${PATH_INFO}", "route = ^/ delheader:x-secret", "route-run = donotlog:")
    app = App()
    status, headers, body, env = serve(cfg, app, "/p")
    assert (status, body) == ("200 OK", b"app")
    assert headers == [("X-App", "1"), ("X-Path", "/p")]
    assert env[DONOTLOG] is True
    assert app.closed


def test_bare_break_closes_without_an_answer():
    with pytest.raises(CloseConnection):
        serve(config("route = ^/drop break:"), App(), "/drop")


def test_error_chain_replaces_the_apps_answer_and_the_final_chain_sees_its_status(monkeypatch):
    logged = []
    monkeypatch.setattr(routing, "log", logged.append)
    cfg = config("error-route-status = 404 redirect:/elsewhere${PATH_INFO}",
                 "final-route-run = log:status ${uwsgi[status]} for ${PATH_INFO}")
    app = App(status="404 Not Found", body=(b"app's own 404",))
    status, headers, body, _ = serve(cfg, app, "/x")
    assert status == "302 Found" and ("Location", "/elsewhere/x") in headers and body == b"Moved"
    assert app.closed
    assert logged == ["status 302 for /x"]


def test_error_chain_applies_to_an_actions_answer():
    cfg = config("route = ^/g return:404", "error-route-status = 404 return:410")
    assert serve(cfg, App(), "/g")[:3] == ("410 Gone", [("Content-Type", "text/plain"), ("Content-Length", "4")], b"Gone")


def test_rewrite_and_setters():
    cfg = config("route = ^/r/(.*) rewrite:/new/%41$1?a=1", "route = ^/new setuser:joe:ignored",
                 "route = ^/new addvar:X_ORIG=${REQUEST_URI}")
    app = App()
    serve(cfg, app, "/r/b", QUERY_STRING="q=2", REQUEST_URI="/r/b?q=2")
    assert (app.env["PATH_INFO"], app.env["QUERY_STRING"], app.env["REQUEST_URI"]) == ("/new/Ab", "a=1&q=2", "/r/b?q=2")
    assert (app.env["REMOTE_USER"], app.env["X_ORIG"]) == ("joe", "/r/b?q=2")


def test_goto_skips_to_its_label_and_dynamic_goto_backwards_breaks(monkeypatch):
    monkeypatch.setattr(routing, "log", lambda text: None)
    cfg = config("route = ^/j goto:${qs[to]}", "route = ^/j return:500", "route-label = ok",
                 "route = ^/j return:202", "route-label = top")
    assert serve(cfg, App(), "/j", QUERY_STRING="to=ok")[0] == "202 Accepted"
    with pytest.raises(CloseConnection):
        serve(config("route-label = top", "route = ^/j goto:${qs[to]}"), App(), "/j", QUERY_STRING="to=top")


def test_static_file_not_modified_and_traversal(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<p>hi</p>")
    os.utime(page, (1_700_000_000, 1_700_000_000))
    cfg = config(f"route = ^/s(/.*) static:{tmp_path}$1")
    status, headers, body, _ = serve(cfg, App(), "/s/page.html")
    assert status == "200 OK" and body == b"<p>hi</p>"
    assert ("Content-Type", "text/html") in headers and ("Last-Modified", "Tue, 14 Nov 2023 22:13:20 GMT") in headers
    assert serve(cfg, App(), "/s/page.html", HTTP_IF_MODIFIED_SINCE="Tue, 14 Nov 2023 22:13:20 GMT")[0] == "304 Not Modified"
    assert serve(cfg, App(), "/s/page.html", HTTP_IF_MODIFIED_SINCE="garbage")[0] == "200 OK"
    (tmp_path / "sub").mkdir()
    for path in ("/s/../../../etc/passwd", "/s/sub", "/s/missing", "/s/page.html\0"):
        assert serve(cfg, App(), path)[0] == "404 Not Found", path


def _auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basicauth_htpasswd_formats_and_reload(tmp_path):
    bcrypt = pytest.importorskip("bcrypt")
    sha = base64.b64encode(hashlib.sha1(b"s1").digest()).decode()
    lines = [f"sam:{{SHA}}{sha}", "# a comment", "bea:" + bcrypt.hashpw(b"b1", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$"),
             "ann:" + routing.md5_crypt(b"a1", b"saltsalt", b"$apr1$"), "old:crypt13chars"]
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("\n".join(lines))  # (no newline at the end)
    cfg = config(f"route = ^/ basicauth:Private,{htpasswd}")
    for user, password in (("sam", "s1"), ("bea", "b1"), ("ann", "a1")):
        app = App()
        assert serve(cfg, app, "/", HTTP_AUTHORIZATION=_auth(user, password))[0] == "200 OK"
        assert app.env["REMOTE_USER"] == user
    wrong = [("sam", "s2"), ("bea", "b2"), ("ann", "a2"), ("old", "x"), ("nobody", "s1"), ("# a comment", "")]
    for user, password in wrong:
        status, headers, body, _ = serve(cfg, App(), "/", HTTP_AUTHORIZATION=_auth(user, password))
        assert (status, body) == ("401 Authorization Required", b"Unauthorized"), user
        assert ("WWW-Authenticate", 'Basic realm="Private"') in headers
    for header in ("", "Basic", "Basic !!!", "Digest abc", "Basic " + "A" * 20000):
        assert serve(cfg, App(), "/", HTTP_AUTHORIZATION=header)[0].startswith("401"), header
    htpasswd.write_text(f"sam:{{SHA}}{base64.b64encode(hashlib.sha1(b'new').digest()).decode()}\n")
    assert serve(cfg, App(), "/", HTTP_AUTHORIZATION=_auth("sam", "new"))[0] == "200 OK"
    assert serve(cfg, App(), "/", HTTP_AUTHORIZATION=_auth("sam", "s1"))[0].startswith("401")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to compare with")
def test_md5_crypt_agrees_with_openssl():
    for flag, magic in (("-apr1", b"$apr1$"), ("-1", b"$1$")):
        for password in (b"", b"x", b"secret", b"a much longer password than sixteen bytes"):
            out = subprocess.run(["openssl", "passwd", flag, "-salt", "abcdefgh", password.decode()],
                                 capture_output=True, text=True, check=True).stdout.strip()
            assert routing.md5_crypt(password, b"abcdefgh", magic) == out


def test_a_generator_apps_answer_replaced_by_the_error_chain_is_never_mixed_with_its_body():
    closed = []

    def app(env, start_response):
        try:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            yield b"the app's own 48 bytes that must not follow 302"
        finally:
            closed.append(True)

    cfg = config("error-route-status = 404 redirect:/x")
    status, headers, body, _ = serve(cfg, app, "/gen")
    assert (status, body) == ("302 Found", b"Moved") and ("Location", "/x") in headers
    assert closed == [True]


def test_a_header_name_made_of_request_data_must_be_a_token():
    cfg = config("route = ^/h/([^/]+) addheader:X-$1: yes")
    _, headers, _, _ = serve(cfg, App(), "/h/Foo\r\nSet-Cookie: evil=1\r\nX")
    assert [name for name, _ in headers] == ["X-App", "X-Secret"]
    _, headers, _, _ = serve(cfg, App(), "/h/Ok")
    assert ("X-Ok", "yes") in headers


def test_static_refuses_a_fifo_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert serve(config(f"route = ^/s(/.*) static:{tmp_path}$1"), App(), "/s/fifo")[0] == "404 Not Found"


def test_utf8_rules_meet_the_environs_latin1_strings(tmp_path):
    (tmp_path / "café.txt").write_text("au lait")
    as_wsgi = "/café".encode().decode("latin-1")  # what the server puts in PATH_INFO for /caf%C3%A9
    cfg = config("route = ^/café return:403", f"route = ^/s(/.*) static:{tmp_path}$1",
                 "route = ^/b basicauth:Realm,bob:p€", "route = ^/e addheader:X-E: €")
    assert serve(cfg, App(), as_wsgi)[0] == "403 Forbidden"
    status, _, body, _ = serve(cfg, App(), "/s" + "/café.txt".encode().decode("latin-1"))
    assert (status, body) == ("200 OK", b"au lait")
    assert serve(cfg, App(), "/b", HTTP_AUTHORIZATION=_auth("bob", "p€"))[0] == "200 OK"
    assert serve(cfg, App(), "/b", HTTP_AUTHORIZATION=_auth("bob", "p?"))[0].startswith("401")
    _, headers, _, _ = serve(cfg, App(), "/e")
    assert ("X-E", "€".encode().decode("latin-1")) in headers  # (the UTF-8 bytes on the wire)


def test_far_httptime_is_clamped_not_a_500():
    _, headers, _, _ = serve(config("route = ^/ addheader:Expires: ${httptime[999999999999]}"), App(), "/")
    assert dict(headers)["Expires"].endswith(" GMT")


def test_the_final_chain_runs_after_a_bare_break_and_after_an_app_error(monkeypatch):
    logged = []
    monkeypatch.setattr(routing, "log", logged.append)
    cfg = config("route = ^/br break:", "final-route-run = log:FINAL ${PATH_INFO}")
    with pytest.raises(CloseConnection):
        serve(cfg, App(), "/br")

    def broken(env, start_response):
        raise RuntimeError("app bug")

    with pytest.raises(RuntimeError):
        serve(cfg, broken, "/boom")
    assert logged == ["FINAL /br", "FINAL /boom"]


def test_nested_quantifiers_are_warned_of_at_start(monkeypatch):
    logged = []
    monkeypatch.setattr(routing, "log", logged.append)
    routing.log_tables(config(r"route = ^/(\w+-?)*\.html$ return:403", r"route-if = regexp:${PATH_INFO};(a+)+ last:",
                              r"route = ^/old/(.*)$ last:"))
    warnings = [line for line in logged if "WARNING" in line]
    assert len(warnings) == 2 and "app.ini:2" in warnings[0] and "app.ini:3" in warnings[1]
    assert "harakiri" in warnings[0]


def test_an_error_middlewares_second_start_response_cannot_undo_the_replaced_answer():
    import sys as _sys

    def app(env, start_response):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        start_response("500 Internal Server Error", [("Content-Length", "100")], _sys.exc_info())
        return [b"x" * 100]

    status, headers, body, _ = serve(config("error-route-status = 404 redirect:/x"), app, "/mw")
    assert (status, body) == ("302 Found", b"Moved") and ("Content-Length", "5") in headers


def test_framing_headers_built_from_request_data_are_dropped():
    _, headers, _, _ = serve(config("route = ^/sa/(.*)$ addheader:$1: x"), App(), "/sa/Content-Length")
    assert [name for name, _ in headers] == ["X-App", "X-Secret"]


def test_a_goto_to_a_strange_number_breaks_quietly(monkeypatch):
    monkeypatch.setattr(routing, "log", lambda text: None)
    for target in ("\u00b2", "9" * 5000):
        with pytest.raises(CloseConnection):
            serve(config("route = ^/g/(.*)$ goto:$1"), App(), "/g/" + target)


def test_the_final_chain_sees_500_after_an_app_error(monkeypatch):
    logged = []
    monkeypatch.setattr(routing, "log", logged.append)

    def broken(env, start_response):
        raise RuntimeError("app bug")

    with pytest.raises(RuntimeError):
        serve(config("final-route-run = log:status ${uwsgi[status]}"), broken, "/boom")
    assert logged == ["status 500"]


def test_kept_answers_reach_the_server_as_they_were(tmp_path):
    """With error or final chains, a list answer stays a list (framed with
    Content-Length) and a file wrapper a file wrapper (sent with sendfile)."""
    def list_app(env, start_response):
        start_response("200 OK", [])
        return [b"app"]

    wrapped = routing.wrap(list_app, config("error-route-status = 500 return:503", "final-route-run = donotlog:"))
    result = wrapped({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, lambda status, headers, exc_info=None: None)
    assert isinstance(result, list) and list(result) == [b"app"]
    page = tmp_path / "p.txt"
    page.write_text("x")
    handle = open(page, "rb")

    def file_app(env, start_response):
        start_response("200 OK", [])
        return FileWrapper(handle)

    result = routing.wrap(file_app, config("final-route-run = donotlog:"))({"PATH_INFO": "/"}, lambda *a: None)
    assert isinstance(result, FileWrapper)
    result.close()
    assert handle.closed
