"""Idle keep-alive connections passed from a draining worker to a serving
one, so that a reload (or a worker's recycling) never closes a connection.

Closing an idle keep-alive connection races the client's next request: the
request is sent just as the close arrives, and a client that does not retry
sees an error. So a draining worker closes nothing it could hand over: a
connection between requests (its bytes, if any, still in the kernel's
buffer) goes over one datagram socketpair that the vassal's top process
makes before any app master, and whichever serving worker reads it first
carries on. A connection mid-request finishes on its worker first.

Every worker of every generation inherits both ends; a draining worker stops
reading. When the vassal stops (no generation to come), the top process
reads the pair instead and closes what arrives at once.
"""

from __future__ import annotations

import array
import json
import socket

# How many connections one wakeup takes (the rest wait for the next).
TAKE_BATCH = 64
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class Handover:
    def __init__(self) -> None:
        # Datagrams keep one connection per message; a socketpair's are bounded
        # by the send buffer only (not net.unix.max_dgram_qlen).
        self.send_end, self.recv_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def give(self, conn: socket.socket, kind: str, server: tuple[str, str]) -> bool | None:
        """Pass ``conn`` on: True when it went (the caller closes its own
        copy), None when the pair is full for now (keep it, try again on
        the next pass: a serving worker is taking them), False when it
        cannot go at all."""
        note = json.dumps({"k": kind, "s": list(server), "f": int(conn.family)}).encode()
        try:
            self.send_end.sendmsg([note], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))],
                                  socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return False
        return True

    def close_waiting(self) -> int:
        """The vassal is stopping, no worker takes any more: what waits in
        the pair is closed now, not when the last process holding it exits."""
        taken = self.take()
        for conn, _, _ in taken:
            conn.close()
        return len(taken)

    def take(self) -> list[tuple[socket.socket, str, tuple[str, str]]]:
        """The connections waiting now (another worker may win any of them)."""
        taken = []
        for _ in range(TAKE_BATCH):
            try:
                note, ancillary, _flags, _ = self.recv_end.recvmsg(512, _FD_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            if not fds:
                continue
            try:
                doc = json.loads(note)
                conn = socket.socket(int(doc["f"]), socket.SOCK_STREAM, 0, fds[0])
                taken.append((conn, str(doc["k"]), (str(doc["s"][0]), str(doc["s"][1]))))
            except (ValueError, KeyError, IndexError, TypeError, OSError):
                for fd in fds:
                    socket.close(fd)
                continue
            for extra in fds[1:]:
                socket.close(extra)
        return taken
