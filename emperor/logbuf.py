"""Each vassal's captured stdout/stderr: a bounded ring of lines plus the
followers (``emperorctl logs -f``) that get every new line pushed, and the
rate limit on echoing them into the emperor's own log.

A vassal can write as fast as a pipe goes (100 MB/s and more): the emperor
reads a bounded amount per loop iteration (:func:`read_available`), handles
a read's lines in bulk rather than one Python call each, and echoes only
what the vassal's token buckets allow. The ring keeps everything that fits
in it; what was not echoed is counted."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

MAX_LINE = 16384
# Lines are also bounded in bytes: hundreds of vassals each keeping thousands
# of long lines would otherwise cost gigabytes.
MAX_BYTES = 1 << 20
# One read per loop iteration: a flooding vassal's pipe is always readable,
# and reading it to the end first would starve every other fd.
READ_LIMIT = 65536

# Echo into the emperor's log, per vassal: sustained lines and bytes per
# second, and a burst (a traceback at start-up is echoed whole).
ECHO_LINES_PER_S = 100
ECHO_BYTES_PER_S = 32 * 1024
ECHO_BURST_S = 10.0
# All vassals together: many moderately chatty vassals must not flood it either.
TOTAL_LINES_PER_S = 1000
TOTAL_BYTES_PER_S = 256 * 1024
TOTAL_BURST_S = 5.0
# How often the emperor says how many lines a vassal's limit held back.
ECHO_NOTE_INTERVAL = 2.0


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens


class EchoLimit:
    """Lines and bytes per second one vassal may echo, optionally within a
    shared limit for all of them. Counts what it refused: ``not_echoed``
    since the start, ``pending`` since the emperor last said so in its log."""

    def __init__(self, lines_per_s: float, bytes_per_s: float, burst_s: float, parent: EchoLimit | None = None):
        self.lines = TokenBucket(lines_per_s, max(1.0, lines_per_s * burst_s))
        self.bytes = TokenBucket(bytes_per_s, max(float(MAX_LINE), bytes_per_s * burst_s))
        self.parent = parent
        self.not_echoed = 0
        self.pending = 0

    @classmethod
    def per_vassal(cls) -> EchoLimit:
        return cls(ECHO_LINES_PER_S, ECHO_BYTES_PER_S, ECHO_BURST_S, parent=TOTAL_ECHO)

    def admit(self, lines: list[str], now: float | None = None) -> int:
        """How many of ``lines``, from the first, may be echoed now; the
        rest are counted as not echoed. Once one line is refused the rest of
        the batch is too: the buckets are empty, and looking at each line of
        a flood would cost what the limit is there to save."""
        now = time.monotonic() if now is None else now
        line_tokens = self.lines.refill(now)
        byte_tokens = self.bytes.refill(now)
        parent = self.parent
        if parent is not None:
            line_tokens = min(line_tokens, parent.lines.refill(now))
            byte_tokens = min(byte_tokens, parent.bytes.refill(now))
        count = 0
        used = 0
        if line_tokens >= 1:
            for line in islice(lines, int(line_tokens)):
                size = len(line) + 1
                if used + size > byte_tokens:
                    break
                count += 1
                used += size
        if count:
            self.lines.tokens -= count
            self.bytes.tokens -= used
            if parent is not None:
                parent.lines.tokens -= count
                parent.bytes.tokens -= used
        refused = len(lines) - count
        if refused:
            self.not_echoed += refused
            self.pending += refused
            if parent is not None:
                parent.not_echoed += refused
        return count

    def take_pending(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


# The emperor-wide share (one emperor per process).
TOTAL_ECHO = EchoLimit(TOTAL_LINES_PER_S, TOTAL_BYTES_PER_S, TOTAL_BURST_S)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class LogBuffer:
    def __init__(self, max_lines: int, echo: Callable[[str], None] | None = None, max_bytes: int = MAX_BYTES,
                 echo_limit: EchoLimit | None = None):
        self.lines: deque[str] = deque()
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.size = 0
        self.partial = b""
        self.followers: list[Callable[[str], bool]] = []
        self.echo = echo
        self.echo_limit = echo_limit if echo_limit is not None or echo is None else EchoLimit.per_vassal()

    @property
    def not_echoed(self) -> int:
        return self.echo_limit.not_echoed if self.echo_limit is not None else 0

    def feed(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) > MAX_LINE:
                self.partial = b""
                self.add_many([_decode(data)])
            else:
                self.partial = data
            return
        self.partial = data[end + 1:]
        # One decode and one split for the whole read: "\n" never occurs
        # inside a UTF-8 sequence, so this equals decoding line by line.
        text = _decode(data[:end])
        lines = text.split("\n")
        if "\r" in text:
            lines = [line.rstrip("\r") for line in lines]
        if len(self.partial) > MAX_LINE:
            lines.append(_decode(self.partial))
            self.partial = b""
        self.add_many(lines)

    def flush(self) -> None:
        if self.partial:
            self.add(_decode(self.partial))
            self.partial = b""

    def add(self, line: str) -> None:
        self.add_many([line])

    def add_many(self, lines: list[str]) -> None:
        ring = self.lines
        ring.extend(lines)
        self.size += sum(map(len, lines))
        while ring and (len(ring) > self.max_lines or self.size > self.max_bytes):
            self.size -= len(ring.popleft())
        echo = self.echo
        if echo is not None:
            limit = self.echo_limit
            count = limit.admit(lines) if limit is not None else len(lines)
            for line in islice(lines, count):
                echo(line)
        if self.followers:
            # A follower returns False once its client is gone (or dropped).
            alive = []
            for follower in self.followers:
                for line in lines:
                    if not follower(line):
                        break
                else:
                    alive.append(follower)
            self.followers = alive

    def tail(self, count: int | None = None) -> list[str]:
        if count is None or count >= len(self.lines):
            return list(self.lines)
        return list(islice(self.lines, len(self.lines) - count, None)) if count > 0 else []


def read_available(fd: int, limit: int = READ_LIMIT) -> bytes | None:
    """What one read gets now, at most ``limit`` bytes; b"" if nothing is
    there, None at end of file. One read only: the loop comes back while the
    fd stays readable, after serving the others."""
    try:
        chunk = os.read(fd, limit)
    except (BlockingIOError, InterruptedError):
        return b""
    return chunk if chunk else None
