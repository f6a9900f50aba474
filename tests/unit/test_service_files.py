"""The shipped service files and Vagrant boxes say what DESIGN section 7
asks of an operator's setup (the boxes themselves are checked by `vagrant
validate` in .ci/run, and run the suite when brought up)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "contrib/systemd/pyemperor.service")
    service = unit["Service"]
    assert service["Delegate"] == "yes"  # the emperor makes the vassals' cgroups
    assert service["KillMode"] == "mixed"  # SIGTERM to the emperor only; it stops its vassals
    assert int(service["LimitNOFILE"]) >= 65536  # hundreds of vassals
    assert service["ExecStart"].startswith("/opt/pyemperor/bin/emperor ")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("script,shell", [
    ("contrib/rc.d/pyemperor", "sh"),
    ("vagrant/freebsd/provision.sh", "sh"),
    ("vagrant/linux/provision.sh", "bash"),
    (".ci/run", "bash"),
])
def test_scripts_parse(script, shell):
    result = subprocess.run([shell, "-n", str(ROOT / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rc_script_is_an_rc_subr_service():
    text = (ROOT / "contrib/rc.d/pyemperor").read_text()
    for needle in ("# PROVIDE: pyemperor", "# KEYWORD: shutdown", ". /etc/rc.subr", 'rcvar="pyemperor_enable"',
                   'load_rc_config $name', 'run_rc_command "$1"', 'sig_reload="HUP"'):
        assert needle in text


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (.ci/run installs it)")
@pytest.mark.parametrize("box", ["linux", "freebsd"])
def test_vagrantfile_validates(box):
    import os

    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant" / box,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
