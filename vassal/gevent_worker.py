"""A worker in gevent mode (``gevent = N``): N requests served at once,
each connection in a greenlet (idle keep-alive ones hold no core), with
uWSGI 1.9.16's shutdown procedure.

The worker does not join the gevent hub: it joins a dummy control
greenlet that ends on SIGTERM/SIGHUP (or max-requests). Then it stops
accepting, hands idle keep-alive connections to a serving worker (or
closes them), waits only for the greenlets it spawned to serve (the
requests in hand), and exits, running its atexit hooks, even if the app
left greenlets or monkey-patched threads of its own running. With
``gevent-wait-for-hub`` it joins the hub instead, as before 1.9.16: it
lingers until every greenlet ends, or until the master kills it at
``worker-reload-mercy``.

gevent is imported only here, in the worker, so a vassal without gevent
never loads it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

from bedrock.log import log
from bedrock.proc import default_signals
from bedrock.sockets import Listener
from vassal import http, spool
from vassal.http import HttpConnection
from vassal.uwsgiproto import UwsgiConnection
from vassal.worker import LINGER_SECONDS, Worker

MIN_SOCKET_TIMEOUT = 30.0  # uWSGI raises the socket timeout to this in gevent mode
CONNECTIONS_PER_CORE = 16  # open connections a worker keeps per core (idle ones cost a greenlet and an fd)


class _Drain(Exception):
    """Thrown into a connection's greenlet waiting between requests: the
    worker is stopping."""


class GeventWorker(Worker):
    def __init__(self, *args, cores: int, wait_for_hub: bool, socket_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.cores = cores
        self.wait_for_hub = wait_for_hub
        self.socket_timeout = max(socket_timeout, MIN_SOCKET_TIMEOUT)
        # (a streamed body's stall is held to the same raised timeout)
        self.http_limits = dataclasses.replace(self.http_limits, body_timeout=self.socket_timeout)
        self.idle_waiting: set = set()  # connection greenlets blocked between two requests

    def run(self) -> None:
        import gevent
        import gevent.event
        import gevent.lock
        import gevent.pool
        import gevent.socket

        self.gevent = gevent
        from vassal.gevent_socket import ProgressSocket

        self.socket_class = ProgressSocket
        gevent.reinit()  # (the master may have imported it: a fresh hub after the fork)
        default_signals(signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
        self.stop_event = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, self._stop)
        gevent.signal_handler(signal.SIGHUP, self._stop)
        # sendfile on a non-blocking connection waits in the hub, not in poll(2).
        http.wait_writable = lambda fd: gevent.socket.wait_write(fd, timeout=self.socket_timeout)
        spool.wait_readable = lambda fd, timeout: self._wait_read(fd, timeout)
        if self.lock is not None:
            log(f"worker {self.index}: the thunder lock is not used in gevent mode (one process accepts for all its cores)")
        # A core is a request in hand (uWSGI's async cores), not a connection:
        # idle keep-alive connections wait outside the cores (ten silent ones
        # held gevent = 10 for their keep-alive), up to CONNECTIONS_PER_CORE
        # each (then accept waits, as it did at N).
        self.pool = gevent.pool.Pool(self.cores * CONNECTIONS_PER_CORE)
        self.in_hand = gevent.lock.BoundedSemaphore(self.cores)
        http.app_gate = self.in_hand
        helpers = [gevent.spawn(self._accept_loop, listener) for listener in self.listeners]
        if self.handover is not None:
            helpers.append(gevent.spawn(self._adopt_loop))
        if self.runtime is not None:
            helpers.append(gevent.spawn(self._signal_loop))
        # uWSGI 1.9.16: join a control greenlet, not the hub.
        control = gevent.spawn(self.stop_event.wait)
        control.join()
        self.stopping = True
        gevent.killall(helpers)
        for greenlet in list(self.idle_waiting):
            greenlet.kill(_Drain, block=False)
        self.pool.join()  # the requests in hand (idle connections were drained), and nothing else of the app's
        if self.wait_for_hub:
            log(f"worker {self.index}: gevent-wait-for-hub: waiting for every greenlet to end")
            gevent.get_hub().join()
        log(f"worker {self.index}: requests done, exiting")

    def _stop(self) -> None:
        self.stop_event.set()

    def _served(self, env: dict, response, started: float) -> None:
        super()._served(env, response, started)
        if self.stopping:
            self.stop_event.set()  # max-requests

    def _accept_loop(self, listener: Listener) -> None:
        gevent = self.gevent
        # A dup: closing our gevent socket leaves the shared listener to the others.
        sock = self.socket_class(listener.sock.family, socket.SOCK_STREAM, 0, os.dup(listener.sock.fileno()))
        kind, family, server = self._listener_info(listener)
        try:
            while True:
                self.pool.wait_available()
                try:
                    conn, peer = sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    self._accept_failed(exc)
                    gevent.sleep(1.0)
                    self.accept_paused_until = None
                    continue
                if family != socket.AF_UNIX:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.pool.spawn(self._connection, conn, kind, peer, server)
        finally:
            sock.close()

    def _adopt_loop(self) -> None:
        """Idle connections a draining worker handed over: served here."""
        gevent = self.gevent
        assert self.handover is not None
        recv_end = self.handover.recv_end
        while True:
            gevent.socket.wait_read(recv_end.fileno())
            for conn, kind, peer, server in self._handed_over():
                green = self.socket_class.adopt(conn)
                self.pool.spawn(self._connection, green, kind, peer, server)

    def _signal_loop(self) -> None:
        """uwsgi signals for this worker, and (one worker, no master) the clock."""
        gevent = self.gevent
        runtime = self.runtime
        assert runtime is not None
        queues = runtime.worker_queues()

        def watch(sock) -> None:
            while True:
                gevent.socket.wait_read(sock.fileno())
                runtime.receive(sock)

        watchers = [gevent.spawn(watch, sock) for sock in queues]
        try:
            while True:
                waiting = runtime.flush()
                wait = runtime.next_in()
                if wait is not None and wait <= 0:
                    runtime.tick()
                    continue
                gevent.sleep(min(0.01 if waiting else 1.0, wait if wait is not None else 1.0))
        finally:
            gevent.killall(watchers)

    def _wait_read(self, fd: int, timeout: float) -> None:
        """A streamed body's wait for the client, in the hub (vassal.spool)."""
        try:
            self.gevent.socket.wait_read(fd, timeout=timeout)
        except self.gevent.socket.timeout:
            raise TimeoutError(f"no body bytes for {timeout:g}s") from None

    def _connection(self, conn, kind: type, peer, server: tuple[str, str]) -> None:
        gevent = self.gevent
        handler = kind(conn, peer or "unix", server, self.app, max_head=self.max_head, max_body=self.max_body,
                       on_request=self._served,
                       **({"limits": self.http_limits} if kind is HttpConnection else {"body_timeout": self.socket_timeout, "spool": self.http_limits.spool}))
        me = gevent.getcurrent()
        head_started: float | None = None
        # A request body read here (up to spool.STREAM_THRESHOLD, or chunked,
        # of any size) is held to what a streamed one is (spool.BodyPace),
        # not to http-head-timeout, which is the head's.
        pace: spool.BodyPace | None = None
        slow = False  # (whether the rate, not the stall, bounds the wait for the body)
        first = True  # no request answered yet on this connection
        try:
            while True:
                idle = handler.idle
                if idle and self.stopping:
                    self._drained(conn, kind, server)
                    return
                in_body = not idle and not getattr(handler, "head_pending", True)
                if idle:
                    # (http-keepalive = 0: no wait between requests; the first
                    # is still waited for, as for a head: a timeout of 0 made
                    # the socket non-blocking and every connection was dropped)
                    timeout = float(self.keepalive or (self.head_timeout if first else 0))
                    head_started, pace = None, None
                elif in_body:
                    head_started = None
                    pace = pace or spool.BodyPace(self.socket_timeout)
                    timeout, slow = pace.next_wait()
                    if timeout <= 0:
                        log(f"request body cut short: {pace.why(True)}")
                        handler.timed_out()
                        return
                else:
                    pace = None
                    head_started = head_started or time.monotonic()
                    timeout = max(0.1, self.head_timeout - (time.monotonic() - head_started))
                waited = time.monotonic()
                conn.settimeout(timeout)
                if idle:
                    self.idle_waiting.add(me)
                try:
                    data = conn.recv(65536)
                except _Drain:
                    self._drained(conn, kind, server)
                    return
                except TimeoutError:
                    if in_body and pace is not None:
                        log(f"request body cut short: {pace.why(slow)}")
                    if not idle and isinstance(handler, HttpConnection):
                        handler.timed_out()
                    return
                except OSError:
                    return
                finally:
                    self.idle_waiting.discard(me)
                if in_body and pace is not None:
                    pace.waited(time.monotonic() - waited)
                    pace.received(len(data))
                conn.settimeout(self.socket_timeout)  # for the answer
                try:
                    alive = handler.feed(data)
                except OSError:
                    return
                except Exception:
                    import traceback

                    log(f"worker {self.index}: unexpected error:\n{traceback.format_exc().rstrip()}")
                    return
                if not alive:
                    if getattr(handler, "linger", False) and data:
                        handler.close()
                        self._linger(conn)
                    return
                if handler.idle:
                    head_started, first = None, False
        finally:
            handler.close()  # (what its requests hold is given back now, not at a garbage collection)
            conn.close()

    def _drained(self, conn, kind: type, server: tuple[str, str]) -> None:
        """Between requests while stopping: to a serving worker, if one takes it."""
        if self.handover is None:
            return
        for _ in range(200):
            given = self.handover.give(conn, "uwsgi" if kind is UwsgiConnection else "http", server)
            if given is not None:
                return
            self.gevent.sleep(0.05)  # the pair is full: the taker is busy

    def _linger(self, conn) -> None:
        """After an error answer, read and drop what the client still sends
        (see Worker._linger) so the kernel does not reset the answer away."""
        try:
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)  # (a recv's wait never runs past the deadline)
                if not conn.recv(65536):
                    break
        except OSError:
            pass
