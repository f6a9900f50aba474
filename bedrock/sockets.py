"""Listening sockets of a vassal, owned by its top process so that they stay
open across graceful reloads (the app master is replaced, the sockets not)."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass


class SocketError(Exception):
    pass


@dataclass
class Listener:
    kind: str  # "http" or "uwsgi"
    address: str
    sock: socket.socket

    @property
    def server(self) -> tuple[str, str]:
        """SERVER_NAME and SERVER_PORT for the WSGI environ (PEP 3333): the
        vassal's host name (its own, in a UTS namespace), never a wildcard
        address, and the bound port, or 80 on a unix socket (what a URL
        rebuilt from them needs; a Host header says more, and nginx's params
        win over both)."""
        name = socket.gethostname()
        if self.sock.family == socket.AF_UNIX:
            return name, "80"
        return name, str(self.sock.getsockname()[1])

    def close(self) -> None:
        path = self.address if self.sock.family == socket.AF_UNIX else None
        self.sock.close()
        if path and not path.startswith("@"):
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def _check_tenant_dir(path: str, tenant: tuple[int, int]) -> None:
    """Tyrant mode: a tenant's unix socket goes only where the tenant may
    write anyway (its own dir, or a sticky world-writable one like /tmp)."""
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise SocketError(f"cannot bind {path}: {exc.strerror}") from None
    sticky_public = st.st_mode & 0o1002 == 0o1002
    if st.st_uid != tenant[0] and not sticky_public:
        raise SocketError(f"tyrant mode: {directory} is not owned by uid {tenant[0]}, refusing to create {path} there")
    if sticky_public and os.path.lexists(path) and os.lstat(path).st_uid != tenant[0]:
        raise SocketError(f"tyrant mode: {path} belongs to another user")


def bind(kind: str, address: str, backlog: int, mode: int | None = None, owner: str | None = None,
         tenant: tuple[int, int] | None = None) -> Listener:
    if "/" in address or address.startswith("@"):
        if tenant is not None and not address.startswith("@"):
            _check_tenant_dir(address, tenant)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = "\0" + address[1:] if address.startswith("@") else address
        if not address.startswith("@"):
            try:
                if stat.S_ISSOCK(os.lstat(address).st_mode):
                    os.unlink(address)  # a stale socket from a previous run
            except FileNotFoundError:
                pass
        # The mode is given at creation (by the umask) and the owner by
        # lchown: the name lives in a dir someone else may write to, and a
        # symlink raced onto it must never turn a chmod or chown elsewhere.
        previous = os.umask(0o777 & ~mode) if mode is not None and not address.startswith("@") else None
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise SocketError(f"cannot bind {kind} socket {address}: {exc.strerror}") from None
        finally:
            if previous is not None:
                os.umask(previous)
        if not address.startswith("@") and owner:
            try:
                _chown(address, owner)
            except OSError as exc:
                sock.close()
                raise SocketError(f"chown-socket {owner} on {address}: {exc.strerror}") from None
    else:
        host, port = _split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise SocketError(f"cannot bind {kind} socket {address}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return Listener(kind, address, sock)


def _chown(path: str, owner: str) -> None:
    user, _, group = owner.partition(":")
    try:
        uid = int(user) if user.isascii() and user.isdigit() else pwd.getpwnam(user).pw_uid
        gid = -1
        if group:
            gid = int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise SocketError(f"chown-socket: unknown user or group {exc.args[0]!r}") from None
    os.chown(path, uid, gid, follow_symlinks=False)


def recv_or_eof(sock: socket.socket, size: int) -> bytes | None:
    """One non-blocking read: None when there is nothing yet, b"" when the
    peer is gone (an error counts as gone: the caller's EOF path cleans up)."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def send_now(sock: socket.socket, parts: list[bytes] | tuple[bytes, ...]) -> int | None:
    """How much of ``parts`` (sent as one message, not joined) the kernel
    took at once: 0 when it has no room; None if the socket failed."""
    try:
        return sock.sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return None
