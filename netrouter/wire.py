"""uWSGI's tuntap framing (DESIGN section 6): each IP packet is preceded by
``0, len & 0xff, len >> 8, modifier2``. modifier2 0 is a packet; 1 is
uWSGI's ``tuntap-device-rule`` block (recognised, never parsed as IP).
"""

from __future__ import annotations

import struct

PACKET = 0
RULE_BLOCK = 1
# Our extension: the emperor (root, by SO_PEERCRED) registers a brokered
# connection with a JSON payload {"vassal": NAME, "address": "A.B.C.D"}.
BROKER = 80
# Our extension: the router speaks first with an offer of frames up to
# 65535 bytes; a peer of ours answers with the same modifier2. The payload is
# a harmless IPv4 packet (0.0.0.0 -> 0.0.0.0, dropped by any kernel), so a
# uWSGI peer that writes it to its tun device as a packet does no harm.
BIG_FRAMES = 81
OFFER_PAYLOAD = bytes.fromhex("4500001c00000000401100000000000000000000") + bytes(8)
HEADER = 4
MAX_FRAME = 0xFFFF
# uWSGI allocates 8196 bytes per read and does not bound-check: never send a
# plain peer a frame over this.
MAX_PLAIN_FRAME = 8192


class FrameError(Exception):
    pass


def header(length: int, modifier2: int = PACKET) -> bytes:
    if length > MAX_FRAME:
        raise FrameError(f"packet of {length} bytes does not fit a frame")
    return bytes((0, length & 0xFF, length >> 8, modifier2))


def frame(packet: bytes, modifier2: int = PACKET) -> bytes:
    return header(len(packet), modifier2) + packet


class FrameReader:
    """Incremental decoder of a byte stream into (modifier2, payload)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        # Parse at an offset and trim once: trimming per frame would move the
        # rest of a 256 KB read for every packet in it.
        buffer = self.buffer + data if self.buffer else data
        out = []
        offset, end = 0, len(buffer)
        while end - offset >= HEADER:
            modifier1, low, high, modifier2 = buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3]
            if modifier1 != 0:
                raise FrameError(f"bad frame header (modifier1 {modifier1})")
            stop = offset + HEADER + (low | (high << 8))
            if stop > end:
                break
            out.append((modifier2, bytes(buffer[offset + HEADER:stop])))
            offset = stop
        self.buffer = bytearray(buffer[offset:]) if offset < end else bytearray()
        return out


def ipv4_addresses(packet: bytes) -> tuple[int, int] | None:
    """(source, destination) of a well-formed IPv4 packet, else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total < ihl or total > len(packet):
        return None
    return struct.unpack_from("!II", packet, 12)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of IP and ICMP headers."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
