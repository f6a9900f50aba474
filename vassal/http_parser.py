"""HTTP/1.1 requests off the wire (RFC 9112), strict wherever framing,
routing or the environ's headers are at stake.

Incremental: ``feed`` takes whatever arrived (one byte or many requests) and
queues complete requests in ``done``; a request that cannot be answered
safely raises :class:`Rejected` with the status to send before closing.
Lines are checked as they arrive, so an oversized request line (414), field
(431) or head (431) is refused without waiting for the rest of it, and
nothing is scanned twice.

What is refused, and why (each is a way for two parsers to disagree):
a bare LF or CR, NUL and other controls, whitespace before a field's colon,
obs-fold; Transfer-Encoding with Content-Length, or on HTTP/1.0, or with a
coding other than one final ``chunked`` (501); two Content-Lengths, two
Hosts, two Content-Types, no Host on HTTP/1.1; a chunk size that is not
plain hex; trailers that name framing, routing or authentication fields.
Trailers never become request headers: they are kept apart in
``Request.trailers``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vassal.spool import (
    STREAM_START,
    STREAM_THRESHOLD,
    BodySpool,
    SpoolBudget,
    StreamedBody,
    refusal,
    room_needed,
)

TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# field-value: any octet but the controls (HTAB allowed); the OWS around it
# is stripped afterwards (a lazy group here would backtrack quadratically
# over a run of spaces).
_FIELD = re.compile(rb"([" + TCHAR + rb"]+):([^\x00-\x08\x0a-\x1f\x7f]*)")
_REQUEST_LINE = re.compile(rb"([" + TCHAR + rb"]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(rb"[" + TCHAR + rb"]+")
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
# chunk-size [ chunk-ext ]: BWS around ";" and "=" (RFC 9112 section 7.1.1).
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*[" + TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + TCHAR + rb"]+|" + _QUOTED + rb"))?)*)"
)
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([/?][^#]*)?")

# Fields a request may carry once only: the server acts on exactly one.
SINGLETONS = frozenset((b"host", b"content-length", b"content-type"))
# Trailers that would change how the request was framed, routed or
# authenticated if anyone merged them (RFC 9110 section 6.5.1).
FORBIDDEN_TRAILERS = frozenset((
    b"host", b"content-length", b"content-type", b"content-encoding", b"content-range", b"transfer-encoding",
    b"te", b"trailer", b"connection", b"keep-alive", b"upgrade", b"expect", b"range", b"authorization",
    b"proxy-authorization", b"cookie", b"set-cookie", b"www-authenticate", b"x-forwarded-for",
    b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip", b"forwarded", b"max-forwards", b"cache-control",
))
# The fields _head_complete acts on (any other is only collected).
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _HOST_FIELD, _EXPECT, _OTHER_SINGLETON = range(6)
_SPECIAL = {b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING, b"connection": _CONNECTION,
            b"host": _HOST_FIELD, b"expect": _EXPECT, b"content-type": _OTHER_SINGLETON}
MAX_CHUNK_LINE = 4096  # a size and its extensions
MAX_LEADING_EMPTY_LINES = 8  # RFC 9112 section 2.2: ignore a few CRLFs before a request


def _lex_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Field lines as (lower-case name, value without its OWS)."""
    fields = []
    for raw in lines:
        match = _FIELD.fullmatch(raw)
        if match is None:
            if raw[:1] in (b" ", b"\t"):
                raise Rejected(400, "obsolete line folding")
            raise Rejected(400, "malformed header field")
        name, value = match.groups()
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


try:
    from vassal._speedups import lex_head as _lex_head  # the same lexing in C, when built
except ImportError:  # pragma: no cover - a machine without a compiler
    _lex_head = None


class Rejected(Exception):
    """A request refused with ``status`` before the app sees it."""

    def __init__(self, status: int, detail: str = ""):
        super().__init__(detail or str(status))
        self.status = status
        self.detail = detail


class RequestTooLarge(Rejected):
    pass


@dataclass(frozen=True)
class Limits:
    head: int = 65536  # buffer-size: the whole head
    request_line: int = 8190  # limit-request-line (414)
    fields: int = 100  # limit-request-fields (431)
    field_size: int = 8190  # limit-request-field-size (431)
    body: int = 0  # limit-post (413; 0: none)
    body_timeout: float = 4.0  # socket-timeout: a streamed body's longest stall
    keep_alive: bool = True  # http-keepalive > 0 (at 0 every answer says close, and closes)
    spool: SpoolBudget | None = None  # body-spool-limit: the worker's, shared by its connections (413)


class Request:
    """One request as parsed; ``headers`` hold lower-case names."""

    __slots__ = ("method", "target", "version", "headers", "body", "trailers", "keep_alive", "expect_continue",
                 "chunked", "path", "query", "host", "queued")

    def __init__(self, method: bytes = b"", target: bytes = b"", version: str = "1.1"):
        self.method = method
        self.target = target
        self.version = version
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: BodySpool | StreamedBody = BodySpool()
        self.queued = False  # (a streamed body's request is queued before its body is all there)
        self.trailers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.expect_continue = False
        self.chunked = False
        self.path = b""  # the target's path (absolute-form: without scheme and authority)
        self.query: bytes | None = None
        self.host: bytes | None = None  # from the target (absolute-form) or the Host field


# Parser states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(6)


class RequestParser:
    def __init__(self, limits: Limits, on_expect: Callable[[], None] | None = None):
        self.limits = limits
        self.on_expect = on_expect
        self.done: deque[Request] = deque()
        self.current: Request | None = None
        self._buf = bytearray()
        self._state = _HEAD
        self._head_size = 0
        self._lines: list[bytes] = []
        self._empty_lines = 0
        self._remaining = 0
        self._body_size = 0
        self._scanned = 0
        self._failed: Rejected | None = None

    @property
    def idle(self) -> bool:
        """Between requests, with nothing of the next one received."""
        return self.current is None and not self._buf and not self.done

    @property
    def in_head(self) -> bool:
        """Part of a request head received, not all of it."""
        return (self.current is None and bool(self._buf)) or (self.current is not None and self._state == _HEAD)

    @property
    def in_body(self) -> bool:
        """A request's head received, not all of its body."""
        return self.current is not None and self._state != _HEAD

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            if self._state == _BODY and not self._buf:
                data = self._body_direct(data)
            if self.current is None and not self._buf and self._state == _HEAD:
                data = self._whole_head(data)  # the common case, at a request's start
                if self._state == _BODY and data:
                    data = self._body_direct(data)
            if data:
                self._buf += data
                self._run()
        except Rejected as exc:
            self._failed = exc
            self._buf.clear()
            if self.current is not None:
                # (its spool goes now, not when the connection ends: that
                # may linger, reading and dropping what the client sends)
                self.current.body.close()
            raise

    def _body_direct(self, data: bytes) -> bytes:
        """Body bytes taken as they came, not through the line buffer (a
        copy less per read of an upload); what follows the body is returned."""
        take = min(len(data), self._remaining)
        self._body(data if take == len(data) else data[:take])
        self._remaining -= take
        if self._remaining == 0:
            self._complete()
        return data[take:]

    def _whole_head(self, data: bytes) -> bytes:
        """A head that arrived whole, lexed in one pass (line by line, as
        _run does, costs microseconds more per request: in C where
        vassal._speedups was built); the bytes after it are returned.
        Anything unusual is left to _run, which says what is wrong."""
        limits = self.limits
        if _lex_head is not None:
            lexed = _lex_head(data, limits.head, limits.request_line, limits.field_size, limits.fields)
            if lexed is None:
                return data
            end, method, target, minor, fields = lexed
            self.current = Request(method, target, "1.0" if minor == b"0" else "1.1")
            self._head_size = end
            self._head_complete(fields)
            return data[end:]
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            return data
        head = data[:end]
        lines = head.split(b"\r\n")
        # Every CR and LF belongs to a CRLF, no line is too long, none too many:
        # else the line by line path says which it is.
        if (head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1
                or end + 4 > limits.head or len(lines) - 1 > limits.fields
                or not lines[0] or (end > min(limits.request_line, limits.field_size)
                                    and (len(lines[0]) > limits.request_line
                                         or max(map(len, lines[1:]), default=0) > limits.field_size))):
            return data
        self._request_line(lines[0])
        self._head_size = end + 4
        self._head_complete(_lex_fields(lines[1:]))
        return data[end + 4:]

    # --- the state machine -----------------------------------------------------
    def _run(self) -> None:
        buf = self._buf
        pos = 0
        # A partial line left by the last feed was searched up to here
        # already: a line fed byte by byte is not rescanned (quadratic).
        scanned, self._scanned = self._scanned, 0
        while True:
            state = self._state
            if state == _HEAD or state == _TRAILERS:
                end = buf.find(b"\n", max(pos, scanned))
                scanned = 0
                if end < 0:
                    # (a CR at the very end may be its line's own: not counted)
                    self._check_partial_line(len(buf) - pos - (buf[-1] == 13))
                    self._scanned = len(buf) - pos
                    break
                line = bytes(buf[pos:end])
                pos = end + 1
                if not line.endswith(b"\r"):
                    raise Rejected(400, "bare LF in the request head")
                self._line(line[:-1], len(line) + 1)
            elif state == _BODY or state == _CHUNK_DATA:
                take = min(len(buf) - pos, self._remaining)
                if take == 0:
                    break
                self._body(bytes(buf[pos:pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    if state == _BODY:
                        self._complete()
                    else:
                        self._state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\n", max(pos, scanned))
                scanned = 0
                if end < 0:
                    if len(buf) - pos > MAX_CHUNK_LINE:
                        raise Rejected(400, "chunk size line too long")
                    self._scanned = len(buf) - pos
                    break
                line = bytes(buf[pos:end])
                pos = end + 1
                self._chunk_size(line)
            else:  # _CHUNK_END: the CRLF after a chunk's data
                if len(buf) - pos < 2:
                    if len(buf) > pos and buf[pos] != 13:
                        raise Rejected(400, "chunk data not followed by CRLF")
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise Rejected(400, "chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
        if pos:
            del buf[:pos]

    def _check_partial_line(self, pending: int) -> None:
        """Refuse a line that is already too long, before it ends."""
        if self._state == _HEAD and self.current is None:
            if pending > self.limits.request_line:
                raise RequestTooLarge(414, "request line too long")
        elif pending > self.limits.field_size:
            raise RequestTooLarge(431, "header field too large")
        if self._head_size + pending > self.limits.head:
            raise RequestTooLarge(431, "request head too large")

    def _line(self, line: bytes, size: int) -> None:
        if self.current is None and len(line) > self.limits.request_line:
            raise RequestTooLarge(414, "request line too long")
        self._head_size += size
        if self._head_size > self.limits.head:
            raise RequestTooLarge(431, "request head too large")
        if self._state == _TRAILERS:
            if line:
                self._trailer(line)
            else:
                self._complete()
            return
        if self.current is None:
            if not line:
                self._empty_lines += 1
                if self._empty_lines > MAX_LEADING_EMPTY_LINES:
                    raise Rejected(400, "empty lines instead of a request")
                self._head_size = 0
                return
            self._request_line(line)
        elif line:
            if len(line) > self.limits.field_size:
                raise RequestTooLarge(431, "header field too large")
            if len(self._lines) >= self.limits.fields:
                raise RequestTooLarge(431, "too many header fields")
            self._lines.append(line)
        else:
            self._head_complete(_lex_fields(self._lines))

    def _request_line(self, line: bytes) -> None:
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            if b" " in line and b"HTTP/" not in line.rsplit(b" ", 1)[-1]:
                raise Rejected(400, "no HTTP version (HTTP/0.9 is not served)")
            raise Rejected(400, "malformed request line")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise Rejected(505, f"HTTP/{major.decode()}.{minor.decode()} not supported")
        self.current = Request(method=method, target=target, version="1.0" if minor == b"0" else "1.1")
        self._lines = []

    def _head_complete(self, fields: list[tuple[bytes, bytes]]) -> None:
        req = self.current
        assert req is not None
        self._lines = []
        counts: dict[bytes, int] = {}
        codings: list[bytes] = []
        framed_by_te = False
        length: int | None = None
        connection: list[bytes] = []
        headers = req.headers
        for name, value in fields:
            headers.append((name, value))
            special = _SPECIAL.get(name)
            if special is None:
                continue
            if name in SINGLETONS:
                if name in counts:
                    raise Rejected(400, f"more than one {name.decode()} field")
                counts[name] = 1
            if special == _CONTENT_LENGTH:
                if not value.isdigit() or len(value) > 18:
                    raise Rejected(400, "invalid Content-Length")
                length = int(value)
            elif special == _TRANSFER_ENCODING:
                framed_by_te = True  # present, even empty: it must then be valid
                codings += [c.strip(b" \t").lower() for c in value.split(b",") if c.strip(b" \t")]
            elif special == _CONNECTION:
                connection += [c.strip(b" \t").lower() for c in value.split(b",")]
            elif special == _HOST_FIELD:
                req.host = value
            elif special == _EXPECT and value.lower() == b"100-continue" and req.version == "1.1":
                req.expect_continue = True
        seen = counts
        if req.method == b"CONNECT":
            raise Rejected(501, "CONNECT is not served (no tunnels)")
        self._target(req)
        if req.version == "1.1" and b"host" not in seen:
            raise Rejected(400, "HTTP/1.1 request without Host")
        if req.host is not None and _HOST.fullmatch(req.host) is None:
            raise Rejected(400, "invalid Host")
        if req.version == "1.1":
            req.keep_alive = b"close" not in connection
        else:
            req.keep_alive = b"keep-alive" in connection and b"close" not in connection
        if not self.limits.keep_alive:
            req.keep_alive = False
        if framed_by_te:
            if req.version == "1.0":
                raise Rejected(400, "Transfer-Encoding on HTTP/1.0")  # RFC 9112 section 6.1: faulty framing
            if length is not None:
                raise Rejected(400, "both Transfer-Encoding and Content-Length")
            if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                raise Rejected(400, "Transfer-Encoding does not end in one chunked")
            if len(codings) > 1:
                raise Rejected(501, f"transfer coding {codings[0].decode('latin-1')} not supported")
            req.chunked = True
        if self.limits.body and length is not None and length > self.limits.body:
            raise RequestTooLarge(413, "request body too large")
        spool = self.limits.spool
        if spool is not None and length and room_needed(length) > spool.limit:
            self._no_room(spool, room_needed(length))  # (known from the head: no need to read it first)
        if req.expect_continue and self.on_expect is not None and (req.chunked or length):
            if spool is not None and spool.used + max(1, room_needed(length or 0)) > spool.limit:
                self._no_room(spool, 0)  # (before the go-ahead: else the client sends it all for a refusal)
            self.on_expect()
        if req.chunked:
            self._state = _CHUNK_SIZE
        elif length:
            self._remaining = length
            self._state = _BODY
            if length > STREAM_THRESHOLD:
                req.body = StreamedBody(length)
        else:
            self._complete()

    def _target(self, req: Request) -> None:
        target = req.target
        if target.startswith(b"/"):
            path, sep, query = target.partition(b"?")
            req.path, req.query = path, (query if sep else None)
            return
        if target == b"*":
            if req.method != b"OPTIONS":
                raise Rejected(400, "the asterisk form is for OPTIONS only")
            req.path = b"*"
            return
        match = _ABSOLUTE.fullmatch(target)
        if match is None:
            raise Rejected(400, "malformed request target")
        scheme, authority, rest = match.groups()
        if scheme.lower() not in (b"http", b"https"):
            raise Rejected(400, "the request target's scheme is not http")
        # RFC 9110 section 4.2.4: userinfo in an http(s) URI is an error.
        if b"@" in authority or not authority or _HOST.fullmatch(authority) is None:
            raise Rejected(400, "malformed authority in the request target")
        hostport = authority
        # RFC 9112 section 3.2.2: the target's authority replaces Host.
        req.host = hostport
        path, sep, query = (rest or b"/").partition(b"?")
        req.path, req.query = (path or b"/"), (query if sep else None)

    def _chunk_size(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:  # (also when it came whole: the same bytes in pieces were refused)
            raise Rejected(400, "chunk size line too long")
        if not line.endswith(b"\r"):
            raise Rejected(400, "bare LF in chunked framing")
        match = _CHUNK_LINE.fullmatch(line[:-1])
        if match is None:
            raise Rejected(400, "malformed chunk size")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _TRAILERS
            self._lines = []
            return
        if self.limits.body and self._body_size + size > self.limits.body:
            raise RequestTooLarge(413, "request body too large")
        self._remaining = size
        self._state = _CHUNK_DATA

    def _trailer(self, line: bytes) -> None:
        req = self.current
        assert req is not None
        if len(line) > self.limits.field_size:
            raise RequestTooLarge(431, "trailer field too large")
        if len(req.headers) + len(req.trailers) >= self.limits.fields:
            raise RequestTooLarge(431, "too many header and trailer fields")
        match = _FIELD.fullmatch(line)
        if match is None:
            raise Rejected(400, "malformed trailer field")
        name, value = match.groups()
        name, value = name.lower(), value.strip(b" \t")
        if name in FORBIDDEN_TRAILERS:
            raise Rejected(400, f"trailer {name.decode()} is not allowed")
        req.trailers.append((name, value))

    def _body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self.limits.body and self._body_size > self.limits.body:
            raise RequestTooLarge(413, "request body too large")
        req = self.current
        assert req is not None
        # (charged as it comes, not as announced: a 1 GiB chunk size alone takes no room from others)
        if (spool := self.limits.spool) is not None and not req.body.reserve(len(data), spool):
            self._no_room(spool, self._body_size if req.chunked else room_needed(self._body_size))
        try:
            req.body.write(data)
        except OSError as exc:  # (the spool's directory is full, or not writable)
            raise Rejected(500, f"cannot spool the request body: {exc.strerror or exc}") from None
        if not req.queued and type(req.body) is StreamedBody and req.body.buffered >= STREAM_START:
            # Enough of it is here: the app runs and reads the rest itself
            # (StreamedBody), telling us with body_received.
            req.queued = True
            self.done.append(req)

    def _no_room(self, spool: SpoolBudget, needed: int) -> None:
        """``needed``: what of the limit this body takes alone."""
        status, why = refusal(spool, needed)
        raise (RequestTooLarge if status == 413 else Rejected)(status, why)

    def close(self) -> None:
        """The connection is gone: the bodies it holds (the one coming in,
        requests parsed and not answered) give their room back now, not
        when a garbage collection finds them."""
        if self.current is not None:
            self.current.body.close()
            self.current = None
        while self.done:
            self.done.popleft().body.close()
        self.on_expect = None  # (a bound method of the connection: a cycle)

    def body_received(self, count: int) -> None:
        """``count`` bytes of the current (streamed) body were read off the
        connection by its reader, not fed here."""
        self._body_size += count
        self._remaining -= count
        if self._remaining == 0:
            self._complete()

    def _complete(self) -> None:
        assert self.current is not None
        if not self.current.queued:
            self.done.append(self.current)
        self.current = None
        self._state = _HEAD
        self._head_size = 0
        self._body_size = 0
        self._empty_lines = 0
