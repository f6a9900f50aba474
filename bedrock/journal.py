"""systemd-journald's native protocol: one datagram of fields per entry on
/run/systemd/journal/socket (sd_journal_send's wire format), so entries
carry fields (PRIORITY=, VASSAL=...) that a line on stderr cannot.

Never blocks: a journal that is full or gone makes ``send`` return False
and the caller falls back or counts a drop. The socket is connected when
the Journal is made (bedrock.datagram), so a vassal that pivots its root
away still reaches it."""

from __future__ import annotations

import os
import struct

from bedrock.datagram import DatagramSender

SOCKET = "/run/systemd/journal/socket"
MAX_VALUE = 48 * 1024  # (a datagram of fields stays well under the socket's limit)


def encode(fields: dict[str, str | bytes]) -> bytes:
    """``KEY=value`` lines; a value holding a newline in the binary form
    (KEY, newline, 64-bit little-endian length, value, newline)."""
    out = []
    for key, value in fields.items():
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        data = data[:MAX_VALUE]
        name = key.encode()
        if b"\n" in data:
            out.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            out.append(name + b"=" + data + b"\n")
    return b"".join(out)


class Journal(DatagramSender):
    def __init__(self, path: str = SOCKET):
        super().__init__(path)

    def send(self, **fields: str | bytes) -> bool:  # type: ignore[override]
        return super().send(encode(fields))


def stderr_is_journal() -> bool:
    """Whether our stderr is a stream systemd connected to the journal
    (JOURNAL_STREAM names its device:inode), the sign to speak the native
    protocol instead (systemd.exec(5))."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))
