"""Log lines of a vassal's processes, written straight to stderr.

Under the emperor, stderr is a pipe that the emperor reads and keeps per
vassal; one ``write`` per line keeps lines from different processes whole.
"""

from __future__ import annotations

import os
import time

_role = "vassal"
# Where log lines go instead of fd 2 (the top process's log pipe, if any).
_sink = None


def set_sink(sink) -> None:
    global _sink
    _sink = sink


def set_role(role: str) -> None:
    global _role
    _role = role


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(f"{stamp} [{_role} {os.getpid()}] {line}\n" for line in message.splitlines() or [""])
    data = text.encode("utf-8", "replace")
    if _sink is not None:
        _sink(data)
        return
    try:
        os.write(2, data)
    except OSError:
        pass
