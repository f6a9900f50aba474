"""``tuntap-device DEV [SOCKET]``: a tun device in the vassal's network
namespace, bridged to the router's unix socket by the top process.

It is created after the namespaces exist and before pivot-root and the
privilege drop, so neither the device nor the socket has to be reachable by
the app. As soon as ``net-iface`` gives the device an address, a packet from
that address (a UDP datagram to the limited broadcast address, discarded by
the host) claims it at the router, so the host can reach a vassal that has
sent nothing yet. If the router goes away the link reconnects on a timer.
"""

from __future__ import annotations

import array
import ipaddress
import os
import socket
import struct

from bedrock.log import log
from bedrock.loop import Loop
from jails.tun import disable_ipv6, open_tun, set_offloads
from netrouter.offload import PLAIN_HDR, VNET_HDR_LEN, OffloadError, needs_work, plain_packets
from netrouter.wire import (
    BIG_FRAMES,
    MAX_BACKLOG,
    OFFER_PAYLOAD,
    PACKET,
    TUN_FD,
    VNET,
    VNET_OFFER,
    FrameBuffer,
    FrameError,
    checksum,
    frame,
    header,
    send_or_queue,
)

DEFAULT_ROUTER_SOCKET = "/run/emperor/tuntap.sock"
RECONNECT_DELAY = 1.0


def claim_packet(address: str) -> bytes:
    """UDP from ``address`` port 9 to 255.255.255.255 port 9 (discard)."""
    src = ipaddress.IPv4Address(address).packed
    dst = b"\xff\xff\xff\xff"
    udp = struct.pack("!HHHH", 9, 9, 8, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0x4000, 1, socket.IPPROTO_UDP, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


class TunLink:
    def __init__(self, device: str, router_socket: str | None, brokered: bool = False):
        self.device = device
        # Brokered: the emperor passes connections over its pipe (the socket
        # path may be unreachable after pivot-root); never dial it ourselves.
        self.brokered = brokered
        self.router_socket = router_socket or DEFAULT_ROUTER_SOCKET
        # Always with a virtio header; offloads are switched on only while
        # the router takes offloaded frames (a uWSGI router never does).
        self.fd = open_tun(device, vnet=True, handed=True)
        disable_ipv6(device)
        self.sock: socket.socket | None = None
        self.vnet = False
        self.direct = False  # the router reads and writes our device itself
        self.frames = FrameBuffer(320 * 1024)
        self.outbuf = bytearray()
        self.address: str | None = None
        self.loop: Loop | None = None
        if not brokered:
            self.connect()

    def connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.router_socket)
        except OSError as exc:
            sock.close()
            log(f"tuntap-device {self.device}: cannot reach the router at {self.router_socket}: {exc.strerror}")
            return False
        self._use(sock)
        return True

    def adopt(self, fd: int) -> None:
        """A connection brokered by the emperor (replacing any previous one)."""
        if self.sock is not None:
            if self.loop is not None:
                self.loop.forget(self.sock)
            self.sock.close()
        self._use(socket.socket(fileno=fd))
        log(f"tuntap-device {self.device}: connected to the router (brokered by the emperor)")

    def _use(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.frames = FrameBuffer(320 * 1024)
        self._offloads(False)
        self._direct(False)
        self.outbuf.clear()
        if self.loop is not None:
            self.loop.add_reader(sock, self._from_router)
        if self.address:
            self.send(claim_packet(self.address))

    def set_address(self, address: str) -> None:
        self.address = address
        self.send(claim_packet(address))

    def start(self, loop: Loop) -> None:
        """Shovel packets both ways on the top process's loop."""
        self.loop = loop
        loop.add_reader(self.fd, self._from_tun)
        if self.sock is not None:
            loop.add_reader(self.sock, self._from_router)
        elif not self.brokered:
            loop.call_later(RECONNECT_DELAY, self._reconnect)

    def _offloads(self, enabled: bool) -> None:
        if enabled != self.vnet:
            try:
                set_offloads(self.fd, enabled)
            except OSError as exc:
                log(f"tuntap-device {self.device}: cannot switch offloads: {exc.strerror}")
                return
        self.vnet = enabled

    def _direct(self, enabled: bool) -> None:
        if enabled != self.direct and self.loop is not None:
            if enabled:
                self.loop.remove_reader(self.fd)
            else:
                self.loop.add_reader(self.fd, self._from_tun)
        self.direct = enabled

    def _pass_device(self) -> None:
        """Answer the router's TUN_FD offer with our device; only in order
        (nothing of ours may be queued behind it) and with offloads on."""
        self._flush()
        if self.sock is None or self.outbuf or not self.vnet or self.direct:
            return
        answer = frame(OFFER_PAYLOAD, TUN_FD)
        try:
            sent = self.sock.sendmsg([answer], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.fd]))])
        except OSError:
            return
        self._direct(True)
        if sent < len(answer):
            self.send_frame(answer[sent:])
        log(f"tuntap-device {self.device}: the router reads and writes the device directly")

    def send(self, packet: bytes | memoryview, hdr: bytes | memoryview | None = None) -> None:
        if self.sock is None or len(self.outbuf) > MAX_BACKLOG:
            return
        parts = (header(len(packet), VNET), hdr, packet) if hdr is not None else (header(len(packet), PACKET), packet)
        queued = bool(self.outbuf)
        if not send_or_queue(self.sock, self.outbuf, parts):
            self._lost()
        elif self.outbuf and not queued and self.loop is not None:
            self.loop.add_writer(self.sock, self._flush)

    def _flush(self) -> None:
        while self.outbuf and self.sock is not None:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                if self.loop is not None:
                    self.loop.add_writer(self.sock, self._flush)
                return
            except OSError:
                self._lost()
                return
            del self.outbuf[:sent]
        if self.loop is not None and self.sock is not None:
            self.loop.remove_writer(self.sock)

    def _from_tun(self) -> None:
        for _ in range(64):
            try:
                data = os.read(self.fd, 65536 + VNET_HDR_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            view = memoryview(data)
            hdr, packet = view[:VNET_HDR_LEN], view[VNET_HDR_LEN:]
            if self.vnet:
                self.send(packet, hdr)
            elif needs_work(hdr):
                # Queued before the offloads went off: finish it here.
                try:
                    pieces = plain_packets(hdr, packet)
                except OffloadError:
                    continue
                for piece in pieces:
                    self.send(piece)
            else:
                self.send(packet)

    def _from_router(self) -> None:
        assert self.sock is not None
        received = self.frames.receive(self.sock)
        if received is None:
            return
        if not received:
            self._lost()
            return
        try:
            for modifier2, payload in self.frames.frames():
                try:
                    if modifier2 == PACKET:
                        os.writev(self.fd, (PLAIN_HDR, payload))
                    elif modifier2 == VNET:
                        os.write(self.fd, payload)
                    elif modifier2 == TUN_FD:
                        self._pass_device()
                    elif modifier2 in (BIG_FRAMES, VNET_OFFER):
                        # Yes: we take any frame size, and offloaded packets.
                        if modifier2 == VNET_OFFER:
                            self._offloads(True)
                        self.send_frame(frame(OFFER_PAYLOAD, modifier2))
                except OSError:
                    pass  # the device is full or down, or the kernel refused a header: drop, as a NIC would
        except FrameError as exc:
            log(f"tuntap-device {self.device}: bad data from the router ({exc}), reconnecting")
            self._lost()

    def send_frame(self, data: bytes) -> None:
        self.outbuf += data
        self._flush()

    def _lost(self) -> None:
        if self.sock is not None:
            if self.loop is not None:
                self.loop.forget(self.sock)
            self.sock.close()
            self.sock = None
            self._offloads(False)
            self._direct(False)
            log(f"tuntap-device {self.device}: lost the router" + (", waiting for the emperor" if self.brokered else ", reconnecting"))
        if self.loop is not None and not self.brokered:
            self.loop.call_later(RECONNECT_DELAY, self._reconnect)

    def _reconnect(self) -> None:
        if self.sock is None and not self.connect() and self.loop is not None:
            self.loop.call_later(RECONNECT_DELAY, self._reconnect)
