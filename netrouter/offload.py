"""TUN offloads: the virtio_net_hdr that precedes every packet on a tun fd
opened with IFF_VNET_HDR, and what a router must do for a peer that cannot
take offloaded packets (uWSGI): complete partial checksums and cut TCP
segmentation-offload super-packets into MSS-sized segments.

With TUNSETOFFLOAD the kernel hands userspace 64 KB TCP super-packets at any
MTU and leaves checksums to be completed; that, not a faster per-packet
loop, is what makes a userspace router fast (wireguard-go and Tailscale do
the same). Between our own peers the header travels on the wire and the
receiving tun device finishes the work.
"""

from __future__ import annotations

import struct

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size
PLAIN_HDR = bytes(VNET_HDR_LEN)  # no offload: a complete, checksummed packet

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80

TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80


class OffloadError(ValueError):
    pass


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The one's complement sum of 16-bit big-endian words (RFC 1071).

    A sum of words each shifted by a multiple of 16 bits is congruent to
    their plain sum modulo 0xFFFF, which is what the end-around carry
    computes: one big-integer remainder instead of a loop over words.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    number = int.from_bytes(data, "big")
    if number == 0:
        return 0
    return number % 0xFFFF or 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    return ~ones_sum(data) & 0xFFFF


def needs_work(hdr: bytes | memoryview) -> bool:
    """Does a packet with this header need completing for a plain peer?"""
    return bool(hdr[0] & F_NEEDS_CSUM or hdr[1] & ~GSO_ECN)


# A peer's segmentation request: segments of at least this size (a vassal
# with a tiny MTU still has more), at most this many per packet.
MIN_GSO_SIZE = 256
MAX_SEGMENTS = 256


def valid_header(hdr: bytes | memoryview, packet: bytes | memoryview) -> bool:
    """Only what this module can finish is passed on from a peer: checksum
    offload inside the packet, TCP/IPv4 segmentation of a TCP packet."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack(hdr)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        return False
    if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > len(packet):
        return False
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return True
    # Segmenting is our CPU: a segment size of 1 made a 64 KB packet 65000
    # segments (80 ms of the router's loop per frame).
    return (kind == GSO_TCPV4 and len(packet) > 20 and packet[9] == 6 and MIN_GSO_SIZE <= gso_size
            and len(packet) // gso_size <= MAX_SEGMENTS)


def complete_checksum(packet: bytes | memoryview, csum_start: int, csum_offset: int) -> bytes:
    """Finish a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum."""
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start >= len(packet):
        raise OffloadError("partial checksum outside the packet")
    out = bytearray(packet)
    value = internet_checksum(memoryview(out)[csum_start:])
    if value == 0 and out[9] == 17:
        value = 0xFFFF  # UDP: zero means "no checksum"
    struct.pack_into("!H", out, at, value)
    return bytes(out)


def segment_tcp4(packet: bytes | memoryview, mss: int) -> list[bytes]:
    """Cut an IPv4 TCP super-packet into segments of at most ``mss`` bytes of
    payload, with the headers the kernel's own GSO would write."""
    packet = bytes(packet)
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 20 or packet[9] != 6 or mss <= 0:
        raise OffloadError("not a TCP/IPv4 packet")
    thl = (packet[ihl + 12] >> 4) * 4
    headers = ihl + thl
    if thl < 20 or len(packet) < headers:
        raise OffloadError("truncated TCP header")
    ip_header = bytearray(packet[:ihl])
    tcp_header = bytearray(packet[ihl:headers])
    payload = memoryview(packet)[headers:]
    ip_id = struct.unpack_from("!H", packet, 4)[0]
    seq = struct.unpack_from("!I", tcp_header, 4)[0]
    flags = tcp_header[13]
    pseudo = packet[12:20] + b"\0\x06"
    segments = []
    for index, offset in enumerate(range(0, max(len(payload), 1), mss)):
        chunk = payload[offset:offset + mss]
        last = offset + mss >= len(payload)
        seg_flags = flags if last else flags & ~(TCP_FIN | TCP_PSH)
        if index:
            seg_flags &= ~TCP_CWR
        struct.pack_into("!HH", ip_header, 2, headers + len(chunk), (ip_id + index) & 0xFFFF)
        struct.pack_into("!H", ip_header, 10, 0)
        struct.pack_into("!H", ip_header, 10, internet_checksum(ip_header))
        struct.pack_into("!I", tcp_header, 4, (seq + offset) & 0xFFFFFFFF)
        tcp_header[13] = seg_flags
        struct.pack_into("!H", tcp_header, 16, 0)
        length = struct.pack("!H", thl + len(chunk))
        struct.pack_into("!H", tcp_header, 16, internet_checksum(pseudo + length + tcp_header + chunk))
        segments.append(bytes(ip_header) + bytes(tcp_header) + bytes(chunk))
    return segments


def plain_packets(hdr: bytes | memoryview, packet: bytes | memoryview) -> list[bytes]:
    """What a peer without offloads must get for this packet."""
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack(hdr)
    if gso_type & ~GSO_ECN == GSO_TCPV4:
        return segment_tcp4(packet, gso_size)
    if gso_type & ~GSO_ECN != GSO_NONE:
        raise OffloadError(f"unsupported segmentation offload type {gso_type}")
    if flags & F_NEEDS_CSUM:
        return [complete_checksum(packet, csum_start, csum_offset)]
    return [bytes(packet)]
