"""The userspace router: one tun device in the host namespace, one unix
socket that vassal tun devices connect to (uWSGI's framing), routing of IPv4
by destination, the in/out firewall chains, and counters.

Addresses (DESIGN 6): a brokered connection gets the one the emperor
registers for it; a plain peer claims one with its first IPv4 packet with a
non-zero source (before the firewall, as in uWSGI). Either way an address
belongs to one connection while it lives: a second claim is refused, counted
and logged, and the first owner keeps it. Never claimable: the router's own
addresses (those of its device, read from the kernel), their subnets'
network and broadcast addresses, and anything not unicast. "The same vassal
reconnecting" takes its address over: for brokered connections that is the
same registered vassal name (they all carry the emperor's pid), for plain
peers the same process (uWSGI reconnects from the same pid). A brokered
connection never claims by packet: whatever does not come from its
registered address is spoofed. IPv6 is dropped and counted: the firewall is
IPv4-only.

Nothing blocks: a peer that stops reading gets its packets dropped (and is
closed once its backlog passes MAX_BACKLOG); a bad frame closes only its
own connection. Memory is bounded: at most ``max_connections`` connections
from unprivileged peers and as many from root (so a flood of the first never
locks the emperor's brokered ones out); receive buffers are made on first use
and freed when idle (``FrameBuffer.trim``), everything on close.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import jails
from bedrock.loop import Loop
from jails import tun
from netrouter.firewall import Chain
from netrouter.hostaddr import AddressWatch
from netrouter.offload import (
    PLAIN_HDR,
    VNET_HDR_LEN,
    OffloadError,
    needs_work,
    plain_packets,
    valid_header,
)
from netrouter.wire import (
    BIG_FRAMES,
    BROKER,
    MAX_BACKLOG,
    MAX_FRAME,
    MAX_PLAIN_FRAME,
    OFFER_PAYLOAD,
    PACKET,
    RULE_BLOCK,
    TUN_FD,
    VNET,
    VNET_OFFER,
    FrameBuffer,
    FrameError,
    checksum,
    frame,
    header,
    ipv4_addresses,
    send_or_queue,
)

# One unprivileged uid may hold at most this many connections (a tenant that
# can reach the socket must not take every slot, nor hold 1024 backlogs).
MAX_CONNECTIONS_PER_UID = 64
CONNECTION_BUFFER = 320 * 1024  # at most: a few 64 KB super-packets per read
DEFAULT_MAX_CONNECTIONS = 1024
TRIM_INTERVAL = 1.0  # idle receive buffers are freed within two of these
ACCEPT_PAUSE = 0.2  # out of descriptors: accepting resumes after this
QUIET_INTERVAL = 1.0  # refusals logged at most once a second per kind
READ_BATCH = 64
DROP_REASONS = ("firewall", "spoofed", "unknown_destination", "ipv6", "oversize", "malformed")


def say(message: str) -> None:
    """A diagnostic line; never blocks or raises (stderr may be a full,
    non-blocking pipe shared with the emperor)."""
    try:
        os.write(2, f"netrouter: {message}\n".encode())
    except OSError:
        pass


def ip_text(value: int | None) -> str | None:
    return None if value is None else str(ipaddress.IPv4Address(value))


def unicast(address: int) -> bool:
    """Not 0.0.0.0/8, loopback, multicast or reserved/broadcast: a host's
    packets to those never mean one vassal."""
    first = address >> 24
    return first not in (0, 127) and first < 224


@dataclass(slots=True)
class Connection:
    sock: socket.socket
    peer_pid: int
    vassal: str
    peer_uid: int = -1
    brokered: bool = False
    big_frames: bool = False  # accepted our offer of frames up to 65535 bytes
    vnet: bool = False  # accepted our offer of offloaded packets
    tun_fd: int | None = None  # the peer's own tun device (TUN_FD), read and written directly
    passed_fds: list[int] = field(default_factory=list)
    offered: bool = False  # our extensions were offered
    superseded: bool = False  # a newer connection of the same peer took its address
    refused: bool = False  # a claim of this connection was refused (logged once)
    address: int | None = None
    frames: FrameBuffer = field(default_factory=lambda: FrameBuffer(CONNECTION_BUFFER))
    outbuf: bytearray = field(default_factory=bytearray)
    packets_in: int = 0  # router -> vassal
    packets_out: int = 0  # vassal -> router
    bytes_in: int = 0
    bytes_out: int = 0
    drops: int = 0
    since: float = field(default_factory=time.time)

    def stats(self) -> dict:
        return {
            "vassal": self.vassal,
            "address": ip_text(self.address),
            "peer_pid": self.peer_pid,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "drops": self.drops,
            "brokered": self.brokered,
            "big_frames": self.big_frames,
            "offloads": self.vnet,
            "direct": self.tun_fd is not None,
            "buffer": self.frames.allocated,
            "since": self.since,
        }


class Router:
    def __init__(self, tun_fd: int, socket_path: str, rules_in: list[str], rules_out: list[str],
                 loop: Loop | None = None, socket_mode: int = 0o600, socket_gid: int | None = None,
                 vnet: bool = False, device: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.loop = loop or Loop()
        self.tun_fd = tun_fd
        self.vnet = vnet  # tun_fd was opened with IFF_VNET_HDR and offloads
        self.socket_path = socket_path
        self.chain_in = Chain("in", rules_in)
        self.chain_out = Chain("out", rules_out)
        self.connections: dict[socket.socket, Connection] = {}
        self.claims: dict[int, Connection] = {}
        self.drops: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.refused: Counter[str] = Counter({"claims": 0, "connections": 0})
        self.max_connections = max_connections
        self.open_counts: Counter[bool] = Counter()  # by "from root"
        self.quiet: dict[str, tuple[float, int]] = {}
        self.tun_packets_in = 0
        self.tun_packets_out = 0
        # The device's own addresses (and their subnets' network and
        # broadcast addresses) are never claimable.
        self.own = AddressWatch(device) if device else None
        self.server = self._listen(socket_path, socket_mode, socket_gid)
        os.set_blocking(tun_fd, False)
        self.loop.add_reader(self.server, self._accept)
        self.loop.add_reader(tun_fd, self._on_tun)
        if self.own is not None:
            self.loop.add_reader(self.own, self._on_own_addresses)
        self.loop.call_later(TRIM_INTERVAL, self._trim)

    @staticmethod
    def _listen(path: str, mode: int, gid: int | None) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(256)
        sock.setblocking(False)
        return sock

    # --- connections -----------------------------------------------------------
    def _quiet_say(self, kind: str, message: str) -> None:
        """A refusal, logged at most once a second per kind (with a count of
        those not shown): a hostile peer must not flood the emperor's log."""
        now = time.monotonic()
        last, hidden = self.quiet.get(kind, (0.0, 0))
        if now - last < QUIET_INTERVAL:
            self.quiet[kind] = (last, hidden + 1)
            return
        say(message + (f" (and {hidden} more refusals like it)" if hidden else ""))
        self.quiet[kind] = (now, 0)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listening socket stays readable: pause instead of spinning.
                    self.refused["connections"] += 1
                    self._quiet_say("connection", f"cannot accept a connection: {exc.strerror}")
                    self.loop.remove_reader(self.server)
                    self.loop.call_later(ACCEPT_PAUSE, lambda: self.loop.add_reader(self.server, self._accept))
                return
            try:
                pid, uid, _gid = jails.backend().peer_credentials(sock)
            except OSError:
                pid, uid = 0, -1
            root = uid == 0
            per_uid = sum(1 for c in self.connections.values() if c.peer_uid == uid) if not root else 0
            if not root and per_uid >= MAX_CONNECTIONS_PER_UID:
                sock.close()
                self.refused["connections"] += 1
                self._quiet_say("connection", f"refused a connection from pid {pid} (uid {uid}): "
                                f"{MAX_CONNECTIONS_PER_UID} connections from that uid already")
                continue
            if self.open_counts[root] >= self.max_connections:
                sock.close()
                self.refused["connections"] += 1
                self._quiet_say("connection", f"refused a connection from pid {pid} (uid {uid}): "
                                f"{self.max_connections} connections from {'root' if root else 'unprivileged peers'} already")
                continue
            sock.setblocking(False)
            conn = Connection(sock, pid, f"pid:{pid}", peer_uid=uid)
            self.connections[sock] = conn
            self.open_counts[root] += 1
            self.loop.add_reader(sock, lambda c=conn: self._on_conn(c))

    def _trim(self) -> None:
        for conn in self.connections.values():
            conn.frames.trim()
        self.loop.call_later(TRIM_INTERVAL, self._trim)

    def _offer(self, conn: Connection) -> None:
        """The router speaks first, but only to a peer whose device is up: a
        uWSGI peer writes every frame to its tun device and exits when that
        fails (EIO while the device is still down). So a plain peer hears the
        offers after its first packet, a brokered one (ours) at registration.
        A uWSGI peer writes them as harmless packets and never answers."""
        if conn.offered:
            return
        conn.offered = True
        conn.outbuf += frame(OFFER_PAYLOAD, BIG_FRAMES)
        if self.vnet:
            conn.outbuf += frame(OFFER_PAYLOAD, VNET_OFFER)
            conn.outbuf += frame(OFFER_PAYLOAD, TUN_FD)
        self._flush(conn)

    def close(self, conn: Connection, why: str = "") -> None:
        if self.connections.pop(conn.sock, None) is None:
            return
        self.open_counts[conn.peer_uid == 0] -= 1
        if why:
            say(f"closing {conn.vassal} ({ip_text(conn.address) or 'no address'}): {why}")
        if conn.address is not None and self.claims.get(conn.address) is conn:
            del self.claims[conn.address]
        self.loop.forget(conn.sock)
        conn.sock.close()
        self._drop_tun(conn)
        for fd in conn.passed_fds:
            os.close(fd)
        conn.passed_fds.clear()
        # Whatever may still hold the connection (a frame being handled), its
        # buffers go now.
        conn.frames.release()
        conn.outbuf = bytearray()

    def _on_conn(self, conn: Connection) -> None:
        received = conn.frames.receive(conn.sock, conn.passed_fds)
        if received is None:
            return
        if not received:
            self.close(conn)
            return
        while len(conn.passed_fds) > 1:  # only the one a TUN_FD frame may claim is kept
            os.close(conn.passed_fds.pop(0))
        try:
            for modifier2, payload in conn.frames.frames():
                if modifier2 == PACKET:
                    self._from_vassal(conn, None, payload)
                    if not conn.offered and conn.sock in self.connections:
                        self._offer(conn)
                elif modifier2 == VNET and conn.vnet:
                    self._from_vassal(conn, payload[:VNET_HDR_LEN], payload[VNET_HDR_LEN:])
                elif modifier2 == RULE_BLOCK:
                    continue  # uWSGI's tuntap-device-rule block: never parsed as IP
                elif modifier2 == BROKER and conn.peer_uid == 0 and conn.packets_out == 0 and not conn.brokered:
                    self._register(conn, bytes(payload))
                elif modifier2 == BIG_FRAMES:
                    conn.big_frames = True
                elif modifier2 == VNET_OFFER and self.vnet:
                    conn.vnet = True
                elif modifier2 == TUN_FD and conn.vnet and conn.tun_fd is None and conn.passed_fds:
                    self._adopt_tun(conn, conn.passed_fds.pop(0))
                else:
                    self.drops["malformed"] += 1
                    conn.drops += 1
                if conn.sock not in self.connections:
                    return  # closed while handling a frame
        except FrameError as exc:
            self.drops["malformed"] += 1
            self.close(conn, str(exc))

    def _from_vassal(self, conn: Connection, hdr: memoryview | None, packet: memoryview) -> None:
        conn.packets_out += 1
        conn.bytes_out += len(packet)
        if packet and packet[0] >> 4 == 6:
            self.drops["ipv6"] += 1
            conn.drops += 1
            return
        addresses = ipv4_addresses(packet)
        if addresses is None or hdr is not None and not valid_header(hdr, packet):
            self.drops["malformed"] += 1
            conn.drops += 1
            return
        src, dst = addresses
        if conn.address is None and src != 0 and not conn.brokered:
            self._claim(conn, src)
        if conn.address is None or src != conn.address:
            self.drops["spoofed"] += 1
            conn.drops += 1
            return
        if not self.chain_out.allows(src, dst, len(packet)):
            self.drops["firewall"] += 1
            conn.drops += 1
            return
        target = self.claims.get(dst)
        if target is not None:
            # Vassal to vassal hairpins through the router: out, then in.
            self._to_vassal(target, src, dst, hdr, packet)
            return
        try:
            if self.vnet:
                os.writev(self.tun_fd, (hdr if hdr is not None else PLAIN_HDR, packet))
            elif hdr is not None and needs_work(hdr):
                for piece in plain_packets(hdr, packet):
                    os.write(self.tun_fd, piece)
            else:
                os.write(self.tun_fd, packet)
            self.tun_packets_out += 1
        except OffloadError:
            self.drops["malformed"] += 1
        except OSError:
            self.drops["unknown_destination"] += 1

    def _adopt_tun(self, conn: Connection, fd: int) -> None:
        """The peer's tun device, read and written by the router from now on.
        Only a tun device with our framing is taken (anything else could
        make the router read or write some other file for the peer)."""
        if not tun.is_framed_tun(fd, VNET_HDR_LEN):
            os.close(fd)
            self.drops["malformed"] += 1
            conn.drops += 1
            say(f"{conn.vassal}: refused a passed fd that is not a tun device with offload headers")
            return
        os.set_blocking(fd, False)
        conn.tun_fd = fd
        self.loop.add_reader(fd, lambda c=conn: self._on_peer_tun(c))

    def _drop_tun(self, conn: Connection) -> None:
        if conn.tun_fd is not None:
            self.loop.forget(conn.tun_fd)
            os.close(conn.tun_fd)
            conn.tun_fd = None

    def _on_peer_tun(self, conn: Connection) -> None:
        fd = conn.tun_fd
        for _ in range(READ_BATCH):
            try:
                data = os.read(fd, 65536 + VNET_HDR_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_tun(conn)  # the device is gone with its namespace
                return
            view = memoryview(data)
            self._from_vassal(conn, view[:VNET_HDR_LEN], view[VNET_HDR_LEN:])
            if conn.tun_fd != fd:
                return

    def _register(self, conn: Connection, payload: bytes) -> None:
        """A connection brokered by the emperor: its vassal and address are
        bound to it now. A previous connection registered for the same
        vassal is replaced (the vassal restarted, or got a new connection);
        an address held by another vassal, or not claimable, is refused: the
        connection stays, without an address (all it sends is spoofed)."""
        try:
            info = json.loads(payload)
            name = str(info["vassal"])
            address = int(ipaddress.IPv4Address(info["address"])) if info.get("address") else None
        except (ValueError, KeyError, TypeError):
            self.drops["malformed"] += 1
            return
        conn.vassal = name
        conn.brokered = True
        self._offer(conn)
        for other in list(self.connections.values()):
            if other is not conn and other.brokered and other.vassal == name:
                self.close(other)
        if address is not None and self._may_hold(conn, address):
            conn.address = address
            self.claims[address] = conn

    def _unclaimable(self, address: int) -> str | None:
        if not unicast(address):
            return "not a unicast address"
        if self.own is not None and address in self.own.addresses:
            return "the router's own address (or its subnet's network or broadcast address)"
        return None

    def _may_hold(self, conn: Connection, address: int) -> bool:
        """Whether ``conn`` may have ``address`` (refusals counted and logged)."""
        why = self._unclaimable(address)
        owner = self.claims.get(address)
        if why is None and owner is not None and owner is not conn:
            why = f"held by {owner.vassal}"
        if why is None:
            return True
        self.refused["claims"] += 1
        if not conn.refused:
            conn.refused = True
            message = f"refused {ip_text(address)} to {conn.vassal} (pid {conn.peer_pid}): {why}"
            if conn.brokered:
                say(message)  # one per vassal start, which the emperor throttles: never hidden by a flood
            else:
                self._quiet_say("claim", message)
        return False

    def _claim(self, conn: Connection, address: int) -> None:
        """A plain peer's first packet claims its source address."""
        if conn.superseded:
            return
        owner = self.claims.get(address)
        if (owner is not None and owner is not conn and not owner.brokered and owner.peer_pid == conn.peer_pid
                and owner.peer_pid != 0 and self._unclaimable(address) is None):
            # The same process reconnecting takes its address over. The old
            # connection is left open but can never claim again: uWSGI runs
            # its tuntap-device hook again after a second unshare, and its
            # first thread exits the whole process when its socket closes.
            owner.address = None
            owner.superseded = True
            del self.claims[address]
        if not self._may_hold(conn, address):
            return  # the packet is dropped as spoofed
        conn.address = address
        self.claims[address] = conn

    def _on_own_addresses(self) -> None:
        """The router's device got an address: a vassal holding it loses it."""
        assert self.own is not None
        if not self.own.readable():
            return
        for address in self.own.addresses & self.claims.keys():
            conn = self.claims.pop(address)
            conn.address = None
            say(f"{conn.vassal} loses {ip_text(address)}: it is now the router's own")

    # --- the host side -----------------------------------------------------------
    def _on_tun(self) -> None:
        hdr = None
        for _ in range(READ_BATCH):
            try:
                data = os.read(self.tun_fd, 65536 + VNET_HDR_LEN)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.tun_packets_in += 1
            if self.vnet:
                view = memoryview(data)
                hdr, packet = view[:VNET_HDR_LEN], view[VNET_HDR_LEN:]
            else:
                packet = data
            if packet and packet[0] >> 4 == 6:
                self.drops["ipv6"] += 1
                continue
            addresses = ipv4_addresses(packet)
            if addresses is None:
                self.drops["malformed"] += 1
                continue
            src, dst = addresses
            target = self.claims.get(dst)
            if target is None:
                self.drops["unknown_destination"] += 1
                continue
            self._to_vassal(target, src, dst, hdr, packet, from_tun=True)

    def _fragmentation_needed(self, packet: bytes, mtu: int) -> None:
        """ICMP "fragmentation needed" to the sender, so its path MTU drops."""
        if len(packet) < 28 or packet[9] == 1 and len(packet) > 20 and packet[(packet[0] & 15) * 4] == 3:
            return  # never answer an ICMP error with another
        quoted = packet[: (packet[0] & 15) * 4 + 8]
        icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quoted
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        total = 20 + len(icmp)
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, total, 0, 0, 64, 1, 0, packet[16:20], packet[12:16])
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        try:
            os.write(self.tun_fd, header + icmp)
        except OSError:
            pass

    def _to_vassal(self, conn: Connection, src: int, dst: int, hdr: memoryview | None, packet: memoryview | bytes,
                   from_tun: bool = False) -> None:
        if len(conn.outbuf) > MAX_BACKLOG:
            # It stopped reading: nothing more is made for it (segmenting
            # first would be work for the drop), and it goes.
            conn.drops += 1
            self.close(conn, f"stopped reading ({len(conn.outbuf)} bytes unread)")
            return
        if hdr is not None and not conn.vnet and needs_work(hdr):
            # A peer without offloads gets finished, segmented packets.
            try:
                pieces = plain_packets(hdr, packet)
            except OffloadError:
                self.drops["malformed"] += 1
                conn.drops += 1
                return
            for piece in pieces:
                self._to_vassal(conn, src, dst, None, piece, from_tun)
            return
        # Brokered peers are ours: any frame fits. A plain peer (uWSGI reads
        # into 8196 bytes without a bound check) never gets more than 8192.
        limit = MAX_FRAME if conn.brokered or conn.big_frames else MAX_PLAIN_FRAME
        if len(packet) > limit:
            self.drops["oversize"] += 1
            conn.drops += 1
            if from_tun:
                self._fragmentation_needed(bytes(packet), limit)
            return
        if not self.chain_in.allows(src, dst, len(packet)):
            self.drops["firewall"] += 1
            conn.drops += 1
            return
        conn.packets_in += 1
        conn.bytes_in += len(packet)
        if conn.tun_fd is not None:
            try:
                os.writev(conn.tun_fd, (hdr if hdr is not None else PLAIN_HDR, packet))
            except OSError:
                conn.drops += 1  # full, or a header the kernel refused: dropped, as a NIC would
            return
        if conn.vnet and hdr is not None:
            parts = (header(len(packet), VNET), hdr, packet)
        else:
            parts = (header(len(packet)), packet)
        queued = bool(conn.outbuf)
        if not send_or_queue(conn.sock, conn.outbuf, parts):
            self.close(conn, "send failed")
        elif conn.outbuf and not queued:
            self.loop.add_writer(conn.sock, lambda c=conn: self._flush(c))

    def _flush(self, conn: Connection) -> None:
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(conn.sock, lambda c=conn: self._flush(c))
                return
            except OSError as exc:
                self.close(conn, f"send failed: {exc.strerror}")
                return
            del conn.outbuf[:sent]
        self.loop.remove_writer(conn.sock)

    # --- observability -------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "running": True,
            "pid": os.getpid(),
            "socket": self.socket_path,
            "connections": [c.stats() for c in self.connections.values()],
            "rules": {"in": self.chain_in.stats(), "out": self.chain_out.stats()},
            "drops": dict(self.drops),
            "refused": dict(self.refused),
            "max_connections": self.max_connections,
            "tun": {"packets_in": self.tun_packets_in, "packets_out": self.tun_packets_out},
        }

    def stats_json(self) -> bytes:
        return json.dumps(self.stats()).encode()
