"""``logto`` and ``log-encoder``: every line the vassal's processes write
(top, app master, workers, attached daemons) goes through one pipe read by
the top process, which encodes it and writes it to the log file (reopened on
reload and on SIGUSR2, for logrotate) or to its own stderr (the emperor).

Encoders (uWSGI 1.9.16's log encoders) run in chain order on each line,
which arrives with its trailing newline:

- ``prefix ARGS`` / ``suffix ARGS``: add text before / after the line
- ``nl``: add a newline
- ``format TEMPLATE`` / ``json TEMPLATE``: replace the line with TEMPLATE,
  where ``${msg}`` is the line without its newline, ``${msgnl}`` with it,
  ``${unix}`` the time in seconds, ``${micros}`` in microseconds and
  ``${strftime:FMT}`` the local time formatted; ``json`` escapes msg/msgnl
  for a JSON string
- ``gzip`` / ``compress``: gzip or zlib the line
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
import zlib
from collections.abc import Callable

from bedrock.config import Config
from bedrock.loop import Loop
from vassal import loggers

Encoder = Callable[[bytes], bytes]
MAX_PARTIAL = 65536  # bytes of a line without its newline kept before it is passed on
_VAR_RE = re.compile(rb"\$\{(msgnl|msg|unix|micros|strftime:[^}]*)\}")


class EncoderError(ValueError):
    pass


def _template(template: str, escape: bool) -> Encoder:
    raw = template.encode()

    def encode(line: bytes) -> bytes:
        now = time.time()
        msg = line[:-1] if line.endswith(b"\n") else line

        def sub(match: re.Match[bytes]) -> bytes:
            name = match.group(1)
            if name in (b"msg", b"msgnl"):
                value = msg if name == b"msg" else line
                if escape:
                    return json.dumps(value.decode("utf-8", "replace"))[1:-1].encode()
                return value
            if name == b"unix":
                return str(int(now)).encode()
            if name == b"micros":
                return str(int(now * 1_000_000)).encode()
            return time.strftime(name[len(b"strftime:"):].decode(), time.localtime(now)).encode()

        return _VAR_RE.sub(sub, raw)

    return encode


def build_encoder(spec: str) -> Encoder:
    name, _, args = spec.partition(" ")
    if name == "prefix":
        data = args.encode()
        return lambda line: data + line
    if name == "suffix":
        data = args.encode()
        return lambda line: line + data
    if name == "nl":
        return lambda line: line + b"\n"
    if name == "format":
        return _template(args, escape=False)
    if name == "json":
        return _template(args, escape=True)
    if name == "gzip":
        return lambda line: gzip.compress(line, mtime=0)
    if name == "compress":
        return zlib.compress
    raise EncoderError(f"unknown log encoder {name!r} (known: prefix, suffix, nl, format, json, gzip, compress)")


def chain(specs: list[str]) -> Encoder:
    encoders = [build_encoder(spec) for spec in specs]

    def encode(line: bytes) -> bytes:
        for encoder in encoders:
            line = encoder(line)
        return line

    return encode


def fanout(config: Config, say: Callable[[bytes], None], before: loggers.Fanout | None = None) -> loggers.Fanout | None:
    """The config's ``logger`` destinations (None without any). On a reload
    (``before``: the ones in use) a destination the config still names the
    same way is kept, not made again: its socket was found before the
    vassal's root changed, and a new one would look in the new root."""
    specs = config.getlist("logger")
    packet, split = config.get_int("rsyslog-packet-size"), config.get_bool("rsyslog-split-messages")
    vassal = os.path.basename(config.path)
    kept: dict[tuple, list[loggers.Logger]] = {}
    for logger in before.loggers if before is not None else ():
        kept.setdefault((logger.spec, logger.settings), []).append(logger)
    chosen = []
    for spec in specs:
        same = kept.get((spec, loggers.settings_for(spec, packet, split, vassal)))
        chosen.append(same.pop(0) if same else loggers.build(spec, packet, split, vassal=vassal))
    for left in kept.values():
        for logger in left:
            logger.close()
    return loggers.Fanout(chosen, say) if chosen else None


class LogPipe:
    def __init__(self, logto: str | None, encoders: list[str], config: Config | None = None):
        self.logto = logto
        self.encode = chain(encoders)
        self.loggers = fanout(config, self._say) if config is not None else None
        # The top process's original stderr: the emperor's log pipe, or a tty.
        self.stderr = os.dup(2)
        self.dest = self.stderr
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.read_fd, False)
        self.partial = b""
        self.reopen()

    def reopen(self) -> None:
        if self.logto is None:
            return
        fd = os.open(self.logto, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self.dest != self.stderr:
            os.close(self.dest)
        self.dest = fd

    def _say(self, data: bytes) -> None:
        """A line of our own to the log file or the emperor only (never to
        the loggers: it is about them)."""
        try:
            os.write(self.dest, self.encode(data))
        except OSError:
            pass

    def update(self, logto: str | None, encoders: list[str], config: Config | None = None) -> None:
        self.encode = chain(encoders)
        if config is not None:
            self.loggers = fanout(config, self._say, self.loggers)
        if logto != self.logto:
            self.logto = logto
            if logto is None:
                if self.dest != self.stderr:
                    os.close(self.dest)
                self.dest = self.stderr
        self.reopen()

    def child_fds(self) -> None:
        """In a forked child: stdout and stderr into the pipe."""
        os.dup2(self.write_fd, 1)
        os.dup2(self.write_fd, 2)

    def start(self, loop: Loop) -> None:
        loop.add_reader(self.read_fd, self._drain)

    def emit(self, data: bytes) -> None:
        """Whole lines (with their newline) from anywhere in the top process."""
        lines = [self.encode(line) for line in data.splitlines(keepends=True)]
        if self.loggers is not None:
            for line in lines:
                self.loggers.send(line)
        out = b"".join(lines)
        try:
            os.write(self.dest, out)
        except OSError:
            pass

    def _read(self) -> bytes:
        """What the pipe holds now (b"" when empty or closed)."""
        try:
            return os.read(self.read_fd, 65536)
        except (BlockingIOError, InterruptedError):
            return b""

    def _drain(self) -> None:
        data = self._read()
        if not data:
            return
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        if cut:
            self.emit(data[:cut])
        if len(self.partial) >= MAX_PARTIAL:
            # Output that never ends its line (a progress bar): passed on in
            # pieces, as uWSGI does each read, not held whole and copied again
            # on every read.
            self.emit(self.partial + b"\n")
            self.partial = b""

    def close(self) -> None:
        """At exit: everything still in the pipe is written out."""
        os.close(self.write_fd)
        while data := self._read():
            self.partial += data
        if self.partial:
            tail = self.partial if self.partial.endswith(b"\n") else self.partial + b"\n"
            self.partial = b""
            self.emit(tail)
