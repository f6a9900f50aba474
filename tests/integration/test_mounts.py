"""Apps mounted under prefixes (``mount``, ``manage-script-name``, ``env =
SCRIPT_NAME=...``): the right app answers, SCRIPT_NAME and PATH_INFO are
split at the prefix, and real frameworks build their URLs with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import TEST_TAG, free_port, http_get, wait_for

ECHO = '''
import json

def application(environ, start_response):
    out = json.dumps({"app": "%s", "SCRIPT_NAME": environ["SCRIPT_NAME"], "PATH_INFO": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]
'''

FLASK = '''
from flask import Flask, request, url_for

application = Flask(__name__)


@application.route("/upload", methods=["POST"])
def upload():
    return {"size": len(request.get_data())}


@application.route("/hello/<name>")
def hello(name):
    return {"url": url_for("hello", name=name), "external": url_for("hello", name=name, _external=True),
            "script_root": request.script_root, "path": request.path}
'''

DJANGO = '''
import sys
import types

import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path, reverse

# (a wsgi-file is no importable module: the urlconf is one made here)
urls = sys.modules["pyemperor_test_urls"] = types.ModuleType("pyemperor_test_urls")
settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF="pyemperor_test_urls", SECRET_KEY="test", MIDDLEWARE=[])
django.setup()


def hello(request, name):
    return JsonResponse({"url": reverse("hello", args=[name]), "path": request.path, "path_info": request.path_info,
                         "script_name": request.META["SCRIPT_NAME"]})


urls.urlpatterns = [path("hello/<str:name>", hello, name="hello")]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
'''


@pytest.fixture
def vassal(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(lines: str) -> int:
        port = free_port()
        cfg = tmp_path / f"m{len(procs)}.ini"
        cfg.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n{lines}")
        log = open(tmp_path / f"m{len(procs)}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "vassal", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=tmp_path, env={**os.environ, "PYTEST_TAG": TEST_TAG}))
        log.close()
        wait_for(lambda: http_get(port, "/")[0] in (200, 404), 20, what="mounted vassal up")
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(15)


def get_json(port: int, path: str) -> dict:
    status, body = http_get(port, path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def echo_app(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(ECHO % name)
    return str(path)


def test_longest_prefix_wins_and_the_path_is_split(vassal, tmp_path):
    main, one, two = (echo_app(tmp_path, n) for n in ("main", "app", "admin"))
    port = vassal(f"wsgi-file = {main}\nmount = /app={one}\nmount = /app/admin={two}\nmanage-script-name = true\n")
    assert get_json(port, "/app/x") == {"app": "app", "SCRIPT_NAME": "/app", "PATH_INFO": "/x"}
    assert get_json(port, "/app/admin/users") == {"app": "admin", "SCRIPT_NAME": "/app/admin", "PATH_INFO": "/users"}
    assert get_json(port, "/app") == {"app": "app", "SCRIPT_NAME": "/app", "PATH_INFO": ""}
    # A segment boundary: /application is not under /app.
    assert get_json(port, "/application") == {"app": "main", "SCRIPT_NAME": "", "PATH_INFO": "/application"}
    assert get_json(port, "/") == {"app": "main", "SCRIPT_NAME": "", "PATH_INFO": "/"}


def test_without_a_main_app_the_rest_is_404(vassal, tmp_path):
    port = vassal(f"mount = /only={echo_app(tmp_path, 'only')}\nmanage-script-name = true\n")
    assert get_json(port, "/only/a")["app"] == "only"
    assert http_get(port, "/elsewhere")[0] == 404


def test_without_manage_script_name_the_servers_script_name_picks(vassal, tmp_path):
    """(uWSGI's rule: nginx's uwsgi_param SCRIPT_NAME names the mountpoint;
    over http-socket nobody sends one, so the main app answers)"""
    port = vassal(f"wsgi-file = {echo_app(tmp_path, 'main')}\nmount = /app={echo_app(tmp_path, 'app')}\n")
    assert get_json(port, "/app/x") == {"app": "main", "SCRIPT_NAME": "", "PATH_INFO": "/app/x"}


def test_env_script_name_mounts_the_main_app(vassal, tmp_path):
    port = vassal(f"wsgi-file = {echo_app(tmp_path, 'main')}\nenv = SCRIPT_NAME=/prefix\n")
    assert get_json(port, "/prefix/p") == {"app": "main", "SCRIPT_NAME": "/prefix", "PATH_INFO": "/p"}


def test_a_bad_mount_line_is_a_config_error(tmp_path):
    cfg = tmp_path / "bad.ini"
    cfg.write_text("[uwsgi]\nhttp-socket = 127.0.0.1:1\nmount = app=x.py\n")
    done = subprocess.run([sys.executable, "-m", "vassal", "--check", str(cfg)], capture_output=True, text=True, timeout=30)
    if "--check" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("no --check")
    assert done.returncode != 0
    assert "mount" in done.stderr and "must start with /" in done.stderr and "bad.ini" in done.stderr


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_frameworks_build_urls_with_the_prefix(vassal, tmp_path, framework):
    pytest.importorskip(framework)
    app = tmp_path / f"{framework}_app.py"
    app.write_text(FLASK if framework == "flask" else DJANGO)
    port = vassal(f"mount = /app={app}\nmanage-script-name = true\n")
    doc = get_json(port, "/app/hello/world")
    assert doc["url"] == "/app/hello/world"
    if framework == "flask":
        assert doc["script_root"] == "/app" and doc["path"] == "/hello/world"
        assert doc["external"] == f"http://127.0.0.1:{port}/app/hello/world"
    else:
        assert doc["script_name"] == "/app" and doc["path_info"] == "/hello/world" and doc["path"] == "/app/hello/world"


def test_a_chunked_upload_reaches_flask_whole(vassal, tmp_path):
    """werkzeug reads a chunked body only when wsgi.input_terminated says the
    server ended it (it came through as 0 bytes)."""
    pytest.importorskip("flask")
    import http.client

    app = tmp_path / "flask_app.py"
    app.write_text(FLASK)
    port = vassal(f"wsgi-file = {app}\n")
    payload = os.urandom(100 * 1024)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/upload", body=iter([payload[i:i + 8192] for i in range(0, len(payload), 8192)]),
                     headers={"Content-Type": "application/octet-stream"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"size": len(payload)}
    finally:
        conn.close()
