"""The uwsgi binary protocol on ``socket`` (what nginx's ``uwsgi_pass`` speaks).

A request is a 4-byte header (modifier1, 16-bit little-endian size of the
vars block, modifier2), the vars block (repeated 16-bit LE key length, key,
16-bit LE value length, value: CGI variables as ``uwsgi_params`` sets them),
then CONTENT_LENGTH bytes of body. The answer is a plain HTTP response and
the connection closes after it, as nginx expects from a uwsgi upstream.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Callable

from vassal.http import STATUS_TEXT, FileWrapper, _Response, run_app
from vassal.log import log
from vassal.spool import BodySpool

WSGI_MODIFIER1 = 0
HEADER = 4


class ProtocolError(Exception):
    pass


def parse_vars(block: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    offset, end = 0, len(block)
    while offset < end:
        if offset + 2 > end:
            raise ProtocolError("truncated key length")
        (klen,) = struct.unpack_from("<H", block, offset)
        offset += 2
        key = block[offset:offset + klen]
        offset += klen
        if offset + 2 > end:
            raise ProtocolError("truncated value length")
        (vlen,) = struct.unpack_from("<H", block, offset)
        offset += 2
        if offset + vlen > end:
            raise ProtocolError("truncated value")
        env[key.decode("latin-1")] = block[offset:offset + vlen].decode("latin-1")
        offset += vlen
    return env


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
                 max_body: int = 0, on_request: Callable[[str], None] | None = None):
        self.sock = sock
        self.app = app
        self.max_head = max_head
        self.max_body = max_body
        self.on_request = on_request
        self.buffer = bytearray()
        self.env: dict[str, str] | None = None
        self.body: BodySpool | None = None
        self.remaining = 0

    @property
    def idle(self) -> bool:
        return not self.buffer and self.env is None

    def feed(self, data: bytes) -> bool:
        if not data:
            return False
        if self.env is None:
            self.buffer += data
            if len(self.buffer) < HEADER:
                return True
            modifier1, size, _modifier2 = struct.unpack_from("<BHB", self.buffer)
            if modifier1 != WSGI_MODIFIER1:
                self._error(501, f"unsupported modifier1 {modifier1}")
                return False
            if size > self.max_head:
                self._error(431, f"vars block of {size} bytes")
                return False
            if len(self.buffer) < HEADER + size:
                return True
            try:
                self.env = parse_vars(bytes(self.buffer[HEADER:HEADER + size]))
                self.remaining = int(self.env.get("CONTENT_LENGTH") or 0)
            except (ProtocolError, ValueError) as exc:
                self._error(400, str(exc))
                return False
            if self.max_body and self.remaining > self.max_body:
                self._error(413, f"body of {self.remaining} bytes")
                return False
            self.body = BodySpool()
            data = bytes(self.buffer[HEADER + size:])
            self.buffer.clear()
        assert self.body is not None
        if data:
            chunk = data[: self.remaining]
            self.body.write(chunk)
            self.remaining -= len(chunk)
        if self.remaining > 0:
            return True
        self._handle()
        return False

    def _error(self, status: int, detail: str) -> None:
        text = STATUS_TEXT.get(status, "Error")
        try:
            self.sock.sendall(f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {len(text) + 1}\r\n\r\n{text}\n".encode())
        except OSError:
            pass
        log(f"bad uwsgi request: {detail}")

    def _handle(self) -> None:
        env: dict = dict(self.env or {})
        assert self.body is not None
        env.setdefault("SCRIPT_NAME", "")
        env.setdefault("PATH_INFO", "/")
        env.setdefault("QUERY_STRING", "")
        env.setdefault("SERVER_NAME", "localhost")
        env.setdefault("SERVER_PORT", "0")
        env.setdefault("SERVER_PROTOCOL", "HTTP/1.1")
        if not env.get("CONTENT_LENGTH"):
            env.pop("CONTENT_LENGTH", None)
        env.update({
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if env.get("HTTPS", "").lower() in ("on", "1") else env.get("UWSGI_SCHEME", "http"),
            "wsgi.input": self.body.finish(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
        })
        head_only = env.get("REQUEST_METHOD") == "HEAD"
        started = time.monotonic()
        response = _Response(self.sock, False, head_only, False)
        run_app(self.app, env, response, self.body, started, self.on_request, lambda: self._error(500, "app error"))
