"""The app master's status for the emperor: one JSON datagram per sample
(workers with pid and RSS, the last cheaper decision and its reason) on the
datagram socket the emperor passes as PYEMPEROR_STATUS_FD.

A side channel, so the emperor pipe stays bytes only (DESIGN section 4);
under a uWSGI emperor there is no such fd and nothing is sent. Sends never
block: a full socket drops the sample (the next one follows in a second).
"""

from __future__ import annotations

import json
import os
import socket

from bedrock import protocol

MAX_DATAGRAM = 60000


class StatusChannel:
    def __init__(self, fd: int | None = None):
        self.sock: socket.socket | None = None
        if fd is None:
            raw = os.environ.get(protocol.ENV_STATUS_FD, "")
            fd = int(raw) if raw.isdigit() else None
        if fd is None:
            return
        try:
            self.sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            self.sock = None

    def send(self, doc: dict) -> None:
        if self.sock is None:
            return
        data = json.dumps(doc).encode()
        if len(data) > MAX_DATAGRAM:
            return
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass  # full, or the emperor is gone: the next sample follows

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def keep_from_exec() -> None:
    """Forked processes (masters, workers) keep the status fd; programs the
    vassal execs (attached daemons, exec hooks) do not get it."""
    raw = os.environ.get(protocol.ENV_STATUS_FD, "")
    if raw.isdigit():
        try:
            os.set_inheritable(int(raw), False)
        except OSError:
            pass
