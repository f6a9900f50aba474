"""The gevent worker's connection socket: a send timeout that means "the
client read nothing for that long", as SO_SNDTIMEO gives the sync worker.

gevent's sendall (like CPython's since 3.5) bounds the whole call by the
socket timeout: a 16 MiB answer to a client reading steadily at 400 KiB/s
was cut after 30 s, mid-body. Here each piece gets the full timeout, so a
slow reader that keeps reading is served to the end and one that stops is
still cut after the timeout.

Imported only by the gevent worker, after fork (it imports gevent).
"""

from __future__ import annotations

import gevent.socket

PIECE = 1 << 20  # (gevent's own sendall chunk: fewer, bigger sends)


class ProgressSocket(gevent.socket.socket):
    __slots__ = ()

    @classmethod
    def adopt(cls, sock) -> ProgressSocket:
        """``sock`` (any socket object) as one of ours; ``sock`` is detached."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def accept(self):
        conn, peer = super().accept()
        return self.adopt(conn), peer

    def sendall(self, data, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            # send waits at most the timeout for room, then raises TimeoutError
            sent = self.send(view[:PIECE], flags)
            view = view[sent:]
