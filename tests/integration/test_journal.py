"""journald's native protocol for real: a private systemd-journald in a
mount namespace of its own (tmpfs on /run/systemd and /run/log), a vassal
with ``logger = journal`` and an emperor whose stderr is the journal
(JOURNAL_STREAM) run beside it, and the entries read back with
``journalctl -D DIR -o json``: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER and
VASSAL fields present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, hello_ini

JOURNALD = "/lib/systemd/systemd-journald"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.linux_only,
              pytest.mark.skipif(not os.path.exists(JOURNALD), reason="systemd-journald is not installed")]

# In a private mount namespace: a journald of our own, COMMAND run until
# WAIT_FOR appears in its output (or 30 s), then every entry as JSON lines.
SCRIPT = r'''
set -u
mkdir -p /run/systemd /run/log
mount -t tmpfs tmpfs /run/systemd && mount -t tmpfs tmpfs /run/log || exit 90
"$JOURNALD" >/dev/null 2>&1 & J=$!
i=0; while [ ! -S /run/systemd/journal/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
exec 3>"$OUT_DIR/stderr"
export JOURNAL_STREAM=$(stat -c '%d:%i' "$OUT_DIR/stderr")
"$@" 2>&3 >&3 & C=$!
i=0; while [ $i -lt 300 ]; do
    journalctl -D /run/log/journal -o json --no-pager 2>/dev/null | grep -q "$WAIT_FOR" && break
    sleep 0.1; i=$((i+1))
done
kill -INT $C; wait $C
sleep 0.5
journalctl -D /run/log/journal -o json --no-pager > "$OUT_DIR/entries.json"
kill $J; wait $J
'''


def run_in_private_journal(tmp_path: Path, wait_for: str, *command: str) -> list[dict]:
    env = {**os.environ, "JOURNALD": JOURNALD, "OUT_DIR": str(tmp_path), "WAIT_FOR": wait_for}
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", *command],
                         env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in (tmp_path / "entries.json").read_text().splitlines() if line.strip()]


def test_a_vassals_journal_logger(tmp_path):
    ini = tmp_path / "jlog.ini"
    ini.write_text(hello_ini(free_port(), "logger = journal\n"))
    entries = run_in_private_journal(tmp_path, "ready (pid", str(BIN / "vassal"), str(ini))
    ours = [e for e in entries if e.get("VASSAL") == "jlog.ini"]
    assert any("ready (pid" in e["MESSAGE"] for e in ours)
    assert all(e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "pyemperor" for e in ours)


def test_the_emperors_own_log_under_systemd_is_native(tmp_path):
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    (vassals / "app.ini").write_text(hello_ini(free_port()))
    control = tmp_path / "ctl.sock"
    entries = run_in_private_journal(tmp_path, "app master generation 1 ready", str(BIN / "emperor"),
                                     "--emperor-control", str(control), str(vassals))
    own = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "pyemperor" and "VASSAL" not in e]
    echoed = [e for e in entries if e.get("VASSAL") == "app.ini"]
    assert own and all(e["PRIORITY"] == "6" for e in own)
    assert any("app master generation 1 ready" in e["MESSAGE"] for e in echoed)
    assert "[app.ini]" not in (tmp_path / "stderr").read_text()  # (native entries, not lines on stderr)
