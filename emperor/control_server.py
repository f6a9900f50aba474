"""The control socket (newline-delimited JSON over a unix socket, callers
identified by SO_PEERCRED) and the stats server (JSON dump on connect, like
uWSGI's). Both never block the loop: replies are buffered and written when
the client can take them.

Any local user can reach a 666 control socket, so what a client can make the
emperor hold is bounded (issue 10): one request per connection, at most
MAX_REQUEST bytes, sent within REQUEST_TIMEOUT; a reply nobody reads is
dropped after STALL_TIMEOUT; a ``logs -f`` client more than FOLLOW_BUFFER
behind (or any, when all buffers together pass TOTAL_OUTPUT) is dropped
with a final note; each uid but root has at most MAX_PER_UID connections.
Out of file descriptors, accepting pauses instead of spinning, and a
reserve fd still lets root in, at the expense of another user's
connection."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import time
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING

import jails
from bedrock.sockets import bind, recv_or_eof
from emperor import untrusted
from emperor.commands import USAGE, CommandError, Peer
from emperor.names import printable
from emperor.singleton import SingleInstance

if TYPE_CHECKING:
    from bedrock.loop import Timer
    from emperor.core import Emperor

MAX_REQUEST = 65536
# A request is {"command": VERB, "args": {"names": [...]}}: three levels.
MAX_REQUEST_DEPTH = 8
# Seconds a new connection has to send its request line.
REQUEST_TIMEOUT = 5.0
# Seconds pending output may sit without the client taking a byte of it.
STALL_TIMEOUT = 30.0
# Seconds a dropped follower gets to read its final note.
DROP_GRACE = 5.0
# Unsent log lines one follower may have before it is dropped.
FOLLOW_BUFFER = 256 * 1024
# Unsent output of all connections together beyond which followers are dropped.
TOTAL_OUTPUT = 32 * 1024 * 1024
# Connections per uid (root and the emperor's own user are exempt), and of
# all such uids together (lowered to a quarter of RLIMIT_NOFILE).
MAX_PER_UID = 32
MAX_UNPRIVILEGED = 512
# Connections taken per wakeup of the listening socket (a connect storm
# must not starve the rest of the loop), and the pause when out of fds.
ACCEPTS_PER_WAKEUP = 64
ACCEPT_PAUSE = 0.1
# Other users' connections closed to let root in when out of fds.
SHED_FOR_ROOT = 4

# Connection states.
REQUEST = "request"  # waiting for the request line
REPLIED = "replied"  # the reply is being written, then the connection closes
FOLLOWING = "following"  # logs -f: lines are pushed until the client goes
DROPPED = "dropped"  # a follower that fell behind: final note, then closed
CLOSED = "closed"

OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Errors of one pending connection, not of the listening socket.
TRANSIENT_ACCEPT = (errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EPERM)


class Connection:
    def __init__(self, server: _Server, sock: socket.socket, peer: Peer | None):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.inbuf = b""
        self.outbuf = bytearray()
        self.state = REQUEST
        self.close_after_flush = False
        self.writing = False
        now = time.monotonic()
        self.opened = now
        self.progress = now
        self.timer: Timer | None = None
        sock.setblocking(False)
        self._arm(REQUEST_TIMEOUT)

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    @property
    def limited_uid(self) -> int | None:
        """The uid whose connection cap this counts against (None: exempt)."""
        return None if self.peer is None or self.peer.privileged else self.peer.uid

    # --- output --------------------------------------------------------------
    def send(self, obj: object) -> bool:
        """Queue a reply; replies are not capped (their size is the
        emperor's own doing), only the time nobody reads them."""
        if self.closed:
            return False
        self._queue(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
        return not self.closed

    def send_bytes(self, data: bytes) -> None:
        if not self.closed:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        self.outbuf += data
        self.server.pending += len(data)
        if not self.writing:
            self._flush()

    def push_line(self, text: str) -> bool:
        """A follower's new log line; False once this follower is gone, so
        the log buffer forgets it. Written when the loop next finds the
        socket writable, so a burst of lines costs one send, not one each."""
        if self.state != FOLLOWING:
            return False
        if len(self.outbuf) >= FOLLOW_BUFFER:
            self.drop(f"more than {FOLLOW_BUFFER // 1024} KiB of log lines unread")
            return False
        if self.server.pending >= TOTAL_OUTPUT and self.outbuf:
            # Those behind go first; one that has read everything gets its line.
            self.drop("the emperor's output buffers for all clients are full")
            return False
        data = ('{"line":' + encode_basestring_ascii(text) + "}\n").encode()
        self.outbuf += data
        self.server.pending += len(data)
        self._want_write(True)
        return True

    def drop(self, why: str) -> None:
        """A follower that does not keep up: a final note after what it
        has not read yet, a short grace to read it, then closed."""
        if self.state != FOLLOWING:
            return
        self.state = DROPPED
        self.server.dropped += 1
        self.close_after_flush = True
        self._queue(json.dumps({"note": f"dropped by the emperor: {why}; run logs -f again to resume"}).encode() + b"\n")
        if not self.closed:
            self._arm(DROP_GRACE)

    def _want_write(self, wanted: bool) -> None:
        if wanted != self.writing and not self.closed:
            self.writing = wanted
            if wanted:
                self.server.loop.add_writer(self.sock, self._flush)
            else:
                self.server.loop.remove_writer(self.sock)

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                self._want_write(True)
                return
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]
            self.server.pending -= sent
            self.progress = time.monotonic()
        if not self.closed:
            self._want_write(False)
            if self.close_after_flush:
                self.close()

    def finish(self) -> None:
        self.close_after_flush = True
        self._flush()
        if not self.closed:
            self._arm(STALL_TIMEOUT)

    def close(self) -> None:
        if self.closed:
            return
        self.state = CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.pending -= len(self.outbuf)
        self.outbuf = bytearray()
        self.inbuf = b""
        self.server.loop.forget(self.sock)
        self.sock.close()
        self.server.discard(self)

    # --- deadlines ---------------------------------------------------------------
    def _arm(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(delay, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = time.monotonic()
        if self.state == REQUEST:
            left = self.opened + REQUEST_TIMEOUT - now
            if left <= 0:
                self.state = REPLIED
                self.send({"ok": False, "code": USAGE, "error": f"no request line within {REQUEST_TIMEOUT:.0f}s"})
                self.close()
                return
        elif self.state == DROPPED:
            self.close()
            return
        elif self.outbuf:
            left = self.progress + STALL_TIMEOUT - now
            if left <= 0:
                self.close()  # nobody reads it
                return
        else:
            left = STALL_TIMEOUT  # a quiet follower: nothing to check until there is output
        self._arm(left)

    # --- input -------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            self._read()
        except Exception as exc:  # costs this connection, never the emperor
            self.server.complain(("read", type(exc).__name__), f"control connection failed: {exc!r}")
            self.close()

    def _read(self) -> None:
        want = MAX_REQUEST + 1 - len(self.inbuf) if self.state == REQUEST else 4096
        data = recv_or_eof(self.sock, max(1, want))
        if data is None:
            return
        if not data:
            if self.state in (REPLIED, DROPPED) and self.outbuf:
                # Half-closed after its request: it may still read the reply.
                self.server.loop.remove_reader(self.sock)
                return
            self.close()
            return
        if self.state != REQUEST:
            return  # one request per connection: what follows means nothing
        end = data.find(b"\n")
        if end < 0:
            self.inbuf += data
            if len(self.inbuf) > MAX_REQUEST:
                self.state = REPLIED
                self.inbuf = b""
                self.send({"ok": False, "code": USAGE, "error": f"request too long (more than {MAX_REQUEST} bytes)"})
                self.finish()
            return
        line = self.inbuf + data[:end]
        self.inbuf = b""
        self.state = REPLIED
        self.server.handle(self, line)

    def follow(self) -> None:
        self.state = FOLLOWING
        self._arm(STALL_TIMEOUT)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _Server:
    def __init__(self, emperor: Emperor):
        self.emperor = emperor
        self.loop = emperor.loop
        self.sock: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.pending = 0  # bytes queued on all connections
        self.by_uid: dict[int, int] = {}
        self.limited = 0  # connections counted against a uid's cap
        self.refused = 0
        self.dropped = 0
        self.reserve_fd: int | None = None
        self.paused: Timer | None = None
        try:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (OSError, ValueError):
            soft = 1024
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        self.max_limited = max(MAX_PER_UID, min(MAX_UNPRIVILEGED, soft // 4))

    def _listen(self, sock: socket.socket) -> None:
        self.sock = sock
        # One fd kept spare: out of fds, it is closed to accept (and answer)
        # one waiting client instead of leaving them all hanging.
        self.reserve_fd = _open_reserve()
        self.loop.add_reader(sock, self._accept)

    def complain(self, key: tuple, message: str) -> None:
        """Log a problem caused from outside once per kind, not per client."""
        if untrusted.first_time((type(self).__name__, *key)):
            self.emperor.log(f"{message} (logged once)")

    def add(self, connection: Connection) -> None:
        self.connections.add(connection)
        uid = connection.limited_uid
        if uid is not None:
            self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
            self.limited += 1

    def discard(self, connection: Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        uid = connection.limited_uid
        if uid is not None:
            self.limited -= 1
            left = self.by_uid.get(uid, 1) - 1
            if left > 0:
                self.by_uid[uid] = left
            else:
                self.by_uid.pop(uid, None)

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.sock is None:
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT_ACCEPT:
                    continue
                self._pause()
                if exc.errno in OUT_OF_FDS:
                    self.complain(("accept", exc.errno), f"out of file descriptors accepting control connections ({exc.strerror}): pausing, root still admitted")
                    self._accept_with_reserve()
                else:
                    self.complain(("accept", exc.errno), f"accept failed ({exc.strerror}): pausing")
                return
            try:
                self.on_connection(conn)
            except Exception as exc:  # one client's bad luck, never the emperor's
                self.complain(("connection", type(exc).__name__), f"control connection failed: {exc!r}")
                conn.close()

    def _pause(self) -> None:
        """Stop watching the listening socket for a moment: level-triggered,
        it stays readable while we cannot accept, and would spin the loop."""
        if self.paused is None and self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self.paused = None
        if self.reserve_fd is None:
            self.reserve_fd = _open_reserve()
        if self.sock is not None:
            self.loop.add_reader(self.sock, self._accept)

    def _accept_with_reserve(self) -> None:
        """Answer (a few of) the waiting clients through the reserve fd,
        so that none hangs until its own timeout."""
        for _ in range(ACCEPTS_PER_WAKEUP // 4):
            if self.reserve_fd is None or self.sock is None:
                return
            os.close(self.reserve_fd)
            self.reserve_fd = None
            try:
                conn, _ = self.sock.accept()
            except OSError:
                conn = None
            if conn is not None:
                try:
                    self.overflow(conn)
                except Exception as exc:
                    self.complain(("overflow", type(exc).__name__), f"control connection failed: {exc!r}")
                    conn.close()
            self.reserve_fd = _open_reserve()
            if conn is None:
                return

    def overflow(self, conn: socket.socket) -> None:
        """A client accepted on the reserve fd: told why, and closed."""
        _refuse(conn, "the emperor is out of file descriptors; try again shortly")

    def shed(self) -> bool:
        """Close the oldest connection of the uid holding the most, to make
        room for root's."""
        if not self.by_uid:
            return False
        uid = max(self.by_uid, key=lambda u: self.by_uid[u])
        victims = [c for c in self.connections if c.limited_uid == uid]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.opened)
        if victim.state == FOLLOWING:
            victim.drop("the emperor is out of file descriptors")
        victim.close()
        return True

    def on_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def handle(self, connection: Connection, line: bytes) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"connections": len(self.connections), "pending_bytes": self.pending,
                "refused": self.refused, "followers_dropped": self.dropped}

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        if self.reserve_fd is not None:
            os.close(self.reserve_fd)
            self.reserve_fd = None
        if self.sock is not None:
            self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None


def _refuse(conn: socket.socket, error: str, code: int = 1) -> None:
    """One error line if the socket takes it now, then closed: nothing of a
    refused client is kept."""
    try:
        conn.setblocking(False)
        conn.send(json.dumps({"ok": False, "code": code, "error": error}, separators=(",", ":")).encode() + b"\n")
    except OSError:
        pass
    conn.close()


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = jails.backend().peer_credentials(sock)
    return Peer(uid=uid, gid=gid, pid=pid)


class ControlServer(_Server):
    def __init__(self, emperor: Emperor, path: str, mode: int):
        super().__init__(emperor)
        self.path = os.path.abspath(path)
        self.mode = mode
        self.instance = SingleInstance(self.path)
        self.owned = False

    def open(self) -> None:
        """One emperor per control socket: a lock file next to it decides,
        and a live socket at the path is refused even without the lock."""
        self.instance.acquire()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        self.owned = True
        os.chmod(self.path, self.mode)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        self._listen(sock)

    def on_connection(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if not peer.privileged:
            held = self.by_uid.get(peer.uid, 0)
            if held >= MAX_PER_UID or self.limited >= self.max_limited:
                self.refused += 1
                if held >= MAX_PER_UID:
                    why = f"too many control connections (uid {peer.uid} has {held} open, at most {MAX_PER_UID})"
                else:
                    why = f"too many control connections ({self.limited} of users other than root open, at most {self.max_limited})"
                self.complain(("cap", peer.uid), f"refusing control connections: {why}")
                _refuse(conn, why)
                return
        connection = Connection(self, conn, peer)
        self.add(connection)
        self.loop.add_reader(conn, connection.on_readable)

    def overflow(self, conn: socket.socket) -> None:
        """Out of fds: root's client is served, in the place of another
        user's connection (none of which may keep root out)."""
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        # Root's command needs a few fds of its own (status reads /proc).
        if peer.privileged and sum(self.shed() for _ in range(SHED_FOR_ROOT)):
            connection = Connection(self, conn, peer)
            self.add(connection)
            self.loop.add_reader(conn, connection.on_readable)
            return
        _refuse(conn, "the emperor is out of file descriptors; try again shortly")

    def handle(self, connection: Connection, line: bytes) -> None:
        try:
            request = untrusted.loads(line, max_bytes=MAX_REQUEST, max_depth=MAX_REQUEST_DEPTH)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("expected {\"command\": VERB, \"args\": {...}}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("'args' must be an object")
        except (ValueError, RecursionError) as exc:
            connection.send({"ok": False, "code": USAGE, "error": f"bad request: {exc}"})
            connection.finish()
            return
        assert connection.peer is not None
        command = request["command"]
        try:
            result = self.emperor.execute(command, args, connection.peer)
        except CommandError as exc:
            connection.send({"ok": False, "code": exc.code, "error": str(exc)})
            connection.finish()
            return
        except Exception as exc:  # a bug must not take the emperor down
            self.complain(("command", command[:32], type(exc).__name__), f"control command {printable(command[:32])!r} failed: {exc!r}")
            connection.send({"ok": False, "code": 1, "error": f"internal error: {exc!r}"})
            connection.finish()
            return
        connection.send({"ok": True, "result": result})
        if command == "logs" and isinstance(result, dict) and result.get("follow") and not connection.closed:
            vassal = self.emperor.vassals.get(result["name"])
            if vassal is not None and vassal.log is not None:
                connection.follow()
                vassal.log.followers.append(connection.push_line)
                return
        connection.finish()

    def close(self) -> None:
        super().close()
        if self.owned:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.owned = False
        self.instance.release()


class StatsServer(_Server):
    """``emperor-stats ADDR``: connect, get the JSON document, connection closed."""

    def __init__(self, emperor: Emperor, address: str):
        super().__init__(emperor)
        self.address = address

    def open(self) -> None:
        listener = bind("stats", self.address, 64, 0o600)
        self._listen(listener.sock)

    def on_connection(self, conn: socket.socket) -> None:
        from emperor.commands.stats import document

        connection = Connection(self, conn, None)
        self.add(connection)
        connection.state = REPLIED
        try:
            body = json.dumps(document(self.emperor), default=str, indent=1).encode()
        except Exception as exc:
            body = json.dumps({"error": repr(exc)}).encode()
        connection.send_bytes(body)
        connection.finish()

    def close(self) -> None:
        path = self.address if self.sock is not None and self.sock.family == socket.AF_UNIX else None
        super().close()
        if path and not path.startswith("@"):
            try:
                os.unlink(path)
            except OSError:
                pass
