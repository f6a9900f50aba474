"""HTTP/1.1 on ``http-socket``: requests parsed by vassal.http_parser (RFC
9112), WSGI calls with a PEP 3333 environ, responses with Content-Length or
chunked encoding, keep-alive and pipelining.

One :class:`HttpConnection` per client socket. The worker feeds it bytes as
they arrive; complete requests queue up (pipelining) and are answered in
order, one at a time, since a WSGI call blocks.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from urllib.parse import unquote_to_bytes

from bedrock.log import log
from vassal.fdconn import wait_writable
from vassal.http_parser import Limits, Rejected, Request, RequestParser
from vassal.spool import StreamedBody

STATUS_TEXT = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def remove_dot_segments(path: str) -> str:
    """RFC 3986's remove_dot_segments on a path as sent (before percent
    decoding), as uWSGI resolves them: what a rule or the app sees for
    ``/x/../admin`` is ``/admin``; ``/x/..%2fadmin`` stays ``/x/../admin``,
    as a front proxy matching the raw path saw it."""
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    trailing = segments[-1] in (".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


class HttpConnection:
    """One client connection; ``feed`` returns False once it should close."""

    def __init__(
        self,
        sock: socket.socket,
        peer: tuple | str,
        server: tuple[str, str],
        app: WSGIApp,
        max_head: int = 65536,
        max_body: int = 0,
        on_request: RequestHook | None = None,
        limits: Limits | None = None,
    ):
        self.sock = sock
        self.peer = peer
        self.server_name, self.server_port = server
        self.app = app
        self.parser = RequestParser(limits or Limits(head=max_head, body=max_body), self._send_continue)
        self.on_request = on_request
        self.continue_due = False
        self.continue_for: Request | None = None  # the request a deferred 100 Continue is for
        # Set once an error was answered: the worker then closes lingering
        # (reads what the client still sends), or the kernel would reset the
        # connection over unread bytes and the client never see the answer.
        self.linger = False
        # What every request's environ on this connection starts from (a copy
        # of a dict is cheaper than building one).
        self.base_env = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": self.server_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            # The input ends where the body does, read whole or streamed (a
            # chunked upload reaches werkzeug, which checks this).
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        }
        if isinstance(peer, tuple):
            self.base_env["REMOTE_ADDR"] = str(peer[0])
            self.base_env["REMOTE_PORT"] = str(peer[1])
        else:
            self.base_env["REMOTE_ADDR"] = "127.0.0.1"

    def _send_continue(self) -> None:
        # The client waits for this before sending a body it announced; after
        # the answers to requests pipelined before it, or the client takes it
        # for theirs.
        if self.parser.done:
            self.continue_due = True
            self.continue_for = self.parser.current
        else:
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def feed(self, data: bytes) -> bool:
        if not data:
            return False
        try:
            self.parser.feed(data)
        except Rejected as exc:
            # What was whole before the bad bytes is answered first, in order.
            if self._answer_queued():
                self._send_error(exc.status, exc.detail)
            return False
        return self._answer_queued()

    @property
    def idle(self) -> bool:
        return self.parser.idle

    @property
    def in_body(self) -> bool:
        """A body the worker's loop reads is coming in (held to BodyPace)."""
        return self.parser.in_body and not (self.parser.current is not None and self.parser.current.queued)

    def close(self) -> None:
        """The connection is gone (the worker calls this): what its requests hold is given back now."""
        self.parser.close()
        self.continue_for = None

    @property
    def head_pending(self) -> bool:
        return self.parser.in_head

    def timed_out(self) -> None:
        """The head (or a body the worker reads) did not arrive in time (the worker closes next)."""
        self._send_error(408, "request body not complete in time" if self.parser.in_body else "request head not complete in time")

    def _flush_continue(self) -> None:
        if self.continue_due:
            self.continue_due = False
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _answer_queued(self) -> bool:
        while self.parser.done:
            req = self.parser.done.popleft()
            if not self.handle(req):
                return False
        if self.continue_due:
            self.continue_due = False
            # (a body that came whole behind the requests before it wants no
            # go-ahead: sent now, it would sit in front of the next answer,
            # or of the answer to another request still coming in)
            if self.parser.in_body and self.parser.current is self.continue_for:
                self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.continue_for = None
        return True

    def _send_error(self, status: int, detail: str = "") -> None:
        text = STATUS_TEXT.get(status, "Error")
        body = f"{status} {text}\n".encode()
        head = (
            f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            self.sock.sendall(head + body)
        except OSError:
            pass
        self.linger = True
        if detail:
            log(f"bad request from {self.peer}: {detail}")

    def environ(self, req: Request) -> dict:
        raw_path = req.path
        env = self.base_env.copy()
        env["REQUEST_METHOD"] = req.method.decode("latin-1")
        path = raw_path.decode("latin-1")
        if "/." in path:
            path = remove_dot_segments(path)  # (on the path as sent: %2e and %2f are not segments, as in uWSGI)
        env["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        env["QUERY_STRING"] = req.query.decode("latin-1") if req.query else ""
        env["REQUEST_URI"] = req.target.decode("latin-1")
        env["SERVER_PROTOCOL"] = "HTTP/1.1" if req.version == "1.1" else "HTTP/1.0"
        env["wsgi.input"] = req.body.finish()
        for name, value in req.headers:
            if b"_" in name:
                # Never a CGI variable: an underscore name would alias a dashed
                # one (Content_Length over Content-Length, X_Forwarded_For).
                continue
            text = value.decode("latin-1")
            if name == b"content-length":
                env["CONTENT_LENGTH"] = text
            elif name == b"content-type":
                env["CONTENT_TYPE"] = text
            elif name == b"host":
                continue  # below, from the target's authority where it has one
            elif name == b"transfer-encoding":
                continue  # the app gets the body decoded, with its CONTENT_LENGTH
            else:
                key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
                if key in env:
                    env[key] += ("; " if key == "HTTP_COOKIE" else ", ") + text
                else:
                    env[key] = text
        if req.host is not None:
            env["HTTP_HOST"] = req.host.decode("latin-1")
        if req.chunked or ("CONTENT_LENGTH" not in env and req.body.size):
            env["CONTENT_LENGTH"] = str(req.body.size)
        if req.trailers:
            env["pyemperor.trailers"] = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.trailers]
        return env

    def handle(self, req: Request) -> bool:
        """Run the app for one request; False when the connection must close."""
        env = self.environ(req)
        started = time.monotonic()
        head_only = req.method == b"HEAD"
        response = _Response(self.sock, req.version == "1.1", head_only, req.keep_alive)
        body = req.body
        if type(body) is StreamedBody:
            response.unread = body
            body.attach(self.sock, self.parser.limits.body_timeout, self.parser.body_received,
                        lambda: response.sent or self._flush_continue())
        ok = run_app(self.app, env, response, body, started, self.on_request, lambda: self._send_error(500))
        if type(body) is StreamedBody and not (body.complete and response.keep_alive):
            # The app did not read it all (or not before its answer began):
            # the answer said close, and what the client still sends is read
            # and dropped (else the kernel resets the answer away); after a
            # failed read, the connection just ends.
            self.linger = not body.failed
            return False
        return ok and response.keep_alive


# In the environ when a routing rule said ``donotlog``: no access log line.
DONOTLOG = "pyemperor.donotlog"


class CloseConnection(BaseException):
    """Raised by the app's side (a routing rule's bare ``break``) to close
    the connection with no answer at all. A BaseException: an app's own
    ``except Exception`` must not turn it into a 500."""


# Set in gevent mode: the worker's cores (a semaphore), one held by each
# request from its app's call to its answer's end. Heads and bodies the
# connections' loops still read hold none (they did: four connections that
# sent a byte each held gevent = 4 until their timeouts).
app_gate: AbstractContextManager | None = None


def run_app(app: WSGIApp, env: dict, response: _Response, body, started: float,
            on_request: RequestHook | None, send_500: Callable[[], None]) -> bool:
    """One WSGI call, its body sent, the result closed, the request recorded;
    False when the connection cannot be used any more."""
    if app_gate is None:
        return _run_app(app, env, response, body, started, on_request, send_500)
    with app_gate:  # (all taken: this request waits its turn)
        return _run_app(app, env, response, body, started, on_request, send_500)


def _run_app(app: WSGIApp, env: dict, response: _Response, body, started: float,
             on_request: RequestHook | None, send_500: Callable[[], None]) -> bool:
    result = None
    ok = True
    try:
        result = app(env, response.start_response)
        if type(result) is list and len(result) == 1 and response.status is not None and not response.sent:
            response.send_whole(result[0])  # the common case: one chunk, one send
        else:
            send_body(response, result)
            response.finish()
    except (BrokenPipeError, ConnectionResetError, TimeoutError, BlockingIOError) as exc:
        ok = False  # the client went away, or stopped reading (or sending a body the app read)
        if not response.sent:  # (as nginx logs them, not as a 500 of ours)
            response.status = "408 Request Timeout" if isinstance(exc, TimeoutError) else "499 Client Closed Request"
    except CloseConnection:
        if not response.sent:
            response.status = "444 No Response"  # (nginx's name for it, in the access log)
        ok = False
    except Exception:
        log(f"error in app for {env.get('REQUEST_METHOD')} {env.get('REQUEST_URI') or env.get('PATH_INFO')}:\n{traceback.format_exc().rstrip()}")
        if not response.sent:
            send_500()
        ok = False
    finally:
        body.close()
        close = getattr(result, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log(f"error closing app response:\n{traceback.format_exc().rstrip()}")
        if on_request is not None:
            on_request(env, response, started)
    return ok


# Called after each request with (environ, response, start time); the access
# line is formatted only if it is logged.
RequestHook = Callable[[dict, "_Response", float], None]


def access_line(env: dict, response: _Response, started: float) -> str:
    status = (response.status or "500")[:3]
    return (f'{env.get("REMOTE_ADDR", "-")} "{env.get("REQUEST_METHOD")} {env.get("REQUEST_URI") or env.get("PATH_INFO")} '
            f'{env.get("SERVER_PROTOCOL")}" {status} {response.size} {(time.monotonic() - started) * 1000:.1f}ms')


class FileWrapper:
    """``wsgi.file_wrapper``: a file the server may send with sendfile(2)."""

    def __init__(self, filelike, block_size: int = 65536):
        self.filelike = filelike
        self.block_size = block_size
        self.close = getattr(filelike, "close", None) or (lambda: None)

    def __iter__(self):
        while chunk := self.filelike.read(self.block_size):
            yield chunk


def send_body(response: _Response, result) -> None:
    """Iterate the app's result into ``response``; a FileWrapper around a real
    file with a known length goes out with sendfile, without passing through
    Python."""
    if isinstance(result, FileWrapper) and response.head_only:
        response.write(b"")  # (HEAD: the head alone; the file is never read)
        return
    if isinstance(result, FileWrapper) and not response.chunked and not response.head_only:
        try:
            fd = result.filelike.fileno()
            offset = result.filelike.tell()
            remaining = os.fstat(fd).st_size - offset
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None and response.status is not None:
            response.set_length_if_missing(remaining)
            response.write(b"")  # the head, which may now say Content-Length
            if response.declared is not None:
                remaining = min(remaining, response.declared - response.size)  # (a file that grew since)
            if not response.chunked:
                while remaining > 0:
                    try:
                        sent = os.sendfile(response.sock.fileno(), fd, offset, remaining)
                    except BlockingIOError:  # a non-blocking connection (vassal.fdconn)
                        wait_writable(response.sock.fileno())
                        continue
                    if sent == 0:
                        break
                    offset += sent
                    remaining -= sent
                    response.size += sent
                return
    if isinstance(result, (list, tuple)) and response.status is not None:
        response.set_length_if_missing(sum(len(part) for part in result))
    for chunk in result:
        if chunk:
            response.write(chunk)


class _Response:
    """WSGI start_response/write for one request, framing the body as needed."""

    __slots__ = ("sock", "http11", "head_only", "keep_alive", "status", "headers", "sent", "chunked", "size", "known_length",
                 "declared", "unread")

    def __init__(self, sock: socket.socket, http11: bool, head_only: bool, keep_alive: bool):
        self.sock = sock
        self.http11 = http11
        self.head_only = head_only
        self.keep_alive = keep_alive
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False
        self.chunked = False
        self.size = 0
        self.known_length: int | None = None  # the body's length, if the server knows it (a list result, a file)
        self.declared: int | None = None  # the Content-Length the head said (the body is held to it)
        self.unread: StreamedBody | None = None  # a request body still coming in as the answer starts

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info=None):
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice without exc_info")
        self.status = status
        self.headers = list(headers)
        return self.write

    def set_length_if_missing(self, length: int) -> None:
        """The head (built once, by _head) says Content-Length: ``length``
        unless the app gave one."""
        self.known_length = length

    def _head(self) -> bytes:
        if self.status is None:
            raise RuntimeError("the app returned a body without calling start_response")
        out = ["HTTP/1.1 ", self.status, "\r\n"]
        has_length = False
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length":
                has_length = True
                try:
                    self.declared = int(value)
                except ValueError:
                    self.declared = None
            elif low == "connection":
                if value.lower() == "close":
                    self.keep_alive = False
                continue
            elif low == "transfer-encoding":
                continue
            out += (name, ": ", value, "\r\n")
        code = self.status[:3]
        bodyless = self.head_only or code in ("204", "304") or code.startswith("1")
        if not has_length and self.known_length is not None and code not in ("204", "304") and not code.startswith("1"):
            out += ("Content-Length: ", str(self.known_length), "\r\n")
            has_length = True
            self.declared = self.known_length
        if bodyless:
            self.declared = None
        if not has_length and not bodyless:
            if self.http11:
                self.chunked = True
                out.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if self.unread is not None and not self.unread.complete:
            self.keep_alive = False  # (the app may never read the rest: this connection cannot be trusted to carry another request)
        out.append("Connection: keep-alive\r\n\r\n" if self.keep_alive else "Connection: close\r\n\r\n")
        return "".join(out).encode("latin-1")

    def write(self, data: bytes) -> None:
        if self.declared is not None and self.size + len(data) > self.declared:
            # More than the head said (a file that grew as it was sent): what
            # is past it would be read as the next answer. Cut, then close.
            data = data[:max(0, self.declared - self.size)]
            self.keep_alive = False
        payload = b""
        if data and not self.head_only:
            payload = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        if not self.sent:
            head = self._head()
            if data and not self.head_only and self.chunked:
                payload = b"%x\r\n%b\r\n" % (len(data), data)
            self.sent = True
            if len(payload) > 65536:  # (a big first chunk goes on its own, not copied behind the head)
                self.sock.sendall(head)
                self.sock.sendall(payload)
            else:
                self.sock.sendall(head + payload)
        elif payload:
            self.sock.sendall(payload)
        # Counted once sent: an answer cut short (the client reset or stopped
        # reading) is logged with the bytes that went, not the whole body.
        self.size += len(data)

    def send_whole(self, body: bytes) -> None:
        """The head and the whole body, its length known, in one send."""
        self.known_length = len(body)
        head = self._head()
        self.sent = True
        self.sock.sendall(head if self.head_only else head + body)
        self.size = len(body)

    def finish(self) -> None:
        if not self.sent:
            self.write(b"")
        if self.declared is not None and self.size != self.declared and not self.head_only:
            self.keep_alive = False  # (fewer bytes than said: the connection cannot carry another answer)
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
