"""The emperor's side of the zygote (emperor/zygote.py): starts it, queues
spawn requests on its socket with the vassal's fds (never blocking: a full
socket waits for writability) and hands each reply, the vassal's pid or
why it could not be made, to the emperor."""

from __future__ import annotations

import array
import itertools
import json
import os
import socket
import sys
from collections.abc import Callable

from bedrock.proc import exec_child
from bedrock.sockets import recv_or_eof
from emperor.spawn import (
    VASSAL_CONFIG_FD,
    VASSAL_PIPE_FD,
    VASSAL_STATUS_FD,
    ZYGOTE_FD,
    Spawned,
    SpawnRequest,
    build_argv,
    build_env,
    config_fd,
    status_pair,
)


class ZygoteClient:
    def __init__(self, on_reply: Callable[[int, int | None, str | None], None], want_write: Callable[[bool], None]):
        self.on_reply = on_reply
        self.want_write = want_write
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.ids = itertools.count(1)
        # Requests not yet taken by the socket: (id, message, fds to close once sent).
        self.queue: list[tuple[int, bytes, list[int]]] = []

    def start(self, spare_base: str | None = None, env: dict[str, str] | None = None) -> None:
        """``env``: the vassals' clean environment. The zygote's own must be
        no more than that: what it holds stays in every forked vassal's
        memory, however os.environ is cleared after the fork."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-P", "-m", "emperor.zygote", str(ZYGOTE_FD)]
        if spare_base:
            argv.append(spare_base)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - execs
            exec_child(argv, env, what="emperor: cannot start the zygote", fds=[(theirs.fileno(), ZYGOTE_FD)])
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.pid = pid

    def spawn(self, req: SpawnRequest) -> tuple[int, Spawned]:
        assert self.sock is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status_ours, status_theirs = status_pair()
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        request_id = next(self.ids)
        assert req.config is not None  # the zygote runs built-in vassals only
        handed = config_fd(req.config)
        message = {
            "id": request_id,
            "name": req.name,
            "argv": build_argv(req),
            "env": build_env(req),
            "cwd": os.path.dirname(req.path),
            "cgroup_procs": req.cgroup_procs,
            "cgroup_dir": req.cgroup_dir,
            "clone": req.clone,
            "id_maps": req.id_maps,
            "drop": req.drop,
            "tun_devices": req.tun_devices,
            "pipe_fd": VASSAL_PIPE_FD,
            "status_fd": VASSAL_STATUS_FD,
            "config_fd": VASSAL_CONFIG_FD,
        }
        theirs_fd = theirs.detach()
        self.queue.append((request_id, json.dumps(message).encode(), [theirs_fd, log_w, devnull, status_theirs.detach(), handed]))
        self.flush()
        ours.setblocking(False)
        os.set_blocking(log_r, False)
        return request_id, Spawned(None, ours, log_r, status_ours)

    def flush(self) -> None:
        """Send queued requests; a full socket waits for writability (never blocks)."""
        while self.queue and self.sock is not None:
            request_id, payload, fds = self.queue[0]
            try:
                self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except (BlockingIOError, InterruptedError):
                self.want_write(True)
                return
            except OSError as exc:
                self.queue.pop(0)
                self._close_fds(fds)
                self.on_reply(request_id, None, f"zygote unreachable: {exc}")
                continue
            self.queue.pop(0)
            self._close_fds(fds)
        self.want_write(False)

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def fail_pending(self, reason: str) -> None:
        for request_id, _, fds in self.queue:
            self._close_fds(fds)
            self.on_reply(request_id, None, reason)
        self.queue.clear()

    def on_readable(self) -> None:
        assert self.sock is not None
        while True:
            data = recv_or_eof(self.sock, 65536)
            if data is None:
                return
            if not data:
                return
            reply = json.loads(data)
            self.on_reply(int(reply["id"]), reply.get("pid"), reply.get("error"))

    def close(self) -> None:
        for _, _, fds in self.queue:
            self._close_fds(fds)
        self.queue.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
