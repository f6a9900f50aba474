"""``rados-mount``: a Ceph pool served over HTTP, before the WSGI app (uWSGI
2.0's rados plugin, without its bugs: any mountpoint works, bodies of any
size round-trip byte for byte in chunks both ways, an empty PUT stores an
empty object).

Under a mountpoint the rest of the path is the object's name: GET and
HEAD (Content-Type by extension, Content-Length, Last-Modified; 404 for
a missing object), OPTIONS (``Dav: 1`` and ``Allow``), and with the
mount's flags PUT (201), DELETE (200) and MKCOL (a pool: 201, or 405 if
it exists; a pool name is 1-128 of A-Z a-z 0-9 _ . -, else 403); object
names are the path's bytes as UTF-8, without NUL (else 400); any other method 405,
other RADOS errors 403, an operation
past the timeout 504 (the worker is free again). A path under no mount
goes to the app (or 404 without one).

Each worker opens its own cluster connection on its first request (a
librados handle does not survive fork); the master only checks, in a
child of its own, that every mount's cluster answers and its pool exists,
so a cluster that is down fails the vassal at start with reason app-load.
"""

from __future__ import annotations

import email.utils
import errno
import mimetypes
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bedrock.config import Config
from bedrock.options import parse_bool


class Unavailable(Exception):
    """No python3-rados, or a mount's cluster or pool cannot be reached."""


PIECE = 1 << 20  # bytes one read or write asks RADOS for
WINDOW = 4  # pieces in flight at once (a memstore OSD: 1.5-2x one 4 MiB call)
DEFAULT_CONF = "/etc/ceph/ceph.conf"
POOL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # what MKCOL may create


def _import_rados():
    try:
        import rados
    except ImportError:
        raise Unavailable("rados-mount needs the python3-rados library (Debian: apt-get install python3-rados; "
                           "it is not on PyPI: make it importable from this Python)") from None
    return rados


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    pool: str
    config: str
    timeout: float
    allow_put: bool
    allow_delete: bool
    allow_mkcol: bool

    @property
    def allowed(self) -> str:
        methods = ["OPTIONS", "GET", "HEAD"]
        methods += ["PUT"] if self.allow_put else []
        methods += ["DELETE"] if self.allow_delete else []
        methods += ["MKCOL"] if self.allow_mkcol else []
        return ", ".join(methods)


def mounts_of(config: Config) -> list[Mount]:
    default_timeout = config.get_float("rados-timeout")
    mounts = []
    for fields in config.getlist("rados-mount"):
        mounts.append(Mount(
            mountpoint=fields["mountpoint"].rstrip("/") or "/", pool=fields["pool"],
            config=fields.get("config") or DEFAULT_CONF,
            timeout=float(fields["timeout"]) if "timeout" in fields else default_timeout,
            allow_put=parse_bool(fields.get("allow_put", "0")), allow_delete=parse_bool(fields.get("allow_delete", "0")),
            allow_mkcol=parse_bool(fields.get("allow_mkcol", "0"))))
    return sorted(mounts, key=lambda m: len(m.mountpoint), reverse=True)  # longest first


def _options(timeout: float) -> dict[str, str]:
    seconds = str(max(1, int(round(timeout))))
    return {"rados_osd_op_timeout": seconds, "rados_mon_op_timeout": seconds, "client_mount_timeout": seconds}


def check_clusters(mounts: list[Mount]) -> None:
    """Every mount's cluster answers and has its pool; checked in a child
    process (librados starts threads, which a forking master must not
    hold). Raises Unavailable saying which and why."""
    rados = _import_rados()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        problem = ""
        try:
            for mount in mounts:
                cluster = rados.Rados(conffile=mount.config, conf=_options(mount.timeout))
                try:
                    cluster.connect(timeout=max(1, int(mount.timeout)))
                    if not cluster.pool_exists(mount.pool):
                        problem = f"rados-mount {mount.mountpoint}: the pool {mount.pool!r} does not exist"
                        break
                finally:
                    cluster.shutdown()
        except Exception as exc:  # (any failure of the check is the answer)
            problem = f"rados-mount {mount.mountpoint}: cannot reach the cluster of {mount.config}: {exc}"
        os.write(write_fd, problem.encode()[:4000])
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        problem = pipe.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if problem:
        raise Unavailable(problem)


def _http_date(struct: time.struct_time) -> str:
    # (python3-rados gives the mtime as local time)
    return email.utils.formatdate(time.mktime(struct), usegmt=True)


class RadosServer:
    """The WSGI app in front of ``app``: mounts first, then the app."""

    def __init__(self, app: Callable | None, mounts: list[Mount]):
        self.app = app
        self.mounts = mounts
        self.rados = _import_rados()
        self.pid = -1
        self.clusters: dict[str, object] = {}
        self.ioctxs: dict[tuple[str, str], object] = {}

    def _ioctx(self, mount: Mount):
        if self.pid != os.getpid():  # (a fresh worker: nothing inherited is usable)
            self.pid, self.clusters, self.ioctxs = os.getpid(), {}, {}
        key = (mount.config, mount.pool)
        ioctx = self.ioctxs.get(key)
        if ioctx is None:
            cluster = self.clusters.get(mount.config)
            if cluster is None:
                cluster = self.rados.Rados(conffile=mount.config, conf=_options(mount.timeout))
                cluster.connect(timeout=max(1, int(mount.timeout)))
                self.clusters[mount.config] = cluster
            ioctx = self.ioctxs[key] = cluster.open_ioctx(mount.pool)
        return ioctx

    def _cluster(self, mount: Mount):
        self._ioctx(mount)
        return self.clusters[mount.config]

    def __call__(self, env: dict, start_response: Callable):
        path = env.get("PATH_INFO", "")
        for mount in self.mounts:
            point = mount.mountpoint
            if point == "/" or path == point or path.startswith(point + "/"):
                name = path[len(point):] if point != "/" else path
                return self._serve(mount, name.lstrip("/"), env, start_response)
        if self.app is None:
            return _answer(start_response, "404 Not Found")
        return self.app(env, start_response)

    def _serve(self, mount: Mount, name: str, env: dict, start_response: Callable):
        method = env.get("REQUEST_METHOD", "GET")
        rados = self.rados
        # Object names are the path's bytes (WSGI strings are latin-1) read as
        # UTF-8, as python3-rados passes names on. Others are refused, not a
        # 500 and a traceback per request: bytes that are not UTF-8 (which it
        # cannot pass), a NUL (librados would cut the name there: another object).
        try:
            key = name.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return _answer(start_response, "400 Bad Request")
        if "\0" in key:
            return _answer(start_response, "400 Bad Request")
        try:
            if method == "OPTIONS":
                return _answer(start_response, "200 OK", [("Dav", "1"), ("Allow", mount.allowed)])
            if method in ("GET", "HEAD"):
                if not key:
                    return _answer(start_response, "404 Not Found")
                ioctx = self._ioctx(mount)
                reader = None if method == "HEAD" else _Reader(ioctx, key, rados)
                size, mtime = ioctx.stat(key) if reader is None else reader.stat()
                headers = [("Content-Type", mimetypes.guess_type(key)[0] or "application/octet-stream"),
                           ("Content-Length", str(size)), ("Last-Modified", _http_date(mtime))]
                start_response("200 OK", headers)
                return [] if reader is None else reader
            if method == "PUT" and mount.allow_put and key:
                self._put(self._ioctx(mount), key, env["wsgi.input"])
                return _answer(start_response, "201 Created")
            if method == "DELETE" and mount.allow_delete and key:
                self._ioctx(mount).remove_object(key)
                return _answer(start_response, "200 OK")
            if method == "MKCOL" and mount.allow_mkcol and key:
                if not POOL_NAME.fullmatch(key):  # (a client's "../x" or "a/b/c" is no pool to make)
                    return _answer(start_response, "403 Forbidden")
                cluster = self._cluster(mount)
                if cluster.pool_exists(key):
                    return _answer(start_response, "405 Method Not Allowed", [("Allow", mount.allowed)])
                cluster.create_pool(key)
                return _answer(start_response, "201 Created")
            return _answer(start_response, "405 Method Not Allowed", [("Allow", mount.allowed)])
        except rados.ObjectNotFound:
            return _answer(start_response, "404 Not Found")
        except rados.TimedOut:
            return _answer(start_response, "504 Gateway Timeout")
        except rados.ObjectExists:
            return _answer(start_response, "405 Method Not Allowed", [("Allow", mount.allowed)])
        except rados.Error:
            return _answer(start_response, "403 Forbidden")

    def _put(self, ioctx, key: str, body) -> None:
        """The body in PIECE writes, up to WINDOW of them in flight while the
        next piece is read from the client (RADOS applies one client's
        writes to an object in order); the first replaces the object whole
        (an empty body leaves an empty object). A body cut short, or a
        write that failed, removes the object: never a half object left."""
        pending: deque = deque()
        offset = 0
        try:
            while True:
                try:
                    chunk = body.read(PIECE)
                except OSError:
                    self._discard(ioctx, key, pending)
                    raise
                if offset == 0:
                    pending.append(ioctx.aio_write_full(key, chunk or b""))
                elif chunk:
                    pending.append(ioctx.aio_write(key, chunk, offset))
                if not chunk:
                    break
                offset += len(chunk)
                while len(pending) >= WINDOW:
                    _settle(pending.popleft(), self.rados)
            while pending:
                _settle(pending.popleft(), self.rados)
        except self.rados.Error:
            self._discard(ioctx, key, pending)
            raise

    def _discard(self, ioctx, key: str, pending: deque) -> None:
        for completion in pending:
            completion.wait_for_complete_and_cb()
        pending.clear()
        try:
            ioctx.remove_object(key)
        except self.rados.Error:
            pass  # (not there, or the cluster is gone too: nothing to undo)


def _settle(completion, rados) -> int:
    """Wait for one aio operation; its error raised as the sync call would."""
    completion.wait_for_complete_and_cb()
    ret = completion.get_return_value()
    if ret < 0:
        if ret == -errno.ETIMEDOUT:
            raise rados.TimedOut(f"a RADOS operation timed out ({os.strerror(-ret)})")
        if ret == -errno.ENOENT:
            raise rados.ObjectNotFound("no such object")
        raise rados.Error(f"a RADOS operation failed: {os.strerror(-ret)}")
    return ret


class _Reader:
    """The object's bytes, PIECE at a time as the server sends them, with up
    to WINDOW reads in flight ahead of it; a failure mid-way ends the body
    (the client sees it short). The first WINDOW pieces are asked for with
    the stat, before the size is known (a round trip less: a shorter object
    answers them short or empty, and they are dropped)."""

    def __init__(self, ioctx, key: str, rados):
        self.ioctx, self.key, self.rados = ioctx, key, rados
        self.pending: deque = deque()  # (offset, completion, [data])
        self.offset = 0  # where the next read starts
        self.size = PIECE * WINDOW  # until the stat says
        self._stat: list[tuple[int, time.struct_time]] = []
        self._stat_done = ioctx.aio_stat(key, lambda _c, size, mtime: self._stat.append((size, mtime)))
        self._fill()

    def stat(self) -> tuple[int, time.struct_time]:
        try:
            _settle(self._stat_done, self.rados)
        except self.rados.Error:
            self.close()
            raise
        self.size, mtime = self._stat[0]
        while self.pending and self.pending[-1][0] >= self.size:  # (speculative reads past the object's end)
            self.pending.pop()[1].wait_for_complete_and_cb()
        self.offset = min(self.offset, self.size)
        self._fill()
        return self.size, mtime

    def _fill(self) -> None:
        while len(self.pending) < WINDOW and self.offset < self.size:
            slot: list[bytes] = []
            completion = self.ioctx.aio_read(self.key, min(PIECE, self.size - self.offset), self.offset,
                                             lambda _c, data, slot=slot: slot.append(data))
            self.pending.append((self.offset, completion, slot))
            self.offset += PIECE

    def __iter__(self) -> Iterator[bytes]:
        try:
            while self.pending:
                offset, completion, slot = self.pending.popleft()
                self._fill()
                try:
                    _settle(completion, self.rados)
                except self.rados.Error:
                    raise ConnectionResetError("the object could not be read to its end") from None
                length = min(PIECE, self.size - offset)
                data = slot[0] if slot else b""
                if len(data) < length:
                    raise ConnectionResetError("the object shrank while it was read")
                yield data if len(data) == length else data[:length]  # (grown since the stat: held to it)
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the reads still in flight (librados fills buffers they
        hold; each is bounded by the timeout)."""
        while self.pending:
            self.pending.pop()[1].wait_for_complete_and_cb()


def _answer(start_response: Callable, status: str, extra: list[tuple[str, str]] | None = None):
    body = status[4:].encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *(extra or [])])
    return [body]


def wrap(app: Callable | None, config: Config) -> Callable:
    mounts = mounts_of(config)
    check_clusters(mounts)
    return RadosServer(app, mounts)
