"""The router's firewall syntax and wire framing, without devices."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from netrouter.firewall import Chain, RuleError, parse_rule
from netrouter.wire import FrameBuffer, FrameError, frame, ipv4_addresses


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def test_rule_forms():
    assert parse_rule("allow").matches(ip("1.2.3.4"), ip("5.6.7.8"))
    r = parse_rule("deny 198.18.0.0/24 198.18.0.0/24")
    assert r.matches(ip("198.18.0.5"), ip("198.18.0.9")) and not r.allow
    assert not r.matches(ip("198.18.0.5"), ip("198.18.1.9"))
    r = parse_rule("allow 198.18.0.0/24 198.18.0.1")  # missing mask: /32
    assert r.matches(ip("198.18.0.7"), ip("198.18.0.1")) and not r.matches(ip("198.18.0.7"), ip("198.18.0.2"))
    r = parse_rule("allow 0.0.0.0 198.18.0.0/16")  # 0.0.0.0: any
    assert r.matches(ip("8.8.8.8"), ip("198.18.3.3"))
    r = parse_rule("deny 198.18.0.0/0 198.18.0.2")  # /0: any, without shifting by 32
    assert r.matches(ip("1.1.1.1"), ip("198.18.0.2"))
    assert parse_rule("ALLOW").allow


@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("permit 1.2.3.4 5.6.7.8", "action must be allow or deny"),
    ("allow 1.2.3.4", "expected ACTION SRC"),
    ("deny 1.2.3.4 5.6.7.8 9.9.9.9", "expected ACTION SRC"),
    ("allow 1.2.3 5.6.7.8", "bad address '1.2.3'"),
    ("allow 1.2.3.4/33 5.6.7.8", "bad mask '33'"),
    ("allow 1.2.3.4/x 5.6.7.8", "bad mask 'x'"),
])
def test_bad_rules_named(text, fragment):
    with pytest.raises(RuleError) as exc:
        parse_rule(text)
    assert fragment in str(exc.value)
    if text:
        assert repr(text) in str(exc.value)


def test_canonical_ruleset_first_match_and_counters():
    out = Chain("out", [
        "allow 198.18.0.0/24 198.18.0.1",
        "deny 198.18.0.0/24 198.18.0.0/24",
        "allow 198.18.0.0/24 0.0.0.0",
        "deny",
    ])
    assert out.allows(ip("198.18.0.2"), ip("198.18.0.1"), 100)  # to the host
    assert not out.allows(ip("198.18.0.2"), ip("198.18.0.3"), 100)  # to another vassal
    assert out.allows(ip("198.18.0.2"), ip("203.0.113.9"), 100)  # outside
    assert not out.allows(ip("203.0.113.9"), ip("198.18.0.2"), 60)  # not from a vassal
    assert [r["packets"] for r in out.stats()] == [1, 1, 1, 1]
    assert out.stats()[1]["bytes"] == 100
    assert Chain("in", []).allows(1, 2, 3)  # default allow


def test_frames_split_and_joined():
    packets = [b"a" * 10, b"", b"b" * 300]
    stream = b"".join(frame(p) for p in packets) + frame(b"rules", 1)
    reader = FrameBuffer()
    got = []
    for i in range(0, len(stream), 7):
        got += reader.feed(stream[i:i + 7])
    assert got == [(0, p) for p in packets] + [(1, b"rules")]
    assert frame(b"x" * 258)[:4] == bytes((0, 2, 1, 0))


def test_bad_frame_header():
    with pytest.raises(FrameError):
        FrameBuffer().feed(b"\x05\x00\x00\x00")


def test_ipv4_addresses():
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, bytes([198, 18, 0, 2]), bytes([198, 18, 0, 1]))
    assert ipv4_addresses(header) == (ip("198.18.0.2"), ip("198.18.0.1"))
    assert ipv4_addresses(header[:19]) is None
    assert ipv4_addresses(b"\x60" + header[1:]) is None  # IPv6
    bad_length = header[:2] + struct.pack("!H", 400) + header[4:]
    assert ipv4_addresses(bad_length) is None


def test_uwsgi_vars_roundtrip_and_truncation():
    from vassal.uwsgiproto import ProtocolError, encode_vars, parse_vars

    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "EMPTY": ""}
    block = encode_vars(env)
    assert parse_vars(block) == env
    for cut in (1, 3, len(block) - 1):
        with pytest.raises(ProtocolError):
            parse_vars(block[:cut])


def test_frame_buffer_refuses_a_stream_without_frames():
    buffer = FrameBuffer(size=1024)
    assert buffer.feed(bytes((0, 0xFF, 0xFF, 0))) == []  # a 64 KB frame announced: waits for it
    with pytest.raises(FrameError, match="more than 1024 bytes without a whole frame"):
        buffer.feed(bytes(2000))


def test_frame_buffer_is_made_on_first_use_grows_and_is_freed_when_idle():
    import socket

    from netrouter.wire import INITIAL_BUFFER, VNET

    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    with ours, theirs:
        buffer = FrameBuffer(size=320 * 1024)
        assert buffer.allocated == 0  # an idle connection holds no buffer
        theirs.sendall(frame(b"claim"))
        buffer.fill(ours)
        assert buffer.allocated == INITIAL_BUFFER
        assert [(m, bytes(p)) for m, p in buffer.frames()] == [(0, b"claim")]
        assert buffer.trim() is False  # something arrived since the last trim
        assert buffer.trim() is True and buffer.allocated == 0
        # A frame larger than the buffer gets room for all of it (offloaded: 10 more bytes).
        theirs.sendall(bytes((0, 0xFF, 0xFF, VNET)) + bytes(10 + 0xFFFF))
        got = []
        while not got:
            buffer.fill(ours)
            got = [len(p) for m, p in buffer.frames()]
        assert got == [10 + 0xFFFF] and buffer.allocated >= 4 + 10 + 0xFFFF
        # A partial frame is never freed, however long it waits.
        theirs.sendall(frame(b"x" * 100)[:50])
        buffer.fill(ours)
        assert list(buffer.frames()) == []
        buffer.trim()
        assert buffer.trim() is False and buffer.allocated > 0
        theirs.sendall(frame(b"x" * 100)[50:])
        buffer.fill(ours)
        assert [len(p) for _, p in buffer.frames()] == [100]
        # Reads that fill the buffer make it grow, up to its size.
        theirs.setblocking(False)
        ours.setblocking(False)
        try:
            while True:
                theirs.send(frame(bytes(60000)))
        except BlockingIOError:
            pass
        for _ in range(20):
            try:
                buffer.fill(ours)
            except BlockingIOError:
                break
            list(buffer.frames())
        assert 128 * 1024 < buffer.allocated <= 320 * 1024  # (a socketpair holds ~200 KiB)


def test_frame_buffer_refuses_more_than_its_size_in_one_frame():
    import socket

    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    with ours, theirs:
        buffer = FrameBuffer(size=1024)
        theirs.sendall(bytes((0, 0xFF, 0xFF, 0)) + bytes(2000))
        with pytest.raises(FrameError, match="more than 1024 bytes"):
            for _ in range(3):
                buffer.fill(ours)
                list(buffer.frames())
