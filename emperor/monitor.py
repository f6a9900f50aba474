"""Watching vassal dirs: inotify (Linux), kqueue (FreeBSD), else a periodic scan.

The monitor only says *which* path may have changed; the core compares the
file's signature and decides (spawn, reload, restart, stop). Each watched
dir's parent is watched too, so a dir that is itself replaced (renamed over,
deleted and re-created) is picked up again.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import select
import stat
from collections.abc import Callable
from dataclasses import dataclass

from bedrock.config import VALID_EXTENSIONS
from bedrock.identity import stat_following
from bedrock.loop import Loop

try:
    from inotify_simple import INotify
    from inotify_simple import flags as F
except ImportError:  # not on Linux
    INotify = None  # type: ignore[assignment,misc]
    F = None  # type: ignore[assignment]

# A freshly created file is usually still being written: wait for its
# close-after-write, or this long, before reading it.
CREATE_SETTLE = 0.2
# After a dir was replaced (or events overflowed), it is listed once more this much later.
RESCAN_AGAIN = 0.5


@dataclass(frozen=True)
class Source:
    """One vassal source: a dir, with an optional glob pattern on names."""

    directory: str
    pattern: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Source:
        if spec.startswith("glob://"):
            pattern = os.path.abspath(spec[len("glob://"):])
            return cls(os.path.dirname(pattern), os.path.basename(pattern))
        if spec.startswith("dir://"):
            spec = spec[len("dir://"):]
        return cls(os.path.abspath(spec))

    def wants(self, path: str) -> bool:
        name = os.path.basename(path)
        if os.path.dirname(path) != self.directory or name.startswith("."):
            return False
        if not name.endswith(VALID_EXTENSIONS):
            return False
        return self.pattern is None or fnmatch.fnmatch(name, self.pattern)

    def list(self) -> list[str]:
        if self.pattern is not None:
            candidates = glob.glob(os.path.join(self.directory, self.pattern))
        else:
            try:
                candidates = [e.path for e in os.scandir(self.directory)]
            except OSError:
                candidates = []
        return sorted(p for p in candidates if self.wants(p) and is_regular(p))


def is_regular(path: str) -> bool:
    """A regular file, through a symlink too (one a protected_symlinks
    kernel lets only its owner follow: see stat_following)."""
    try:
        return stat.S_ISREG(stat_following(path).st_mode)
    except PermissionError:
        # Not even its owner may follow it: a vassal file still, whose
        # reading will say why it cannot run (never silently skipped).
        try:
            return stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            return False
    except OSError:
        return False


class DirMonitor:
    def __init__(
        self,
        loop: Loop,
        sources: list[Source],
        on_path: Callable[[str], None],
        on_rescan: Callable[[Source], None],
        scan_interval: float,
        force_scan: bool = False,
        kqueue_module=None,
    ):
        self.loop = loop
        self.sources = sources
        self.on_path = on_path
        self.on_rescan = on_rescan
        self.scan_interval = scan_interval
        self.inotify = None
        self.fallback_reason = ""
        self.watches: dict[int, tuple[str, Source]] = {}  # wd -> (role, source)
        self.pending: dict[str, object] = {}
        if INotify is not None and not force_scan and kqueue_module is None:
            try:
                self.inotify = INotify(nonblocking=True)
            except OSError as exc:
                # (EMFILE here: fs.inotify.max_user_instances is used up.)
                self.inotify = None
                self.fallback_reason = f"inotify unavailable: {exc.strerror}"
        kq = kqueue_module if kqueue_module is not None else (select if hasattr(select, "kqueue") else None)
        self.kqueue: KqueueWatcher | None = None
        if self.inotify is not None:
            for source in sources:
                self._watch(source)
            loop.add_reader(self.inotify.fileno(), self._on_events)
        elif kq is not None and not force_scan:
            self.kqueue = KqueueWatcher(kq, loop, sources, on_path, on_rescan)
        else:
            self._schedule_scan()

    @property
    def mode(self) -> str:
        if self.inotify is not None:
            return "inotify"
        if self.kqueue is not None:
            return "kqueue"
        reason = f"; {self.fallback_reason}" if self.fallback_reason else ""
        return f"scan every {self.scan_interval:g}s{reason}"

    def _watch(self, source: Source) -> None:
        assert self.inotify is not None and F is not None
        for wd, (_, src) in list(self.watches.items()):
            if src == source:
                try:
                    self.inotify.rm_watch(wd)
                except OSError:
                    pass
                del self.watches[wd]
        dir_mask = (
            F.CREATE | F.CLOSE_WRITE | F.ATTRIB | F.MOVED_FROM | F.MOVED_TO | F.DELETE
            | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR
        )
        try:
            wd = self.inotify.add_watch(source.directory, dir_mask)
            self.watches[wd] = ("dir", source)
        except OSError:
            pass  # not there (yet): the parent watch sees it appear
        parent = os.path.dirname(source.directory) or "/"
        try:
            wd = self.inotify.add_watch(parent, F.CREATE | F.MOVED_TO | F.DELETE | F.MOVED_FROM | F.ONLYDIR)
            self.watches.setdefault(wd, ("parent", source))
        except OSError:
            pass

    def _on_events(self) -> None:
        assert self.inotify is not None and F is not None
        try:
            events = self.inotify.read(timeout=0)
        except BlockingIOError:
            return
        now_paths: list[str] = []
        settle_paths: list[str] = []
        rescans: list[Source] = []
        for event in events:
            if event.mask & F.Q_OVERFLOW:
                rescans.extend(self.sources)
                continue
            entry = self.watches.get(event.wd)
            if entry is None:
                continue
            role, source = entry
            if role == "parent":
                if event.name == os.path.basename(source.directory):
                    rescans.append(source)
                continue
            if event.mask & (F.DELETE_SELF | F.MOVE_SELF | F.IGNORED):
                rescans.append(source)
                continue
            if not event.name:
                continue
            path = os.path.join(source.directory, event.name)
            if not source.wants(path):
                continue
            if event.mask & F.CREATE and not event.mask & F.ISDIR:
                settle_paths.append(path)
            else:
                now_paths.append(path)
        for source in dict.fromkeys(rescans):
            self._watch(source)
            self.on_rescan(source)
            # A file made while the watch moved to a replaced dir has no event
            # of its own: a second look a moment later finds it.
            self.loop.call_later(RESCAN_AGAIN, lambda s=source: self.on_rescan(s))
        for path in dict.fromkeys(now_paths):
            self.on_path(path)
        for path in dict.fromkeys(settle_paths):
            if path not in now_paths:
                self.loop.call_later(CREATE_SETTLE, lambda p=path: self.on_path(p))

    def _schedule_scan(self) -> None:
        self.loop.call_later(self.scan_interval, self._scan)

    def _scan(self) -> None:
        for source in self.sources:
            self.on_rescan(source)
        self._schedule_scan()

    def close(self) -> None:
        if self.kqueue is not None:
            self.kqueue.close()
            self.kqueue = None
        if self.inotify is not None:
            self.loop.forget(self.inotify.fileno())
            self.inotify.close()
            self.inotify = None


class KqueueWatcher:
    """kqueue(2) EVFILT_VNODE watches: on each dir (an entry added, removed
    or renamed: rescan it) and on each config file in it (written, touched,
    deleted: look at that path). kqueue watches open files, not names, so
    every rescan re-registers what the dir holds now."""

    def __init__(self, kq, loop: Loop, sources: list[Source], on_path: Callable[[str], None],
                 on_rescan: Callable[[Source], None]):
        self.kq_module = kq
        self.queue = kq.kqueue()
        self.loop = loop
        self.sources = sources
        self.on_path = on_path
        self.on_rescan = on_rescan
        self.fds: dict[int, tuple[str, Source]] = {}  # fd -> (path, source)
        self.dir_fflags = kq.KQ_NOTE_WRITE | kq.KQ_NOTE_DELETE | kq.KQ_NOTE_RENAME | kq.KQ_NOTE_EXTEND
        self.file_fflags = self.dir_fflags | kq.KQ_NOTE_ATTRIB
        for source in sources:
            self._register(source)
        loop.add_reader(self.queue.fileno(), self._on_events)

    def _open(self, path: str, source: Source, fflags: int) -> None:
        if any(p == path for p, _ in self.fds.values()):
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        self.fds[fd] = (path, source)
        kq = self.kq_module
        event = kq.kevent(fd, filter=kq.KQ_FILTER_VNODE, flags=kq.KQ_EV_ADD | kq.KQ_EV_CLEAR, fflags=fflags)
        self.queue.control([event], 0, 0)

    def _register(self, source: Source) -> None:
        self._open(source.directory, source, self.dir_fflags)
        for path in source.list():
            self._open(path, source, self.file_fflags)

    def _forget(self, fd: int) -> None:
        self.fds.pop(fd, None)
        try:
            os.close(fd)  # closing the fd removes its kevent
        except OSError:
            pass

    def _on_events(self) -> None:
        events = self.queue.control(None, 64, 0)
        rescans: list[Source] = []
        paths: list[str] = []
        for event in events:
            entry = self.fds.get(event.ident)
            if entry is None:
                continue
            path, source = entry
            gone = event.fflags & (self.kq_module.KQ_NOTE_DELETE | self.kq_module.KQ_NOTE_RENAME)
            if gone:
                self._forget(event.ident)
            if path == source.directory:
                rescans.append(source)
            else:
                paths.append(path)
                if gone:
                    rescans.append(source)
        for source in dict.fromkeys(rescans):
            self._register(source)
            self.on_rescan(source)
        for path in dict.fromkeys(paths):
            self.on_path(path)

    def close(self) -> None:
        self.loop.forget(self.queue.fileno())
        for fd in list(self.fds):
            self._forget(fd)
        self.queue.close()
