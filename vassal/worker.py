"""A pre-forked worker: accepts on the shared listening sockets and serves
keep-alive connections one request at a time.

Idle keep-alive connections wait in the poller, so a client that keeps a
connection open does not hold the worker. SIGTERM means drain: stop
accepting, finish the request in hand, hand idle connections to a serving
worker (vassal.handover), exit.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable

import jails
from bedrock.log import log
from bedrock.proc import default_signals
from bedrock.sockets import Listener
from jails.locks import FcntlLock, LockError, SysvSemaphore
from vassal import fdconn
from vassal.handover import Handover
from vassal.http import DONOTLOG, HttpConnection, _Response, access_line
from vassal.http_parser import Limits
from vassal.spool import BodyPace
from vassal.uwsgi_api import Runtime
from vassal.uwsgiproto import UwsgiConnection, env_defaults, respond_whole

# Seconds a draining worker waits for a just-accepted connection's first request.
DRAIN_FIRST_REQUEST = 5.0
HANDOVER = object()  # the poller's tag for the handover socket
SIGNAL_QUEUE = object()  # ... and for a uwsgi signal queue
LINGER_SECONDS = 5.0  # reading what a refused client still sends
ACCEPT_PAUSE = 1.0  # out of fds: seconds without accepting
TURN_RETRY = 0.05  # thunder-lock: a worker with connections tries the lock at most this often

Conn = socket.socket | fdconn.FdConnection


class _WakeUp(Exception):
    """A stop signal while waiting for the thunder lock."""


class _Discard:
    """A lingering connection's reader: everything is dropped until EOF."""

    idle = False

    def feed(self, data: bytes) -> bool:
        return bool(data)
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
        http_limits: Limits | None = None,
        handover: Handover | None = None,
        head_timeout: float = 30.0,
        max_requests: int,
        scoreboard=None,
        access_log: bool = True,
        memory_report: bool = False,
        lock: FcntlLock | SysvSemaphore | None = None,
        runtime: Runtime | None = None,
    ):
        self.index = index
        self.listeners = listeners
        self.app = app
        self.notify_fd = notify_fd
        self.max_head = max_head
        self.max_body = max_body
        self.http_limits = http_limits or Limits(head=max_head, body=max_body)
        self.handover = handover
        self.head_timeout = head_timeout
        self.origin: dict[socket.socket, tuple[str, tuple[str, str]]] = {}  # conn -> (kind, server), to hand it over
        self.head_since: dict[socket.socket, float] = {}  # conn -> when its unfinished head began
        self.lingering: dict[socket.socket, float] = {}  # conn -> when to stop draining it
        # conn -> (its pace, when its body's last bytes came): a body this
        # loop reads (not yet the app's) is held to the stall and rate rules
        # of a streamed one; else a byte per keep-alive timeout held its
        # room in the spool budget, and its memory, for ever.
        self.body_pace: dict[Conn, tuple[BodyPace, float, float]] = {}  # (+ self.feeding then)
        # Seconds spent in handlers' feed (apps run there): while this loop
        # is in an app, a client waiting to be read is not the one waiting.
        self.feeding = 0.0
        self.accept_paused_until: float | None = None
        self.keepalive = keepalive
        self.max_requests = max_requests
        self.requests = 0
        self.scoreboard = scoreboard
        self.access_log = access_log
        self.memory_report = memory_report
        if scoreboard is not None:
            self.app = self._recorded(app)
        self.stopping = False
        # thunder-lock: the listeners are watched only by the worker whose
        # turn it is (it holds the lock); without one, by every worker.
        self.lock = lock
        self.runtime = runtime
        self.signal_queues: dict[int, socket.socket] = {}
        self.listening = False
        self.waiting_on_lock = False
        self.next_try = 0.0  # with connections of our own: when to try the lock next
        self.poller = Poller()
        # A connection is a socket (http-socket) or a bare fd (uwsgi socket).
        self.last_seen: dict[Conn, float] = {}
        self.handlers: dict[Conn, object] = {}
        self.served: dict[Conn, int] = {}
        self.registered: set[Conn] = set()
        self.listener_info: dict[socket.socket, tuple[type, int, tuple[str, str]]] = {}

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.waiting_on_lock:
            raise _WakeUp  # out of the lock wait (a plain handler would have it retried)

    def _watch_listeners(self, on: bool) -> None:
        if on == self.listening:
            return
        for listener in self.listeners:
            if on:
                self.poller.register(listener.sock.fileno(), listener)
            else:
                self.poller.unregister(listener.sock.fileno())
        self.listening = on

    def _take_turn(self) -> None:
        """thunder-lock: wait for our turn to accept (only while we have no
        connection of our own: one that does must never sit on the lock),
        else just try."""
        assert self.lock is not None
        blocking = not self.last_seen
        try:
            # (inside the try: a stop signal right after this raises _WakeUp)
            self.waiting_on_lock = blocking
            if self.stopping:
                return
            got = self.lock.acquire(blocking)
        except _WakeUp:
            got = False
        except LockError as exc:
            self._lock_lost(exc)
            return
        finally:
            self.waiting_on_lock = False
        if got and (self.stopping or self.accept_paused_until is not None):
            self.lock.release()
        elif got:
            self._watch_listeners(True)

    def _raced(self) -> None:
        """Woken for a connection another worker took: the thundering herd
        that thunder-lock prevents, counted for status."""
        if self.scoreboard is not None:
            self.scoreboard.raced(self.index - 1)

    def _pass_turn(self) -> None:
        """Accepted, or something of our own to serve: the next worker's turn."""
        if self.lock is not None and self.listening:
            self._watch_listeners(False)
            # A waiting worker gets the next turn, not us again at once.
            self.next_try = time.monotonic() + TURN_RETRY
            try:
                self.lock.release()
            except LockError as exc:
                self._lock_lost(exc)

    def _lock_lost(self, exc: LockError) -> None:
        """The semaphore was removed under us: what we hold is served, then
        this worker exits and the master respawns it on a new one."""
        log(f"worker {self.index}: {exc}; finishing its connections, then exiting to be respawned")
        self.lock = None
        self.stopping = True

    def _recorded(self, app: Callable) -> Callable:
        """The app, with each request's start written to the scoreboard."""
        index = self.index - 1

        def recorded(environ, start_response):
            line = f"{environ.get('REQUEST_METHOD', '?')} {environ.get('REQUEST_URI') or environ.get('PATH_INFO', '')}"
            self.scoreboard.begin(index, line, self.requests)
            return app(environ, start_response)

        return recorded

    def _served(self, env: dict, response: _Response, started: float) -> None:
        if self.access_log and DONOTLOG not in env:
            line = access_line(env, response, started)
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
        if self.max_requests and self.requests >= self.max_requests and not self.stopping:
            log(f"worker {self.index}: max-requests {self.max_requests} reached, recycling")
            self.stopping = True

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_term)
        default_signals(signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
        # The handler only sets a flag; the wakeup pipe ends the select at once.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.poller.register(wake_r, None)
        self._watch_listeners(self.lock is None)
        batch = ACCEPT_BATCH if self.lock is None else 1  # (one accept per turn)
        if self.handover is not None:
            self.poller.register(self.handover.recv_end.fileno(), HANDOVER)
        if self.runtime is not None:
            for queue in self.runtime.worker_queues():
                self.signal_queues[queue.fileno()] = queue
                self.poller.register(queue.fileno(), SIGNAL_QUEUE)
        clock = self.runtime is not None and self.runtime.router is not None  # one worker, no master: the clock is ours
        draining_since = None
        while True:
            if self.stopping and draining_since is None:
                # Drain: stop accepting (the next master's workers take new
                # connections from the same sockets) and taking handed-over
                # ones, finish what is in hand.
                draining_since = time.monotonic()
                self._pass_turn()
                self._watch_listeners(False)
                if self.handover is not None:
                    self.poller.unregister(self.handover.recv_end.fileno())
            if draining_since is not None:
                self._close_drained(draining_since)
                if not self.last_seen:
                    break
            timeout = 0.2 if draining_since is not None else 1.0
            if self.lock is not None and not self.listening and draining_since is None and self.accept_paused_until is None:
                now = time.monotonic()
                if not self.last_seen or now >= self.next_try:
                    self._take_turn()
                if not self.listening:
                    # Our own connections only: look for the lock again soon
                    # (the holder may be busy; new connections must not wait
                    # long), but not at every request of ours (a syscall each).
                    if self.last_seen and now >= self.next_try:
                        self.next_try = now + TURN_RETRY
                    timeout = max(0.0, min(timeout, self.next_try - now)) if self.last_seen else timeout
            if self.runtime is not None and self.runtime.flush():
                timeout = min(timeout, 0.01)  # raised signals wait for room in the master's queue
            if clock:
                assert self.runtime is not None
                wait = self.runtime.next_in()
                if wait is not None:
                    if wait <= 0:
                        self.runtime.tick()
                        wait = self.runtime.next_in() or timeout
                    timeout = min(timeout, wait)
            try:
                events = self.poller.poll(timeout)
            except InterruptedError:
                continue
            watched = self.poller.data
            for fd, _ in events:
                data = watched.get(fd)
                if data is None:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif data is SIGNAL_QUEUE:
                    assert self.runtime is not None
                    self.runtime.receive(self.signal_queues[fd])
                elif data is HANDOVER:
                    if not self.stopping:
                        self._pass_turn()
                        self._adopt()
                elif type(data) is Listener:
                    if not self.listening:
                        continue  # (our turn ended earlier in this round)
                    # Several per wakeup: a burst of short connections (nginx's
                    # uwsgi upstream) otherwise costs an epoll round each.
                    accept = self._accept_fd if data.kind == "uwsgi" and fdconn.available else self._accept
                    for n in range(batch):
                        if self.stopping or not accept(data):
                            if n == 0:
                                self._raced()
                            break
                else:
                    self._pass_turn()
                    self._read(*data)
            self._expire_idle()
        for conn in list(self.last_seen):
            self._close(conn)

    def _close_drained(self, since: float) -> None:
        """While draining, a connection between requests goes to a serving
        worker (vassal.handover): closing it would race the client's next
        request. Without one to take it (or if it cannot go), a keep-alive
        connection is closed, and one accepted but not yet sent its first
        request is given DRAIN_FIRST_REQUEST seconds."""
        late = time.monotonic() - since > DRAIN_FIRST_REQUEST
        for conn, handler in list(self.handlers.items()):
            if not handler.idle:
                continue
            origin = self.origin.get(conn)
            if self.handover is not None and origin is not None:
                given = self.handover.give(conn, *origin)
                if given:
                    self._close(conn)  # our copy only: the connection lives on in the message
                    continue
                if given is None:
                    continue  # the pair is full: again on the next pass (reload-mercy bounds it)
            if self.served.get(conn, 0) > 0 or late:
                self._close(conn)

    def _adopt(self) -> None:
        """Connections a draining worker handed over: served from here on."""
        for conn, kind, peer, server in self._handed_over():
            self._serve(conn, kind, peer, server)

    def _handed_over(self):
        """The handed-over connections still connected: (conn, handler class, peer, server)."""
        assert self.handover is not None
        for conn, kind, server in self.handover.take():
            try:
                peer = conn.getpeername() if conn.family != socket.AF_UNIX else None
            except OSError:
                conn.close()
                continue
            yield conn, UwsgiConnection if kind == "uwsgi" else HttpConnection, peer, server

    def _accept(self, listener: Listener) -> bool:
        try:
            # The raw accept: socket.accept() converts family and type to
            # enums for every connection, which shows in a profile.
            fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False  # another worker won the race
        except OSError as exc:
            self._accept_failed(exc)
            return False
        self._pass_turn()
        kind, family, server = self._listener_info(listener)
        # Blocking (as accept4 leaves it) with a kernel send timeout: sendall
        # is then one syscall, not a poll per chunk as with a Python-level
        # timeout; reads never block (MSG_DONTWAIT, after readiness).
        conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, SEND_TIMEOUT)
        if family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._serve(conn, kind, peer, server)
        return True

    def _serve(self, conn: socket.socket, kind: type, peer, server: tuple[str, str]) -> None:
        handler = kind(
            conn,
            peer or "unix",
            server,
            self.app,
            max_head=self.max_head,
            max_body=self.max_body,
            on_request=self._served,
            **({"limits": self.http_limits} if kind is HttpConnection
               else {"body_timeout": self.http_limits.body_timeout, "spool": self.http_limits.spool}),
        )
        self.last_seen[conn] = time.monotonic()
        self.handlers[conn] = handler
        if self.handover is not None:
            self.origin[conn] = ("uwsgi" if kind is UwsgiConnection else "http", server)
        # Most clients send the request right after connecting: answer it
        # before paying for a poller registration (nginx's uwsgi upstream
        # connections then never need one).
        self._read(conn, handler)
        if conn in self.handlers and conn not in self.registered:  # (closed, or lingering and registered)
            self.poller.register(conn.fileno(), (conn, handler))
            self.registered.add(conn)

    def _accept_fd(self, listener: Listener) -> bool:
        """A uwsgi-protocol connection as a bare fd (vassal.fdconn): nginx's
        request is normally there at once and is answered before anything
        is registered anywhere."""
        try:
            accepted = fdconn.accept_read(listener.sock.fileno())
        except OSError as exc:
            self._accept_failed(exc)
            return False
        if accepted is None:
            return False
        self._pass_turn()
        fd, data = accepted
        conn = fdconn.FdConnection(fd)
        _, _, server = self._listener_info(listener)
        if data is not None:
            try:
                if respond_whole(conn, data, self.app, self._served, self.max_head, env_defaults(server)):
                    conn.close()
                    return True
            except OSError:
                conn.close()
                return True
        handler = UwsgiConnection(conn, "unix", server, self.app, max_head=self.max_head, max_body=self.max_body,
                                  on_request=self._served, body_timeout=self.http_limits.body_timeout,
                                  spool=self.http_limits.spool)
        if data is not None and not self._feed(handler, data):
            conn.close()
            return True
        # The rest of the request comes later: wait for it in the poller.
        self.last_seen[conn] = time.monotonic()
        self.handlers[conn] = handler
        self.poller.register(fd, (conn, handler))
        self.registered.add(conn)
        return True

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds (or kernel memory): stop accepting for a moment rather
        than spin on a listener that stays readable; what is open is served."""
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) or self.stopping:
            return
        if self.accept_paused_until is None:
            log(f"worker {self.index}: cannot accept ({exc.strerror}): pausing accepts for {ACCEPT_PAUSE:g}s")
            self._pass_turn()
            self._watch_listeners(False)
        self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE

    def _resume_accepting(self) -> None:
        if self.accept_paused_until is not None and time.monotonic() >= self.accept_paused_until and not self.stopping:
            self.accept_paused_until = None
            self._watch_listeners(self.lock is None)  # (with a lock: at our next turn)

    def _linger(self, conn: socket.socket) -> None:
        """After an error answer: no more writes, and what the client still
        sends (the body it had started) is read and dropped until it closes
        or LINGER_SECONDS pass, so that the kernel does not reset the
        connection over unread bytes before the client reads the answer."""
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._drop_handler(self.handlers.get(conn))
        self.handlers[conn] = _Discard()
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS
        self.head_since.pop(conn, None)
        self.body_pace.pop(conn, None)
        if conn not in self.registered:
            self.poller.register(conn.fileno(), (conn, self.handlers[conn]))
            self.registered.add(conn)
        else:
            self.poller.data[conn.fileno()] = (conn, self.handlers[conn])

    def _listener_info(self, listener: Listener) -> tuple[type, int, tuple[str, str]]:
        info = self.listener_info.get(listener.sock)
        if info is None:
            kind = UwsgiConnection if listener.kind == "uwsgi" else HttpConnection
            info = self.listener_info[listener.sock] = (kind, int(listener.sock.family), listener.server)
        return info

    def _read(self, conn: socket.socket, handler: HttpConnection) -> None:
        try:
            data = conn.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if self._feed(handler, data):
            now = self.last_seen[conn] = time.monotonic()
            if handler.idle:  # a whole request was answered
                self.served[conn] = self.served.get(conn, 0) + 1
                self.head_since.pop(conn, None)
            elif getattr(handler, "head_pending", False):
                self.head_since.setdefault(conn, now)  # a head has begun: it has http-head-timeout to end
            else:
                self.head_since.pop(conn, None)
            if getattr(handler, "in_body", False):
                self._paced(conn, now, len(data))
            elif self.body_pace:
                self.body_pace.pop(conn, None)
        elif getattr(handler, "linger", False) and data and type(conn) is socket.socket:
            self._linger(conn)
        else:
            self._close(conn)

    def _feed(self, handler, data: bytes) -> bool:
        """Give the handler what was read; False when the connection must close."""
        started = time.monotonic()
        try:
            return handler.feed(data)
        except OSError:
            return False
        except Exception:
            log(f"worker {self.index}: unexpected error:\n{traceback.format_exc().rstrip()}")
            return False
        finally:
            self.feeding += time.monotonic() - started

    def _paced(self, conn: Conn, now: float, count: int) -> None:
        entry = self.body_pace.get(conn)
        if entry is None:
            pace = BodyPace(self.http_limits.body_timeout)  # (from the read that began the body)
        else:
            pace, since, fed = entry
            pace.waited(now - since - (self.feeding - fed))
            pace.received(count)
        self.body_pace[conn] = (pace, now, self.feeding)

    def _expire_slow_bodies(self, now: float) -> None:
        for conn, (pace, since, fed) in list(self.body_pace.items()):
            bound, slow = pace.next_wait()
            if now - since - (self.feeding - fed) > bound:
                log(f"request body cut short: {pace.why(slow)}")
                handler = self.handlers.get(conn)
                if isinstance(handler, HttpConnection):
                    handler.timed_out()
                self._close(conn)

    def _expire_idle(self) -> None:
        self._resume_accepting()
        if not self.last_seen:
            return
        now = time.monotonic()
        if self.body_pace:
            self._expire_slow_bodies(now)
        deadline = now - self.keepalive
        # (a connection yet to send its first request waits for it as for a
        # head, also under a shorter keep-alive: with http-keepalive = 0 a
        # request 50 ms behind its connect was dropped unanswered)
        first_deadline = now - max(self.keepalive, self.head_timeout)
        for conn, seen in list(self.last_seen.items()):
            if seen < (deadline if conn in self.served else first_deadline) and conn not in self.body_pace:
                self._close(conn)
        # A head trickled byte by byte keeps a connection seen: it gets
        # http-head-timeout from its first byte, whatever the pace (slowloris).
        for conn, since in list(self.head_since.items()):
            if now - since > self.head_timeout:
                handler = self.handlers.get(conn)
                if isinstance(handler, HttpConnection):
                    handler.timed_out()
                self._close(conn)
        for conn, until in list(self.lingering.items()):
            if now > until:
                self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.last_seen.pop(conn, None)
        self._drop_handler(self.handlers.pop(conn, None))
        self.body_pace.pop(conn, None)
        self.served.pop(conn, None)
        self.origin.pop(conn, None)
        self.head_since.pop(conn, None)
        self.lingering.pop(conn, None)
        if conn in self.registered:
            # (Only then: a failed unregister formats the socket's repr, which is slow.)
            self.registered.discard(conn)
            self.poller.unregister(conn.fileno())
        conn.close()

    @staticmethod
    def _drop_handler(handler: object) -> None:
        """A connection's handler let go: the bodies it holds go with it."""
        close = getattr(handler, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log(f"closing a connection's requests:\n{traceback.format_exc().rstrip()}")


class Poller:
    """epoll where there is one (poll elsewhere), fd -> data: no selector key
    objects per event, which showed in the per-request profile."""

    def __init__(self) -> None:
        if hasattr(select, "epoll"):
            self._poll, self._flag, self._scale = select.epoll(), select.EPOLLIN, 1.0
        else:
            self._poll, self._flag, self._scale = select.poll(), select.POLLIN, 1000.0  # type: ignore[assignment]
        self.data: dict[int, object] = {}

    def register(self, fd: int, data: object) -> None:
        self._poll.register(fd, self._flag)
        self.data[fd] = data

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)
        self.data.pop(fd, None)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        return self._poll.poll(timeout * self._scale)


def _rss_mb() -> int:
    return jails.backend().rss(os.getpid()) // 1048576
