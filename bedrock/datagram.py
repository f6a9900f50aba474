"""A never-blocking datagram sender to one destination (a unix socket path
or a UDP host and port), for log lines: the loggers and the journal.

The destination is looked up once, when the sender is made, and the socket
is connected to it: a unix path is found while the vassal still sees the
host's files (before pivot-root or chroot hide them: sendto by name would
look in the new root every time), and a host name is resolved once, not
by a blocking DNS query per line. A unix peer that went away (rsyslogd or
journald restarted: a new socket at the same path) is looked up again on
the next line (inside a pivoted root only if the operator bound the socket
in); an unresolvable host name at most once a minute.
"""

from __future__ import annotations

import errno
import socket
import time

RETRY_PATH = 0.0  # (a connect by path costs a syscall: tried again on every line)
RETRY_NAME = 60.0
# A unix peer gone (its socket closed, or a new one bound at the path).
_GONE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.EDESTADDRREQ}


class DatagramSender:
    def __init__(self, address: str | tuple[str, int]):
        self.address = address
        if isinstance(address, str):
            family = socket.AF_UNIX
        else:
            # (IPv4 for a name, as uWSGI resolves it: "localhost" is the
            # 127.0.0.1 a syslog daemon listens on, not ::1)
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # Made now, in the namespaces the vassal starts in: a network
        # namespace entered later leaves this socket on the host's network.
        self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.connected = False
        self.retry_at = 0.0
        self._connect()

    def _connect(self) -> None:
        try:
            if isinstance(self.address, str):
                target: str | tuple = self.address
            else:
                host, port = self.address
                target = socket.getaddrinfo(host, port, self.sock.family, socket.SOCK_DGRAM)[0][4]
        except (OSError, UnicodeError):  # (socket.gaierror: the name does not resolve now; UnicodeError: not a name idna encodes)
            self.retry_at = time.monotonic() + RETRY_NAME
            return
        try:
            self.sock.connect(target)  # (a datagram socket may be connected again, elsewhere)
        except OSError:
            self.retry_at = time.monotonic() + RETRY_PATH
            return
        self.connected = True

    def send(self, data: bytes) -> bool:
        """``data`` as one datagram; False when it could not go (the
        destination down, full or gone: the caller counts a drop)."""
        if not self.connected:
            if time.monotonic() < self.retry_at:
                return False
            self._connect()
            if not self.connected:
                return False
        try:
            self.sock.send(data)
            return True
        except OSError as exc:
            if exc.errno in _GONE and self.sock.family == socket.AF_UNIX:
                self.connected = False  # (looked up again on the next line)
            return False

    def close(self) -> None:
        self.sock.close()
        self.connected = False
