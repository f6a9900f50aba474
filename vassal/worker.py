"""A pre-forked worker: accepts on the shared listening sockets and serves
keep-alive connections one request at a time.

Idle keep-alive connections wait in the selector, so a client that keeps a
connection open does not hold the worker. SIGTERM means drain: stop
accepting, finish the request in hand, close idle connections, exit.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable

from vassal.http import HttpConnection
from vassal.log import log
from vassal.sockets import Listener
from vassal.uwsgiproto import UwsgiConnection

# Seconds a draining worker waits for a just-accepted connection's first request.
DRAIN_FIRST_REQUEST = 5.0
ACCEPT_BATCH = 16
# A client that does not read its response for this long is dropped.
SEND_TIMEOUT = struct.pack("ll", 60, 0)


class Worker:
    def __init__(
        self,
        index: int,
        listeners: list[Listener],
        app: Callable,
        notify_fd: int,
        *,
        max_head: int,
        max_body: int,
        keepalive: int,
        max_requests: int,
        scoreboard=None,
        access_log: bool = True,
        memory_report: bool = False,
    ):
        self.index = index
        self.listeners = listeners
        self.app = app
        self.notify_fd = notify_fd
        self.max_head = max_head
        self.max_body = max_body
        self.keepalive = keepalive
        self.max_requests = max_requests
        self.requests = 0
        self.scoreboard = scoreboard
        self.access_log = access_log
        self.memory_report = memory_report
        if scoreboard is not None:
            self.app = self._recorded(app)
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.last_seen: dict[socket.socket, float] = {}
        self.handlers: dict[socket.socket, object] = {}
        self.served: dict[socket.socket, int] = {}
        self.registered: set[socket.socket] = set()

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _recorded(self, app: Callable) -> Callable:
        """The app, with each request's start written to the scoreboard."""
        index = self.index - 1

        def recorded(environ, start_response):
            line = f"{environ.get('REQUEST_METHOD', '?')} {environ.get('REQUEST_URI') or environ.get('PATH_INFO', '')}"
            self.scoreboard.begin(index, line, self.requests)
            return app(environ, start_response)

        return recorded

    def _served(self, line: str = "") -> None:
        if self.access_log and line:
            if self.memory_report:
                line += f" rss={_rss_mb()}MB"
            log(line)
        self.requests += 1
        if self.scoreboard is not None:
            self.scoreboard.end(self.index - 1, self.requests)
        if self.requests == 1:
            try:
                os.write(self.notify_fd, b"L")
            except OSError:
                pass
        if self.max_requests and self.requests >= self.max_requests:
            log(f"worker {self.index}: max-requests {self.max_requests} reached, recycling")
            self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        # The handler only sets a flag; the wakeup pipe ends the select at once.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        for listener in self.listeners:
            self.selector.register(listener.sock, selectors.EVENT_READ, listener)
        draining_since = None
        while True:
            if self.stopping and draining_since is None:
                # Drain: stop accepting (the next master's workers take new
                # connections from the same sockets), finish what is in hand.
                draining_since = time.monotonic()
                for listener in self.listeners:
                    self.selector.unregister(listener.sock)
            if draining_since is not None:
                self._close_drained(draining_since)
                if not self.last_seen:
                    break
            try:
                events = self.selector.select(0.2 if draining_since is not None else 1.0)
            except InterruptedError:
                continue
            for key, _ in events:
                if key.data is None:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif isinstance(key.data, Listener):
                    # Several per wakeup: a burst of short connections (nginx's
                    # uwsgi upstream) otherwise costs an epoll round each.
                    for _ in range(ACCEPT_BATCH):
                        if self.stopping or not self._accept(key.data):
                            break
                else:
                    self._read(key.fileobj, key.data)  # type: ignore[arg-type]
            self._expire_idle()
        for conn in list(self.last_seen):
            self._close(conn)

    def _close_drained(self, since: float) -> None:
        """While draining, a keep-alive connection between requests is closed
        (clients retry such requests); one accepted but not yet sent its first
        request is given DRAIN_FIRST_REQUEST seconds to do so."""
        late = time.monotonic() - since > DRAIN_FIRST_REQUEST
        for conn, handler in list(self.handlers.items()):
            if handler.idle and (self.served.get(conn, 0) > 0 or late):
                self._close(conn)

    def _accept(self, listener: Listener) -> bool:
        try:
            conn, peer = listener.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False  # another worker won the race
        # Blocking with a kernel send timeout: sendall is then one syscall, not
        # a poll per chunk as with a Python-level timeout; reads never block
        # (MSG_DONTWAIT, after readiness).
        conn.setblocking(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SEND_TIMEOUT)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = UwsgiConnection if listener.kind == "uwsgi" else HttpConnection
        handler = kind(
            conn,
            peer or "unix",
            listener.server,
            self.app,
            max_head=self.max_head,
            max_body=self.max_body,
            on_request=self._served,
        )
        self.last_seen[conn] = time.monotonic()
        self.handlers[conn] = handler
        # Most clients send the request right after connecting: answer it
        # before paying for a selector registration (nginx's uwsgi upstream
        # connections then never need one).
        self._read(conn, handler)
        if conn in self.handlers:
            self.selector.register(conn, selectors.EVENT_READ, handler)
            self.registered.add(conn)
        return True

    def _read(self, conn: socket.socket, handler: HttpConnection) -> None:
        try:
            data = conn.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        try:
            keep = handler.feed(data)
        except OSError:
            keep = False
        except Exception:
            log(f"worker {self.index}: unexpected error:\n{traceback.format_exc().rstrip()}")
            keep = False
        if keep:
            self.last_seen[conn] = time.monotonic()
            if handler.idle:  # a whole request was answered
                self.served[conn] = self.served.get(conn, 0) + 1
        else:
            self._close(conn)

    def _expire_idle(self) -> None:
        if not self.last_seen:
            return
        deadline = time.monotonic() - self.keepalive
        for conn, seen in list(self.last_seen.items()):
            if seen < deadline:
                self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.last_seen.pop(conn, None)
        self.handlers.pop(conn, None)
        self.served.pop(conn, None)
        if conn in self.registered:
            # (Only then: a failed unregister formats the socket's repr, which is slow.)
            self.registered.discard(conn)
            self.selector.unregister(conn)
        conn.close()


def _rss_mb() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1048576
    except (OSError, ValueError, IndexError):
        return 0
