"""Every shipped example validates; the Linux ones run (the demo dir in
test_emperor.test_examples_run, tuntap/ in test_netrouter, tyrant/ here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TEST_TAG, unix_http_get, wait_for

EXAMPLES = ROOT / "examples" / "vassals"
VASSAL_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".ini", ".toml") and p.name != "emperor.ini")
EMPEROR_FILES = sorted(EXAMPLES.rglob("emperor.ini"))


def test_there_is_an_example_per_feature():
    names = {p.relative_to(EXAMPLES).as_posix() for p in VASSAL_FILES}
    for wanted in ("hello.ini", "namespaces.ini", "pivot-root.ini", "hooks.ini", "tuntap/vassals/net1.ini",
                   "cheaper.ini", "nginx.ini", "logging.ini", "tyrant/vassals/tenant.ini", "freebsd/web.ini"):
        assert wanted in names


@pytest.mark.parametrize("path", VASSAL_FILES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_vassal_example_validates(path):
    result = subprocess.run([sys.executable, "-m", "vassal", "--check", str(path)], capture_output=True, text=True,
                            env={**os.environ, "TENANT_DIR": "/srv/tenant"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")
    if "freebsd" not in path.parts:
        assert "warning" not in result.stderr, result.stderr  # runs here as written


@pytest.mark.parametrize("path", EMPEROR_FILES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_emperor_example_validates(path):
    from emperor.cli import build_parser, load_settings

    settings = load_settings(build_parser().parse_args(["--ini", str(path)]))
    assert settings.get("emperor")


@pytest.mark.linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="tyrant mode needs root")
def test_tyrant_example_runs_as_the_owner(tmp_path):
    """examples/vassals/tyrant, copied so its vassal can be given to a tenant
    (nobody): the app runs as nobody, its socket in the tenant's dir."""
    import tempfile

    from tests.helpers import EmperorProc, world_reachable

    if not (world_reachable(ROOT) and world_reachable(sys.executable)):
        pytest.skip("the checkout or the interpreter is not reachable by an unprivileged user")
    shared = Path(tempfile.mkdtemp(prefix="pyemperor-tyrant-"))
    shared.chmod(0o755)
    emp = None
    log = open(tmp_path / "emperor.log", "wb")
    try:
        work = shared / "tyrant"
        shutil.copytree(EXAMPLES / "tyrant", work)
        tenant_dir = shared / "tenant"
        tenant_dir.mkdir()
        os.chown(tenant_dir, 65534, 65534)
        vassal = work / "vassals" / "tenant.ini"
        vassal.write_text(vassal.read_text().replace("%d../../../apps/hello.py", str(ROOT / "examples" / "apps" / "hello.py")))
        os.chown(vassal, 65534, 65534)
        control = shared / "tyrant.sock"
        proc = subprocess.Popen([sys.executable, "-m", "emperor", "--ini", str(work / "emperor.ini"), "--emperor-control", str(control)],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTEST_TAG": TEST_TAG, "TENANT_DIR": str(tenant_dir)})
        emp = EmperorProc(work / "vassals", control, tmp_path / "emperor.log", proc)
        body = wait_for(lambda: unix_http_get(str(tenant_dir / "app.sock")), 20, what="the tenant's app")
        assert body.startswith(b"Hello, tenant tenant!")
        assert os.stat(tenant_dir / "app.sock").st_uid == 65534
        import psutil

        app = psutil.Process(emp.vassal("tenant.ini")["pid"]).children()
        assert app and all(p.uids().real == 65534 for p in app)  # the app master runs as the file's owner
    finally:
        if emp is not None:
            emp.stop()
        log.close()
        shutil.rmtree(shared, ignore_errors=True)
