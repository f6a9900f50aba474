"""Completing offloaded packets for peers without offloads: checksums and
TCP segmentation, checked against a plain reference implementation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netrouter.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    VNET_HDR,
    OffloadError,
    complete_checksum,
    internet_checksum,
    plain_packets,
    segment_tcp4,
    valid_header,
)


def reference_checksum(data: bytes) -> int:
    """RFC 1071 word by word, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF

SRC, DST = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])


def ip_header(total: int, proto: int = 6, ident: int = 0x1234) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, proto, 0, SRC, DST)
    return head[:10] + struct.pack("!H", reference_checksum(head)) + head[12:]


def pseudo_sum_field(length: int, proto: int = 6) -> int:
    # What the kernel leaves in a CHECKSUM_PARTIAL field: the folded,
    # uncomplemented pseudo-header sum.
    return ~reference_checksum(SRC + DST + struct.pack("!BBH", 0, proto, length)) & 0xFFFF


def tcp_super_packet(payload: bytes, seq: int = 1000, flags: int = 0x18 | 0x01 | 0x80) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 5 << 4, flags, 512, pseudo_sum_field(20 + len(payload)), 0)
    return ip_header(20 + 20 + len(payload)) + tcp + payload


def tcp_valid(segment: bytes) -> bool:
    pseudo = segment[12:20] + struct.pack("!BBH", 0, 6, len(segment) - 20)
    return reference_checksum(pseudo + segment[20:]) == 0 and reference_checksum(segment[:20]) == 0


@given(st.binary(max_size=3000))
def test_checksum_matches_the_word_loop(data):
    assert internet_checksum(data) == reference_checksum(data)


def test_complete_partial_checksum():
    payload = b"hello, offloads" * 7
    packet = tcp_super_packet(payload)
    done = complete_checksum(packet, 20, 16)
    assert tcp_valid(done)
    hdr = VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    assert plain_packets(hdr, packet) == [done]


def test_udp_checksum_zero_becomes_ffff():
    # A UDP datagram whose checksum computes to zero must carry 0xFFFF.
    for filler in range(0, 0x10000, 251):
        body = struct.pack("!H", filler)
        udp = struct.pack("!HHHH", 9, 9, 10, pseudo_sum_field(10, 17)) + body
        packet = ip_header(30, proto=17) + udp
        done = complete_checksum(packet, 20, 6)
        assert done[26:28] != b"\0\0"


@pytest.mark.parametrize("size,mss", [(1, 1448), (1448, 1448), (1449, 1448), (65000, 1448), (60000, 8948), (10, 3)])
def test_segmentation_like_the_kernel(size, mss):
    payload = bytes(i * 7 % 251 for i in range(size))
    packet = tcp_super_packet(payload, seq=0xFFFFF000)
    segments = segment_tcp4(packet, mss)
    assert b"".join(s[40:] for s in segments) == payload
    assert all(len(s) - 40 <= mss for s in segments)
    assert all(tcp_valid(s) for s in segments)
    seqs = [struct.unpack_from("!I", s, 24)[0] for s in segments]
    assert seqs == [(0xFFFFF000 + i * mss) & 0xFFFFFFFF for i in range(len(segments))]
    ids = [struct.unpack_from("!H", s, 4)[0] for s in segments]
    assert ids == [0x1234 + i for i in range(len(segments))]
    flags = [s[33] for s in segments]
    assert flags[-1] == 0x18 | 0x01 | (0x80 if len(segments) == 1 else 0)  # FIN and PSH on the last only
    assert all(f & 0x09 == 0 for f in flags[:-1]) and flags[0] & 0x80  # CWR on the first only
    hdr = VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16)
    assert plain_packets(hdr, packet) == segments


def test_headers_a_peer_may_not_send():
    tcp = tcp_super_packet(b"x" * 100)
    udp = ip_header(28, proto=17) + bytes(8)
    assert valid_header(VNET_HDR.pack(0, 0, 0, 0, 0, 0), tcp)
    assert valid_header(VNET_HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 40, 500, 20, 16), tcp)
    assert not valid_header(VNET_HDR.pack(0x40, 0, 0, 0, 0, 0), tcp)  # unknown flag
    assert not valid_header(VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 20, 500), tcp)  # field outside the packet
    assert not valid_header(VNET_HDR.pack(0, GSO_TCPV4, 40, 50, 0, 0), udp)  # TSO of a UDP packet
    assert not valid_header(VNET_HDR.pack(0, 3, 28, 50, 0, 0), udp)  # UFO: not offered
    assert not valid_header(VNET_HDR.pack(0, GSO_TCPV4, 40, 0, 0, 0), tcp)  # zero MSS
    # Segmenting is the router's CPU: a segment size of 1 made 65000 segments of one packet.
    big = tcp_super_packet(b"x" * 60000)
    assert not valid_header(VNET_HDR.pack(0, GSO_TCPV4, 40, 1, 0, 0), big)
    assert not valid_header(VNET_HDR.pack(0, GSO_TCPV4, 40, 200, 0, 0), big)
    assert valid_header(VNET_HDR.pack(0, GSO_TCPV4, 40, 1460, 0, 0), big)
    with pytest.raises(OffloadError):
        plain_packets(VNET_HDR.pack(0, 4, 40, 50, 0, 0), tcp)  # TCPv6 on an IPv4 packet
    with pytest.raises(OffloadError):
        segment_tcp4(udp, 100)
