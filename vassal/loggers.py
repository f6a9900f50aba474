"""uWSGI's ``logger`` key: more destinations for the vassal's log lines,
each line sent after the ``log-encoder`` chain. A destination that is down
or full never stops the vassal: sockets are non-blocking datagrams, a line
that cannot go is counted as dropped (and said once a minute on the
vassal's own log), and the vassal keeps serving. Each socket is connected
when the vassal starts, before its root changes (bedrock.datagram), and
kept across reloads that still name it.

- ``rsyslog:HOST[:PORT][,PREFIX[,PRIORITY]]`` (or a unix datagram socket
  path for HOST): ``<PRI>Mmm dd hh:mm:ss PREFIX: line`` as uWSGI sends
  it, port 514, PRIORITY 29 (daemon.notice), PREFIX ``HOSTNAME uwsgi``;
  lines longer than ``rsyslog-packet-size`` (1024) less 30 are cut, or with
  ``rsyslog-split-messages`` sent in several packets (at most 128)
- ``syslog[:IDENT[,FACILITY]]``: the local syslog socket (/dev/log),
  ``<PRI>Mmm dd hh:mm:ss IDENT: line``, daemon.info by default, as uWSGI's
  syslog(3) calls write it
- ``socket:ADDR[,PREFIX]``: PREFIX and the line, untouched, to a UDP
  ``host:port`` or a unix datagram path
- ``file:PATH``: appended to PATH as it is
- ``journal``: systemd-journald's native protocol, each line an entry
  with MESSAGE, PRIORITY (6), SYSLOG_IDENTIFIER and VASSAL (the file's name)
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from bedrock import journal
from bedrock.datagram import DatagramSender
from bedrock.options import SYSLOG_FACILITIES, logger_address, parse_logger

DROP_REPORT_INTERVAL = 60.0


def _stamp(now: float) -> str:
    # ctime()'s "Mmm dd hh:mm:ss" (the day space-padded), as uWSGI sends it.
    return time.strftime("%b %e %H:%M:%S", time.localtime(now))


class Logger:
    """One destination; ``send`` never raises and never blocks."""

    def __init__(self, spec: str, name: str):
        self.spec = spec
        self.name = name
        self.settings: tuple = ()  # (what else it was built with: a reload keeps it only if unchanged)
        self.dropped = 0
        self.reported = 0
        self.last_report = 0.0

    def send(self, line: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _one_newline_off(line: bytes) -> bytes:
    # (at most one: what went before it is the line's own, binary encoders' too)
    return line[:-1] if line.endswith(b"\n") else line


class _Datagram(Logger):
    """``socket:ADDR[,PREFIX]``: PREFIX and the line as it came (uWSGI sends
    it untouched: a compressed line may end in a newline byte of its own)."""

    def __init__(self, spec: str, name: str, address: str | tuple[str, int], prefix: bytes = b""):
        super().__init__(spec, name)
        self.sender = DatagramSender(address)  # (looked up now, before the vassal's root changes)
        self.prefix = prefix

    def _packet(self, data: bytes) -> None:
        if not self.sender.send(data):  # (down, full, unreachable: never the vassal's problem)
            self.dropped += 1

    def send(self, line: bytes) -> None:
        self._packet(self.prefix + line)

    def close(self) -> None:
        self.sender.close()


class Rsyslog(_Datagram):
    MAX_PACKETS = 128  # (split: a line longer than this many packets is cut after them)

    def __init__(self, spec: str, name: str, address: str | tuple[str, int], prefix: str, priority: int,
                 packet_size: int, split: bool):
        super().__init__(spec, name, address, prefix.encode())
        self.priority = priority
        self.packet_size = packet_size
        self.split = split

    def send(self, line: bytes) -> None:
        message = _one_newline_off(line)
        head = b"<%d>%s %s: " % (self.priority, _stamp(time.time()).encode(), self.prefix)
        room = max(1, self.packet_size - 30)  # (uWSGI's message size: the packet less its header's share)
        if len(head) + min(room, len(message)) > self.packet_size:
            room = max(1, self.packet_size - len(head))
        count = min(self.MAX_PACKETS, -(-len(message) // room)) if self.split else 1
        for at in range(0, max(1, count) * room, room):
            self._packet(head + message[at:at + room])


class Syslog(_Datagram):
    """``<PRI>Mmm dd hh:mm:ss IDENT: line``, as uWSGI's openlog(IDENT, 0,
    FACILITY) and syslog(LOG_INFO) write it (no pid: no LOG_PID)."""

    def __init__(self, spec: str, name: str, ident: str, facility: int, path: str = "/dev/log"):
        super().__init__(spec, name, path)
        self.ident = ident.encode()
        self.priority = facility * 8 + 6  # (info)

    def send(self, line: bytes) -> None:
        self._packet(b"<%d>%s %s: %s" % (self.priority, _stamp(time.time()).encode(), self.ident, _one_newline_off(line)))


class File(Logger):
    """Each encoded line appended as it is (as ``logto`` writes it: a gzip
    encoder's lines make one gzip stream). Opened when the vassal starts,
    before its root changes, as the user the vassal runs as; a file that
    cannot be opened is tried again on later lines, which count as dropped."""

    def __init__(self, spec: str, name: str, path: str):
        super().__init__(spec, name)
        self.path = path
        self.fd: int | None = None
        self._open()

    def _open(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o640)
        except (OSError, ValueError):  # (ValueError: a path with a NUL in it)
            self.fd = None

    def send(self, line: bytes) -> None:
        if self.fd is None:
            self._open()
            if self.fd is None:
                self.dropped += 1
                return
        try:
            os.write(self.fd, line)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Journal(Logger):
    def __init__(self, spec: str, name: str, vassal: str):
        super().__init__(spec, name)
        self.vassal = vassal
        self.journal = journal.Journal()

    def send(self, line: bytes) -> None:
        if not self.journal.send(MESSAGE=_one_newline_off(line), PRIORITY="6", SYSLOG_IDENTIFIER="pyemperor",
                                 VASSAL=self.vassal):
            self.dropped += 1

    def close(self) -> None:
        self.journal.close()


def settings_for(spec: str, packet_size: int, split: bool, vassal: str) -> tuple:
    """The ``settings`` ``build`` would give this logger (see there)."""
    kind = parse_logger(spec)[1]
    return (packet_size, split) if kind == "rsyslog" else (vassal,) if kind == "journal" else ()


def build(spec: str, packet_size: int = 1024, split: bool = False, hostname: str | None = None,
          vassal: str = "") -> Logger:
    """The destination a ``logger`` value names (validated already). Its
    ``settings`` are what else it was made with that it uses: a reload
    keeps it only if they are unchanged."""
    logger = _build(spec, packet_size, split, hostname, vassal)
    logger.settings = settings_for(spec, packet_size, split, vassal)
    return logger


def _build(spec: str, packet_size: int, split: bool, hostname: str | None, vassal: str) -> Logger:
    name, kind, args = parse_logger(spec)
    if kind == "journal":
        return Journal(spec, name, vassal)
    if kind == "rsyslog":
        target, _, rest = args.partition(",")
        prefix, _, priority = rest.partition(",")
        return Rsyslog(spec, name, logger_address(target), prefix or f"{hostname or socket.gethostname()} uwsgi",
                       int(priority) if priority else 29, packet_size, split)
    if kind == "syslog":
        ident, _, facility = args.partition(",")
        return Syslog(spec, name, ident or "uwsgi", SYSLOG_FACILITIES[facility or "daemon"])
    if kind == "socket":
        target, _, prefix = args.partition(",")
        return _Datagram(spec, name, logger_address(target), prefix.encode())
    return File(spec, name, args)


class Fanout:
    """Every line to every logger; drops said on ``report`` at most once a
    minute per logger."""

    def __init__(self, loggers: list[Logger], say: Callable[[bytes], None]):
        self.loggers = loggers
        self.say = say

    def send(self, line: bytes) -> None:
        for logger in self.loggers:
            logger.send(line)
            if logger.dropped != logger.reported:
                self._report(logger)

    def _report(self, logger: Logger) -> None:
        now = time.monotonic()
        if now - logger.last_report < DROP_REPORT_INTERVAL and logger.reported:
            return
        logger.last_report = now
        logger.reported = logger.dropped
        self.say(f"logger {logger.spec}: destination unavailable, {logger.dropped} line(s) dropped so far\n".encode())

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
