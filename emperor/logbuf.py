"""Each vassal's captured stdout/stderr: a bounded ring of lines plus the
followers (``emperorctl logs -f``) that get every new line pushed."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable

MAX_LINE = 16384
# Lines are also bounded in bytes: hundreds of vassals each keeping thousands
# of long lines would otherwise cost gigabytes.
MAX_BYTES = 1 << 20


class LogBuffer:
    def __init__(self, max_lines: int, echo: Callable[[str], None] | None = None, max_bytes: int = MAX_BYTES):
        self.lines: deque[str] = deque()
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.size = 0
        self.partial = b""
        self.followers: list[Callable[[str], bool]] = []
        self.echo = echo

    def feed(self, data: bytes) -> None:
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        if len(self.partial) > MAX_LINE:
            complete.append(self.partial)
            self.partial = b""
        for raw in complete:
            self.add(raw.decode("utf-8", "replace").rstrip("\r"))

    def flush(self) -> None:
        if self.partial:
            self.add(self.partial.decode("utf-8", "replace"))
            self.partial = b""

    def add(self, line: str) -> None:
        self.lines.append(line)
        self.size += len(line)
        while self.lines and (len(self.lines) > self.max_lines or self.size > self.max_bytes):
            self.size -= len(self.lines.popleft())
        if self.echo is not None:
            self.echo(line)
        # A follower returns False once its client is gone.
        self.followers = [f for f in self.followers if f(line)]

    def tail(self, count: int | None = None) -> list[str]:
        if count is None or count >= len(self.lines):
            return list(self.lines)
        return list(self.lines)[-count:] if count > 0 else []


def read_available(fd: int) -> bytes | None:
    """Everything readable now; None at end of file."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            if chunks:
                break
            return None
        chunks.append(chunk)
        if len(chunk) < 65536:
            break
    return b"".join(chunks)
