"""The uwsgi binary protocol on ``socket`` (what nginx's ``uwsgi_pass`` speaks).

A request is a 4-byte header (modifier1, 16-bit little-endian size of the
vars block, modifier2), the vars block (repeated 16-bit LE key length, key,
16-bit LE value length, value: CGI variables as ``uwsgi_params`` sets them),
then CONTENT_LENGTH bytes of body. The answer is a plain HTTP response and
the connection closes after it, as nginx expects from a uwsgi upstream.
"""

from __future__ import annotations

import functools
import io
import socket
import struct
import sys
import time
from collections.abc import Callable

from bedrock.log import log
from vassal import rpc, uwsgi_api
from vassal.http import STATUS_TEXT, FileWrapper, RequestHook, _Response, run_app
from vassal.signals import SignalError
from vassal.spool import (
    STREAM_START,
    STREAM_THRESHOLD,
    BodySpool,
    SpoolBudget,
    StreamedBody,
    refusal,
    room_needed,
)

WSGI_MODIFIER1 = 0
DISCARD_SECONDS = 5.0  # the most spent dropping a body the app did not read
HEADER = 4


ENV_DEFAULTS = {"SCRIPT_NAME": "", "PATH_INFO": "/", "QUERY_STRING": "", "SERVER_NAME": "localhost",
                "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1"}
# wsgi.input ends where the body does (read whole, or streamed to its CONTENT_LENGTH).
WSGI_CONSTANTS = {"wsgi.version": (1, 0), "wsgi.multithread": False, "wsgi.multiprocess": True,
                  "wsgi.run_once": False, "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True}


@functools.lru_cache(maxsize=64)
def env_defaults(server: tuple[str, str]) -> dict[str, str]:
    """CGI defaults for what a peer leaves out, with the listener's own
    SERVER_NAME and SERVER_PORT (nginx's params, when sent, win)."""
    return {**ENV_DEFAULTS, "SERVER_NAME": server[0], "SERVER_PORT": server[1]}


class ProtocolError(Exception):
    pass


def _parse_vars_py(block: bytes, start: int = 0, end: int | None = None, defaults: dict | None = None,
                   overrides: dict | None = None) -> dict:
    """The vars of ``block[start:end]`` over a copy of ``defaults``, with
    ``overrides`` applied last. Latin-1 maps bytes to characters one to one,
    so the block is decoded once and sliced at byte offsets."""
    end = len(block) if end is None else end
    text = block[start:end].decode("latin-1")
    env: dict = dict(defaults) if defaults else {}
    offset, stop = 0, end - start
    base = start
    while offset < stop:
        if offset + 2 > stop:
            raise ProtocolError("truncated key length")
        at = base + offset
        key_end = offset + 2 + (block[at] | block[at + 1] << 8)
        if key_end + 2 > stop:
            raise ProtocolError("truncated value length" if key_end <= stop else "truncated key")
        at = base + key_end
        value_end = key_end + 2 + (block[at] | block[at + 1] << 8)
        if value_end > stop:
            raise ProtocolError("truncated value")
        env[text[offset + 2:key_end]] = text[key_end + 2:value_end]
        offset = value_end
    if overrides:
        env.update(overrides)
    return env


try:
    from vassal._speedups import (
        parse_vars as _fast_parse_vars,  # built by setup.py when a compiler is there
    )
except ImportError:
    _fast_parse_vars = _parse_vars_py


def parse_vars(block: bytes, start: int = 0, end: int | None = None) -> dict[str, str]:
    """The vars of ``block[start:end]`` (C when built); ProtocolError names a truncation."""
    try:
        return _fast_parse_vars(block, start, len(block) if end is None else end, {}, {})
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def encode_vars(env: dict[str, str]) -> bytes:
    """The other direction (for tests and tools)."""
    out = bytearray()
    for key, value in env.items():
        k, v = key.encode("latin-1"), value.encode("latin-1")
        out += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    return bytes(out)


class UwsgiConnection:
    """One request per connection; ``feed`` returns False once it should close."""

    def __init__(self, sock: socket.socket, peer, server: tuple[str, str], app: Callable, max_head: int = 65536,
                 max_body: int = 0, on_request: RequestHook | None = None, body_timeout: float = 4.0,
                 spool: SpoolBudget | None = None):
        self.sock = sock
        self.spool = spool  # body-spool-limit: the worker's, as HTTP's (vassal.http_parser)
        self.app = app
        self.defaults = env_defaults(server)
        self.max_head = max_head
        self.max_body = max_body
        self.on_request = on_request
        self.buffer = bytearray()
        self.env: dict[str, str] | None = None
        self.body: BodySpool | StreamedBody | None = None
        self.remaining = 0
        self.size = 0  # the body's, announced
        self.body_timeout = body_timeout

    @property
    def idle(self) -> bool:
        return not self.buffer and self.env is None

    @property
    def in_body(self) -> bool:
        """A body the worker's loop reads is coming in (held to BodyPace)."""
        return self.env is not None and self.remaining > 0 and not getattr(self.body, "sock", None)

    def close(self) -> None:
        """The connection is gone (the worker calls this)."""
        if self.body is not None:
            self.body.close()

    def feed(self, data: bytes) -> bool:
        if not data:
            return False
        if self.env is None:
            if self.buffer:
                self.buffer += data
                data = bytes(self.buffer)
            if len(data) < HEADER:
                self.buffer = bytearray(data)
                return True
            modifier1, size = data[0], data[1] | data[2] << 8
            if modifier1 != WSGI_MODIFIER1:
                if modifier1 in (rpc.RPC_MODIFIER1, rpc.SIGNAL_MODIFIER1) and uwsgi_api.current() is not None:
                    return self._uwsgi_api(data, modifier1, size)
                self._error(501, f"unsupported modifier1 {modifier1}")
                return False
            if size > self.max_head:
                self._error(431, f"vars block of {size} bytes")
                return False
            head_end = HEADER + size
            if len(data) < head_end:
                self.buffer = bytearray(data)
                return True
            self.buffer = bytearray()
            try:
                self.env = _fast_parse_vars(data, HEADER, head_end)  # ValueError or ProtocolError
                length = self.env.get("CONTENT_LENGTH")
                if length and not (length.isascii() and length.isdigit() and len(length) <= 18):
                    raise ValueError(f"CONTENT_LENGTH is not a length: {length[:40]!r}")  # (no sign, space or _)
                self.remaining = self.size = int(length) if length else 0
            except (ProtocolError, ValueError) as exc:
                self._error(400, str(exc))
                return False
            if self.max_body and self.remaining > self.max_body:
                self._error(413, f"body of {self.remaining} bytes")
                return False
            if self.spool is not None and room_needed(self.remaining) > self.spool.limit:
                self._error(*refusal(self.spool, room_needed(self.remaining)))
                return False
            if self.remaining == 0:
                # The common case (nginx, a GET): no body, no spool.
                self._handle(io.BytesIO())
                return False
            # (past STREAM_THRESHOLD the app reads the rest itself, once
            # STREAM_START bytes are here: see vassal.spool)
            self.body = StreamedBody(self.remaining) if self.remaining > STREAM_THRESHOLD else BodySpool()
            data = data[head_end:]
        body = self.body
        assert body is not None
        if data:
            chunk = data[: self.remaining] if len(data) > self.remaining else data
            if self.spool is not None and not body.reserve(len(chunk), self.spool):
                self._error(*refusal(self.spool, room_needed(self.size - self.remaining + len(chunk))))
                return False
            try:
                body.write(chunk)
            except OSError as exc:  # (the spool's directory is full, or not writable)
                self._error(500, f"cannot spool the request body: {exc.strerror or exc}")
                return False
            self.remaining -= len(chunk)
        if self.remaining > 0 and (type(body) is not StreamedBody or body.buffered < STREAM_START):
            return True
        if type(body) is StreamedBody:
            body.attach(self.sock, self.body_timeout)
        self._handle(body)
        return False

    def _uwsgi_api(self, data: bytes, modifier1: int, size: int) -> bool:
        """uWSGI's RPC (173) and remote signal (110) packets: answered
        once whole, then the connection closes."""
        runtime = uwsgi_api.current()
        assert runtime is not None
        if modifier1 == rpc.SIGNAL_MODIFIER1:
            try:
                runtime.signal(data[3])
                accepted = True
            except (SignalError, OSError) as exc:
                log(f"remote signal {data[3]} refused: {exc}")
                accepted = False
            answer = rpc.signal_answer(accepted)
        else:
            if len(data) < HEADER + size:
                self.buffer = bytearray(data)
                return True
            answer = rpc.rpc_answer(runtime.rpc, data[HEADER:HEADER + size], data[3])
        self.buffer = bytearray()
        if answer:
            try:
                self.sock.sendall(answer)
            except OSError:
                pass
        return False

    def _error(self, status: int, detail: str) -> None:
        send_error(self.sock, status, detail)

    def _handle(self, body: BodySpool | StreamedBody | io.BytesIO) -> None:
        respond(self.sock, self.env, body, self.app, self.on_request, defaults=self.defaults)  # type: ignore[arg-type]
        if type(body) is StreamedBody and not body.complete:
            # The app left part of it: read and drop the rest before the
            # close, or the kernel resets the answer away (nginx: 502).
            body.discard(DISCARD_SECONDS)


def respond(sock, variables: dict, body: BodySpool | StreamedBody | io.BytesIO, app: Callable, on_request: RequestHook | None,
            complete: bool = False, defaults: dict[str, str] = ENV_DEFAULTS) -> None:
    """Run the app for one parsed request and send its answer. ``complete``:
    the vars were parsed over the defaults with WSGI_CONSTANTS (one C call)."""
    # nginx sends most of these; the rest get CGI defaults.
    env: dict = variables if complete else defaults | variables | WSGI_CONSTANTS
    if not env.get("CONTENT_LENGTH"):
        env.pop("CONTENT_LENGTH", None)
    https = env.get("HTTPS")
    env["wsgi.url_scheme"] = "https" if https and https.lower() in ("on", "1") else env.get("UWSGI_SCHEME", "http")
    env["wsgi.input"] = body if type(body) is io.BytesIO else body.finish()
    env["wsgi.errors"] = sys.stderr
    response = _Response(sock, False, env.get("REQUEST_METHOD") == "HEAD", False)
    run_app(app, env, response, body, time.monotonic(), on_request, lambda: send_error(sock, 500, "app error"))


def respond_whole(sock, data: bytes, app: Callable, on_request: RequestHook | None, max_head: int,
                  defaults: dict[str, str] = ENV_DEFAULTS) -> bool:
    """The common case in one call: ``data`` is one whole bodyless request
    (nginx's upstream GET, read at accept). False: leave it to UwsgiConnection,
    which also answers what is malformed."""
    if len(data) < HEADER or data[0] != WSGI_MODIFIER1:
        return False
    size = data[1] | data[2] << 8
    if len(data) != HEADER + size or size > max_head:
        return False
    try:
        env = _fast_parse_vars(data, HEADER, HEADER + size, defaults, WSGI_CONSTANTS)
    except (ProtocolError, ValueError):
        return False
    length = env.get("CONTENT_LENGTH")
    if length and length != "0":
        return False
    respond(sock, env, io.BytesIO(), app, on_request, complete=True)
    return True


def send_error(sock, status: int, detail: str) -> None:
    text = STATUS_TEXT.get(status, "Error")
    try:
        sock.sendall(f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {len(text) + 1}\r\n\r\n{text}\n".encode())
    except OSError:
        pass
    log(f"bad uwsgi request: {detail}")
