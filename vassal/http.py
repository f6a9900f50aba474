"""HTTP/1.1 on ``http-socket``: parsing with httptools (llhttp), WSGI calls,
responses with Content-Length or chunked encoding, keep-alive and pipelining.

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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

import httptools

from vassal.fdconn import wait_writable
from vassal.log import log
from vassal.spool import BodySpool

STATUS_TEXT = {
    400: "Bad Request",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


@dataclass
class Request:
    method: bytes = b""
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: BodySpool = field(default_factory=BodySpool)
    version: str = "1.1"
    keep_alive: bool = True
    expect_continue: bool = False


class Rejected(Exception):
    """A request refused with ``status`` before the app sees it."""

    def __init__(self, status: int):
        self.status = status


class RequestTooLarge(Rejected):
    pass


class _Parser:
    """httptools callbacks collecting complete requests into ``done``."""

    def __init__(self, max_head: int, max_body: int, on_expect: Callable[[], None]):
        self.done: deque[Request] = deque()
        self.current: Request | None = None
        self.head_size = 0
        self.body_size = 0
        self.max_head = max_head
        self.max_body = max_body
        self.on_expect = on_expect
        self.parser = httptools.HttpRequestParser(self)
        self._last_header: bytes | None = None

    def on_message_begin(self) -> None:
        self.current = Request()
        self.head_size = 0
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.url += url
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise RequestTooLarge(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise RequestTooLarge(431)
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        if req.version not in ("1.0", "1.1"):
            raise Rejected(400)  # HTTP/0.9 (no version): nothing to answer it with
        req.keep_alive = self.parser.should_keep_alive()
        for name, value in req.headers:
            if name.lower() == b"content-length" and self.max_body and value.isdigit() and int(value) > self.max_body:
                raise RequestTooLarge(413)
            if name.lower() == b"expect" and value.lower() == b"100-continue" and req.version == "1.1":
                req.expect_continue = True
        if req.expect_continue:
            self.on_expect()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.body_size += len(body)
        if self.max_body and self.body_size > self.max_body:
            raise RequestTooLarge(413)
        self.current.body.write(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None


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
    ):
        self.sock = sock
        self.peer = peer
        self.server_name, self.server_port = server
        self.app = app
        self.parser = _Parser(max_head, max_body, self._send_continue)
        self.closing = False
        self.on_request = on_request

    def _send_continue(self) -> None:
        # The client waits for this before sending a body it announced.
        self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def feed(self, data: bytes) -> bool:
        if not data:
            return False
        try:
            self.parser.parser.feed_data(data)
        except Rejected as exc:
            self._send_error(exc.status)
            return False
        except httptools.HttpParserUpgrade:
            # No websocket support: answer what was parsed, then close.
            self.closing = True
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised.
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, Rejected):
                self._send_error(cause.status)
                return False
            self._answer_queued()
            self._send_error(400, str(exc))
            return False
        return self._answer_queued() and not self.closing

    @property
    def idle(self) -> bool:
        return self.parser.current is None and not self.parser.done

    def _answer_queued(self) -> bool:
        while self.parser.done:
            req = self.parser.done.popleft()
            if not self.handle(req):
                return False
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
        if detail:
            log(f"bad request from {self.peer}: {detail}")

    def environ(self, req: Request) -> dict:
        url = httptools.parse_url(req.url)
        path = unquote_to_bytes(url.path or b"/").decode("latin-1")
        env = {
            "REQUEST_METHOD": req.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": path,
            "QUERY_STRING": (url.query or b"").decode("latin-1"),
            "REQUEST_URI": req.url.decode("latin-1"),
            "SERVER_NAME": self.server_name,
            "SERVER_PORT": self.server_port,
            "SERVER_PROTOCOL": f"HTTP/{req.version}",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": req.body.finish(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        }
        if isinstance(self.peer, tuple):
            env["REMOTE_ADDR"] = str(self.peer[0])
            env["REMOTE_PORT"] = str(self.peer[1])
        else:
            env["REMOTE_ADDR"] = "127.0.0.1"
        for name, value in req.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1").strip(" \t")  # optional whitespace around a field value
            if key == "CONTENT_LENGTH" or key == "CONTENT_TYPE":
                env[key] = text
                continue
            if "_" in name.decode("latin-1"):
                # Header names with underscores would alias dashed ones (spoofing).
                continue
            key = "HTTP_" + key
            if key in env:
                env[key] += ("; " if key == "HTTP_COOKIE" else ", ") + text
            else:
                env[key] = text
        if "CONTENT_LENGTH" not in env and req.body.size:
            env["CONTENT_LENGTH"] = str(req.body.size)
        return env

    def handle(self, req: Request) -> bool:
        """Run the app for one request; False when the connection must close."""
        env = self.environ(req)
        started = time.monotonic()
        head_only = req.method == b"HEAD"
        response = _Response(self.sock, req.version == "1.1", head_only, req.keep_alive)
        ok = run_app(self.app, env, response, req.body, started, self.on_request, lambda: self._send_error(500))
        return ok and response.keep_alive


def run_app(app: WSGIApp, env: dict, response: _Response, body, started: float,
            on_request: RequestHook | None, send_500: Callable[[], None]) -> bool:
    """One WSGI call, its body sent, the result closed, the request recorded;
    False when the connection cannot be used any more."""
    result = None
    ok = True
    try:
        result = app(env, response.start_response)
        if type(result) is list and len(result) == 1 and response.status is not None and not response.sent:
            response.send_whole(result[0])  # the common case: one chunk, one send
        else:
            send_body(response, result)
            response.finish()
    except (BrokenPipeError, ConnectionResetError, TimeoutError, BlockingIOError):
        ok = False  # the client went away, or stopped reading
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

    __slots__ = ("sock", "http11", "head_only", "keep_alive", "status", "headers", "sent", "chunked", "size", "known_length")

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
        if not has_length and not bodyless:
            if self.http11:
                self.chunked = True
                out.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        out.append("Connection: keep-alive\r\n\r\n" if self.keep_alive else "Connection: close\r\n\r\n")
        return "".join(out).encode("latin-1")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        payload = b""
        if data and not self.head_only:
            payload = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        if not self.sent:
            head = self._head()
            if data and not self.head_only and self.chunked:
                payload = b"%x\r\n%b\r\n" % (len(data), data)
            self.sent = True
            self.sock.sendall(head + payload)
        elif payload:
            self.sock.sendall(payload)

    def send_whole(self, body: bytes) -> None:
        """The head and the whole body, its length known, in one send."""
        self.known_length = self.size = len(body)
        head = self._head()
        self.sent = True
        self.sock.sendall(head if self.head_only else head + body)

    def finish(self) -> None:
        if not self.sent:
            self.write(b"")
        if self.chunked:
            self.sock.sendall(b"0\r\n\r\n")
