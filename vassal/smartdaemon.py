"""``smart-attach-daemon PIDFILE CMD``: a program that daemonizes itself,
tracked by its pidfile rather than as our child.

It is started only if the pidfile does not name a live process (so a
graceful reload, or a restart of the vassal while it still runs, never
starts it twice); a slow starter is waited for until its pidfile appears;
its liveness is checked on a timer and it is started again if it died; it is
stopped with the vassal.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable

import jails
from bedrock.log import log
from bedrock.loop import Loop
from bedrock.proc import alive, kill_quietly

CHECK_INTERVAL = 1.0
START_WAIT = 30.0


def read_pid(path: str) -> int | None:
    """The pid a daemon wrote (the app's, so anything: a huge file, bytes
    that are not UTF-8, digits int() refuses are no pid, not an error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # (a FIFO must not hang the loop)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 64).strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and len(text) < 10 and int(text) > 0 else None


class SmartDaemon:
    def __init__(self, pidfile: str, command: str, loop: Loop, start: Callable[[str], int | None]):
        self.pidfile = os.path.abspath(pidfile)
        self.command = command
        self.loop = loop
        self.start_command = start  # forks the command like an attach-daemon; returns its pid
        self.pid: int | None = None
        self.starting_since: float | None = None
        self.stopped = False
        self.refused: set[int] = set()
        self.check()

    def _ours(self, pid: int | None) -> int | None:
        """The pidfile's pid if it names a live process of this vassal: only
        those are ever watched or signalled."""
        if pid is None or not alive(pid):
            return None
        if not jails.backend().owns_process(pid):
            if pid not in self.refused:
                self.refused.add(pid)
                log(f"smart-attach-daemon {self.command!r}: {self.pidfile} names pid {pid}, which is not a process of this vassal: ignored")
            return None
        return pid

    def check(self) -> None:
        if self.stopped:
            return
        pid = self._ours(read_pid(self.pidfile))
        if pid is not None:
            if pid != self.pid:
                log(f"smart-attach-daemon {self.command!r}: running as pid {pid}")
            self.pid = pid
            self.starting_since = None
        elif self.starting_since is not None and time.monotonic() - self.starting_since < START_WAIT:
            pass  # a slow starter: its pidfile is not there yet
        else:
            if self.pid is not None:
                log(f"smart-attach-daemon {self.command!r}: pid {self.pid} is gone, starting it again")
            self.pid = None
            self.starting_since = time.monotonic()
            self.start_command(self.command)
        self.loop.call_later(CHECK_INTERVAL, self.check)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopped = True
        pid = self._ours(read_pid(self.pidfile)) or self._ours(self.pid)
        if pid is not None:
            kill_quietly(pid, sig)
