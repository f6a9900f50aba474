"""What each worker is doing, in memory shared by the app master and its
workers (an anonymous mmap made before the workers fork): when the current
request started and which request it is, for harakiri and stats."""

from __future__ import annotations

import mmap
import struct
import time

_SLOT = struct.Struct("dQ240s")  # started (0: idle), requests served, request line


_COUNT = struct.Struct("Q")  # accepts that found nothing (a thundering herd's wakeups)


class Scoreboard:
    def __init__(self, workers: int):
        self.workers = workers
        self.memory = mmap.mmap(-1, (_SLOT.size + _COUNT.size) * max(1, workers))
        self._counts = _SLOT.size * max(1, workers)

    def raced(self, index: int) -> None:
        """Written by the worker alone, read by the master."""
        offset = self._counts + index * _COUNT.size
        _COUNT.pack_into(self.memory, offset, _COUNT.unpack_from(self.memory, offset)[0] + 1)

    def races(self, index: int) -> int:
        return _COUNT.unpack_from(self.memory, self._counts + index * _COUNT.size)[0]

    def begin(self, index: int, line: str, requests: int) -> None:
        _SLOT.pack_into(self.memory, index * _SLOT.size, time.time(), requests, line.encode("utf-8", "replace")[:240])

    def end(self, index: int, requests: int) -> None:
        _SLOT.pack_into(self.memory, index * _SLOT.size, 0.0, requests, b"")

    def read(self, index: int) -> tuple[float, int, str]:
        started, requests, line = _SLOT.unpack_from(self.memory, index * _SLOT.size)
        return started, requests, line.rstrip(b"\0").decode("utf-8", "replace")

    def clear(self, index: int) -> None:
        _SLOT.pack_into(self.memory, index * _SLOT.size, 0.0, 0, b"")
        _COUNT.pack_into(self.memory, self._counts + index * _COUNT.size, 0)
