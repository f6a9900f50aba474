"""uWSGI's tuntap framing (DESIGN section 6): each IP packet is preceded by
``0, len & 0xff, len >> 8, modifier2``. modifier2 0 is a packet; 1 is
uWSGI's ``tuntap-device-rule`` block (recognised, never parsed as IP).
"""

from __future__ import annotations

import array
import socket
import struct

from bedrock.sockets import send_now
from netrouter.offload import VNET_HDR_LEN, internet_checksum

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
# Our extension: offloaded packets (netrouter.offload). The router offers it
# after BIG_FRAMES with a plain frame of modifier2 82 (same harmless payload);
# a peer of ours answers with the same frame and from then on both sides may
# send frames ``0, len & 0xff, len >> 8, 83`` followed by a 10-byte
# virtio_net_hdr and the IP packet of ``len`` bytes (the header is not
# counted, so a 64 KB super-packet still fits the 16-bit length).
VNET_OFFER = 82
VNET = 83
# Our extension: the tun device itself. Offered (plain frame, same payload)
# after VNET_OFFER to peers on this host; a peer of ours that took offloads
# answers with the same frame carrying its tun fd (SCM_RIGHTS) and stops
# reading the device: the router then reads and writes the vassal's device
# directly, the packets no longer cross the socket (half the copies, one
# process on the path). The socket stays the vassal's lifeline: when it
# closes, so does the router's copy of the fd, and the peer goes back to
# framing packets over a new connection.
TUN_FD = 84
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


# What either end queues for a peer that does not read before it drops
# (the router closes that peer; a vassal's link drops packets).
MAX_BACKLOG = 4 * 1024 * 1024
FD_SPACE = socket.CMSG_SPACE(4 * 4)
# A connection's first buffer: a claim packet or an offer answer fits; reads
# that fill it double it (up to the buffer's size), so bulk traffic still
# takes several 64 KB super-packets per read after a few reads.
INITIAL_BUFFER = 4096
_NO_BUFFER = bytearray()
_NO_VIEW = memoryview(_NO_BUFFER)


class FrameBuffer:
    """Frames received straight into one buffer (no copy per frame).

    ``frames()`` yields (modifier2, memoryview of the payload); a payload is
    valid until the next ``fill``, which first moves a partial frame to the
    front.

    ``size`` bounds the buffer; it is not allocated up front: the first
    ``fill`` makes ``INITIAL_BUFFER`` bytes, reads that fill it double it, a
    frame larger than it gets room for the whole frame, and ``trim`` frees it
    once nothing is pending and nothing arrived since the last ``trim``. An
    idle connection thus holds no buffer (a router has hundreds of them).
    """

    def __init__(self, size: int = 1 << 20, initial: int = INITIAL_BUFFER) -> None:
        self.limit = size
        self.initial = min(initial, size)
        self.target = self.initial  # the size of the next buffer made
        self.buffer = _NO_BUFFER
        self.view = _NO_VIEW
        self.start = 0
        self.end = 0
        self.busy = False  # something arrived since the last trim

    @property
    def allocated(self) -> int:
        return len(self.buffer)

    def _reserve(self, wanted: int) -> None:
        """A partial frame moves to the front of a buffer of at least
        ``wanted`` bytes (more if the frame announced needs it), never more
        than ``limit``."""
        start, end = self.start, self.end
        pending = end - start
        if pending >= HEADER:
            announced = HEADER + (self.buffer[start + 1] | (self.buffer[start + 2] << 8))
            if self.buffer[start + 3] == VNET:
                announced += VNET_HDR_LEN
            wanted = max(wanted, announced)
        wanted = min(max(wanted, pending + 1), self.limit)
        if pending >= wanted:
            raise FrameError(f"more than {self.limit} bytes without a whole frame")
        if len(self.buffer) < wanted:
            # A fresh buffer rather than a resize: payload views of the last
            # pass may still export the old one.
            buffer = bytearray(wanted)
            buffer[:pending] = self.view[start:end]
            self.buffer, self.view = buffer, memoryview(buffer)
        elif start:
            self.buffer[:pending] = self.view[start:end]
        self.start, self.end = 0, pending

    def fill(self, sock: socket.socket, fds: list[int] | None = None) -> int:
        """Receive what is there; with ``fds``, passed descriptors go there."""
        self._reserve(self.target)
        room = self.view[self.end:]
        if fds is None:
            received = sock.recv_into(room)
        else:
            received, ancillary, _, _ = sock.recvmsg_into([room], FD_SPACE)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        self.end += received
        self.busy = True
        if received == len(room) and self.target < self.limit:
            self.target = min(self.limit, len(self.buffer) * 2)  # more was waiting: read more at a time
        return received

    def receive(self, sock: socket.socket, fds: list[int] | None = None) -> int | None:
        """:meth:`fill` for a loop callback: None when nothing was there
        after all, 0 when the peer is gone (closed, or the socket failed)."""
        try:
            return self.fill(sock, fds)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return 0

    def trim(self) -> bool:
        """Free the buffer if nothing is pending and nothing arrived since the
        last call (so a busy connection keeps its buffer). True if none is
        held now."""
        if self.busy:
            self.busy = False
        elif self.start == self.end:
            self.release()
        return self.buffer is _NO_BUFFER

    def release(self) -> None:
        """Drop the buffer and anything pending in it."""
        self.buffer, self.view = _NO_BUFFER, _NO_VIEW
        self.start = self.end = 0
        self.target = self.initial

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """For tools and tests: bytes in, the whole frames they complete out
        (copied, so they outlive the next feed)."""
        pending = self.end - self.start
        if pending + len(data) > self.limit:
            raise FrameError(f"more than {self.limit} bytes without a whole frame")
        self._reserve(max(self.target, pending + len(data) + 1))
        self.buffer[self.end:self.end + len(data)] = data
        self.end += len(data)
        self.busy = True
        return [(modifier2, bytes(payload)) for modifier2, payload in self.frames()]

    def frames(self):
        buffer, view = self.buffer, self.view
        offset, end = self.start, self.end
        try:
            while end - offset >= HEADER:
                if buffer[offset] != 0:
                    raise FrameError(f"bad frame header (modifier1 {buffer[offset]})")
                modifier2 = buffer[offset + 3]
                begin = offset + HEADER
                stop = begin + (buffer[offset + 1] | (buffer[offset + 2] << 8))
                if modifier2 == VNET:
                    stop += VNET_HDR_LEN
                if stop > end:
                    break
                offset = stop
                yield modifier2, view[begin:stop]
        finally:
            if self.buffer is buffer:  # (not released meanwhile)
                self.start = offset
                if offset == end:
                    self.start = self.end = 0


def send_or_queue(sock: socket.socket, outbuf: bytearray, parts: tuple) -> bool:
    """Send ``parts`` (one frame's pieces) now, without joining them, unless
    something is queued before them; what does not fit is queued in
    ``outbuf``. False if the socket failed."""
    if outbuf:
        for part in parts:
            outbuf += part
        return True
    sent = send_now(sock, parts)
    if sent is None:
        return False
    if sent < sum(map(len, parts)):
        outbuf += memoryview(b"".join(parts))[sent:]
    return True


def ipv4_addresses(packet: bytes) -> tuple[int, int] | None:
    """(source, destination) of a well-formed IPv4 packet, else None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    if ihl < 20 or total < ihl or total > len(packet):
        return None
    return struct.unpack_from("!II", packet, 12)


# The Internet checksum (RFC 1071) of IP and ICMP headers.
checksum = internet_checksum
