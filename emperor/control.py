"""The control socket (newline-delimited JSON over a unix socket, callers
identified by SO_PEERCRED) and the stats server (JSON dump on connect, like
uWSGI's). Both never block the loop: replies are buffered and written when
the client can take them; a client that stops reading is dropped."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from typing import TYPE_CHECKING

import jails
from emperor.commands import USAGE, CommandError, Peer

if TYPE_CHECKING:
    from emperor.core import Emperor

MAX_REQUEST = 65536
MAX_PENDING_OUTPUT = 16 * 1024 * 1024


class AlreadyRunning(Exception):
    pass


class Connection:
    def __init__(self, server: _Server, sock: socket.socket, peer: Peer | None):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.inbuf = b""
        self.outbuf = bytearray()
        self.close_after_flush = False
        self.closed = False
        sock.setblocking(False)

    def send(self, obj: object) -> bool:
        if self.closed:
            return False
        self.outbuf += json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"
        if len(self.outbuf) > MAX_PENDING_OUTPUT:
            self.close()
            return False
        self._flush()
        return not self.closed

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                self.server.loop.add_writer(self.sock, self._flush)
                return
            except OSError:
                self.close()
                return
            del self.outbuf[:sent]
        if not self.closed:
            self.server.loop.remove_writer(self.sock)
            if self.close_after_flush:
                self.close()

    def finish(self) -> None:
        self.close_after_flush = True
        self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.forget(self.sock)
        self.sock.close()
        self.server.connections.discard(self)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbuf += data
        while b"\n" in self.inbuf and not self.closed:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            self.server.handle(self, line)
        if len(self.inbuf) > MAX_REQUEST:
            self.send({"ok": False, "code": USAGE, "error": "request too long"})
            self.finish()


class _Server:
    def __init__(self, emperor: Emperor):
        self.emperor = emperor
        self.loop = emperor.loop
        self.sock: socket.socket | None = None
        self.connections: set[Connection] = set()

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.on_connection(conn)

    def on_connection(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def handle(self, connection: Connection, line: bytes) -> None:
        pass

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()
        if self.sock is not None:
            self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None


def peer_credentials(sock: socket.socket) -> Peer:
    pid, uid, gid = jails.backend().peer_credentials(sock)
    return Peer(uid=uid, gid=gid, pid=pid)


class ControlServer(_Server):
    def __init__(self, emperor: Emperor, path: str, mode: int):
        super().__init__(emperor)
        self.path = os.path.abspath(path)
        self.mode = mode
        self.lock_fd: int | None = None
        self.pidfile: str | None = None
        self.pidfile_fd: int | None = None
        self.owned = False

    def open(self) -> None:
        """One emperor per control socket: a lock file next to it decides,
        and a live socket at the path is refused even without the lock."""
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        self.lock_fd = _lock(self.path + ".lock")
        if self.lock_fd is None:
            raise AlreadyRunning(f"another emperor holds {self.path}")
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise AlreadyRunning(f"another emperor answers on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)  # stale, from an emperor that died
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        self.owned = True
        os.chmod(self.path, self.mode)
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock, self._accept)

    def write_pidfile(self, path: str) -> None:
        path = os.path.abspath(path)
        fd = _lock(path, truncate=False)
        if fd is None:
            raise AlreadyRunning(f"another emperor holds the pidfile {path}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.pidfile, self.pidfile_fd = path, fd

    def on_connection(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        connection = Connection(self, conn, peer)
        self.connections.add(connection)
        self.loop.add_reader(conn, connection.on_readable)

    def handle(self, connection: Connection, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("expected {\"command\": VERB, \"args\": {...}}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("'args' must be an object")
        except ValueError as exc:
            connection.send({"ok": False, "code": USAGE, "error": f"bad request: {exc}"})
            connection.finish()
            return
        assert connection.peer is not None
        try:
            result = self.emperor.execute(request["command"], args, connection.peer)
        except CommandError as exc:
            connection.send({"ok": False, "code": exc.code, "error": str(exc)})
            connection.finish()
            return
        except Exception as exc:  # a bug must not take the emperor down
            self.emperor.log(f"control command {request['command']!r} failed: {exc!r}")
            connection.send({"ok": False, "code": 1, "error": f"internal error: {exc!r}"})
            connection.finish()
            return
        connection.send({"ok": True, "result": result})
        if request["command"] == "logs" and isinstance(result, dict) and result.get("follow"):
            vassal = self.emperor.vassals.get(result["name"])
            if vassal is not None and vassal.log is not None:
                vassal.log.followers.append(lambda text, c=connection: c.send({"line": text}))
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
        if self.lock_fd is not None:
            try:
                os.unlink(self.path + ".lock")
            except OSError:
                pass
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.pidfile_fd is not None:
            try:
                os.unlink(self.pidfile)  # type: ignore[arg-type]
            except OSError:
                pass
            os.close(self.pidfile_fd)
            self.pidfile_fd = None


def _lock(path: str, truncate: bool = False) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class StatsServer(_Server):
    """``emperor-stats ADDR``: connect, get the JSON document, connection closed."""

    def __init__(self, emperor: Emperor, address: str):
        super().__init__(emperor)
        self.address = address

    def open(self) -> None:
        from vassal.sockets import bind

        listener = bind("stats", self.address, 64, 0o600)
        self.sock = listener.sock
        self.loop.add_reader(self.sock, self._accept)

    def on_connection(self, conn: socket.socket) -> None:
        connection = Connection(self, conn, None)
        self.connections.add(connection)
        try:
            body = json.dumps(self.emperor.stats_document(), default=str, indent=1).encode()
        except Exception as exc:
            body = json.dumps({"error": repr(exc)}).encode()
        connection.outbuf += body
        connection.finish()

    def close(self) -> None:
        path = self.address if self.sock is not None and self.sock.family == socket.AF_UNIX else None
        super().close()
        if path and not path.startswith("@"):
            try:
                os.unlink(path)
            except OSError:
                pass
