"""Request bodies: in memory while small, then spooled to an anonymous file.

The file is opened with O_TMPFILE where the filesystem supports it: it has
no name, so nothing is left behind when a worker is killed mid-request.
Elsewhere (tmpfs without O_TMPFILE, other kernels) ``tempfile`` is used.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import BinaryIO

SPOOL_THRESHOLD = 1 << 20  # bytes kept in memory before spooling to a file


def open_tmpfile(directory: str | None = None) -> BinaryIO:
    directory = directory or tempfile.gettempdir()
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return os.fdopen(fd, "w+b")
        except OSError:
            pass  # EOPNOTSUPP / EISDIR on filesystems without O_TMPFILE
    return tempfile.TemporaryFile(dir=directory)


class BodySpool:
    """A write-then-read buffer that moves to a file past ``threshold``."""

    def __init__(self, threshold: int = SPOOL_THRESHOLD):
        self.threshold = threshold
        self.file: BinaryIO = io.BytesIO()
        self.size = 0
        self.spooled = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if not self.spooled and self.size > self.threshold:
            spool = open_tmpfile()
            spool.write(self.file.getvalue())  # type: ignore[attr-defined]
            self.file = spool
            self.spooled = True
        self.file.write(data)

    def finish(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()
