"""uWSGI's RPC: functions an app registers by name and calls locally or on
another node over the uwsgi protocol, and remote signals.

On the wire (uWSGI 2.0's rpc and signal plugins), a call is a uwsgi packet
with modifier1 173 whose body is a uwsgi array: each item a 16-bit
little-endian length and its bytes, the function name first, then the
arguments. The answer, with modifier2 0, is a header (173, length, 0) and
the result; with modifier2 1 the result alone. A call that fails (no such
function, an error, an empty result) gets nothing: the connection closes,
and the caller's ``uwsgi.rpc`` gives None. uWSGI answers a result over
65535 bytes with modifier2 5: a vars block with CONTENT_LENGTH, then the
result; ours reads that, and refuses to make results that large.
A remote signal is a bare header with modifier1 110 and the signal number
in modifier2; the answer is ``\\xff\\x00\\x00\\x01`` (``...\\x00`` refused).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from bedrock.log import log

RPC_MODIFIER1 = 173
SIGNAL_MODIFIER1 = 110
SIGNAL_REPLY = 255
MAX_RESULT = 0xFFFF  # a result travels in a 16-bit length
MAX_PACKET = 0xFFFF
MAX_NAME = 254  # uWSGI refuses 255 and longer
MAX_ARGS = 254  # an array of at most 255 items, the name included
LONG_RESULT = 5  # modifier2 of uWSGI's answer with a 64-bit length
MAX_REMOTE_RESULT = 16 * 1024 * 1024  # what a call takes from another node


class RpcError(ValueError):
    """Not callable as asked: said the way uWSGI's module says it."""


class RpcArgumentError(RpcError, TypeError):
    """Not bytes (uWSGI's module raises ValueError; a TypeError too here)."""


def as_bytes(value: object, what: str) -> bytes:
    """uWSGI's module takes bytes; str is accepted too (as UTF-8)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise RpcArgumentError(f"{what} must be bytes or str, not {type(value).__name__}")


def encode_array(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<H", len(item)) + item for item in items)


def parse_array(block: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(block):
        if offset + 2 > len(block) or len(items) > MAX_ARGS:
            raise RpcError("malformed rpc array")
        size = block[offset] | block[offset + 1] << 8
        offset += 2
        if offset + size > len(block):
            raise RpcError("malformed rpc array")
        items.append(block[offset:offset + size])
        offset += size
    return items


class RpcTable:
    """This process's functions: registered in the master, they are every
    worker's (inherited at fork); in a worker, that worker's alone."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.functions: dict[bytes, Callable] = {}

    def register(self, name: object, func: object, where: str) -> None:
        key = as_bytes(name, "the function name")
        if not callable(func):
            raise TypeError("the rpc function must be callable")
        if not key or len(key) > MAX_NAME:
            log(f"rpc: the name of {len(key)} bytes is {'empty' if not key else 'too long'} (1 to {MAX_NAME})")
            raise RpcError("unable to register rpc function")
        if key not in self.functions and len(self.functions) >= self.limit:
            log(f"rpc: {key.decode(errors='replace')!r} refused: rpc-max {self.limit} functions already registered")
            raise RpcError("unable to register rpc function")
        self.functions[key] = func
        log(f"registered {'shared/inherited ' if where == 'master' else ''}RPC function \"{key.decode(errors='replace')}\""
            + ("" if where == "master" else f" on {where}"))

    def names(self) -> tuple[bytes, ...]:
        return tuple(self.functions)

    def call(self, name: bytes, args: list[bytes]) -> bytes | None:
        """The result, or None (logged) when there is none to give."""
        func = self.functions.get(name)
        shown = name.decode(errors="replace")
        if func is None:
            log(f"rpc: no function {shown!r}")
            return None
        try:
            result = func(*args)
        except BaseException as exc:  # (SystemExit too: a client must not end the worker)
            log(f"rpc: {shown!r} raised {type(exc).__name__}: {exc}")
            return None
        if result is None:
            return None
        if isinstance(result, str):
            result = result.encode()
        if not isinstance(result, bytes | bytearray | memoryview):
            log(f"rpc: {shown!r} returned {type(result).__name__}, not bytes")
            return None
        result = bytes(result)
        if len(result) > MAX_RESULT:
            log(f"rpc: {shown!r} returned {len(result)} bytes, more than {MAX_RESULT}")
            return None
        return result or None


def request_packet(name: bytes, args: list[bytes]) -> bytes:
    if len(args) > MAX_ARGS:
        raise RpcError(f"at most {MAX_ARGS} rpc arguments")
    body = encode_array([name, *args])
    if len(body) > MAX_PACKET:
        raise RpcError(f"rpc packet of {len(body)} bytes: at most {MAX_PACKET}")
    return bytes((RPC_MODIFIER1,)) + struct.pack("<H", len(body)) + b"\x00" + body


def connect(node: str, timeout: float) -> socket.socket:
    """``host:port`` or a unix socket path, as uWSGI's nodes are named."""
    if ":" in node and not node.startswith("/"):
        host, _, port = node.rpartition(":")
        return socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(node)
    except OSError:
        sock.close()
        raise
    return sock


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def remote_call(node: str, name: bytes, args: list[bytes], timeout: float) -> bytes | None:
    """One call on another node; None when it answers nothing (uWSGI's way
    of failing). OSError when it cannot be reached in time."""
    with connect(node, timeout) as sock:
        sock.sendall(request_packet(name, args))
        header = _read_exactly(sock, 4)
        if len(header) < 4:
            return None
        size = header[1] | header[2] << 8
        result = _read_exactly(sock, size)
        if len(result) < size:
            raise OSError(f"rpc: {node} closed after {len(result)} of {size} bytes")
        if header[3] == LONG_RESULT:
            # uWSGI's answer for more than 65535 bytes: vars with CONTENT_LENGTH, then the raw result.
            length = _content_length(result)
            if length is None or length > MAX_REMOTE_RESULT:
                raise OSError(f"rpc: {node} announced a result of {length} bytes (at most {MAX_REMOTE_RESULT} taken)")
            result = _read_exactly(sock, length)
            if len(result) < length:
                raise OSError(f"rpc: {node} closed after {len(result)} of {length} bytes")
        return result or None


def _content_length(block: bytes) -> int | None:
    items = parse_array(block)
    for key, value in zip(items[::2], items[1::2], strict=False):
        if key == b"CONTENT_LENGTH":
            return int(value) if value.isdigit() and len(value) < 20 else None
    return None


def remote_signal(node: str, num: int, timeout: float) -> bool:
    """True when the node took the signal, False when it refused it."""
    with connect(node, timeout) as sock:
        sock.sendall(bytes((SIGNAL_MODIFIER1, 0, 0, num)))
        reply = _read_exactly(sock, 4)
    if len(reply) < 4:
        raise OSError(f"no answer from {node} to signal {num}")
    return reply[3] == 1


def rpc_answer(table: RpcTable, block: bytes, modifier2: int) -> bytes:
    """What a worker sends back for an RPC packet (b"": close without a word)."""
    try:
        items = parse_array(block)
    except RpcError as exc:
        log(f"rpc: {exc}")
        return b""
    if not items:
        log("rpc: empty request")
        return b""
    result = table.call(items[0], items[1:])
    if result is None:
        return b""
    if modifier2 == 1:
        return result
    return bytes((RPC_MODIFIER1,)) + struct.pack("<H", len(result)) + b"\x00" + result


def signal_answer(accepted: bool) -> bytes:
    return bytes((SIGNAL_REPLY, 0, 0, 1 if accepted else 0))
