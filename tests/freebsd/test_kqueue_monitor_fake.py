"""The kqueue dir monitor (FreeBSD) against a fake select.kqueue: the exact
EVFILT_VNODE registrations, and what each vnode event makes the emperor do."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bedrock.loop import Loop
from emperor.monitor import DirMonitor, Source


@dataclass
class KEvent:
    ident: int
    filter: int = 0
    flags: int = 0
    fflags: int = 0


class FakeQueue:
    def __init__(self, module):
        self.module = module
        self.read_end, self.write_end = os.pipe()
        self.pending: list[KEvent] = []

    def fileno(self):
        return self.read_end

    def control(self, changes, max_events, timeout):
        for change in changes or []:
            self.module.registered.append((change.ident, change.filter, change.flags, change.fflags))
        if max_events:
            os.read(self.read_end, 64)
            out, self.pending = self.pending, []
            return out
        return []

    def fire(self, fd, fflags):
        self.pending.append(KEvent(fd, fflags=fflags))
        os.write(self.write_end, b"!")

    def close(self):
        os.close(self.read_end)
        os.close(self.write_end)


class FakeKqueueModule:
    """select's kqueue names, with FreeBSD's values."""

    KQ_FILTER_VNODE = -4
    KQ_EV_ADD, KQ_EV_CLEAR = 0x1, 0x20
    KQ_NOTE_DELETE, KQ_NOTE_WRITE, KQ_NOTE_EXTEND, KQ_NOTE_ATTRIB, KQ_NOTE_RENAME = 0x1, 0x2, 0x4, 0x8, 0x20

    def __init__(self):
        self.registered: list[tuple] = []
        self.queue: FakeQueue | None = None

    def kqueue(self):
        self.queue = FakeQueue(self)
        return self.queue

    @staticmethod
    def kevent(ident, filter, flags, fflags):
        return KEvent(ident, filter, flags, fflags)


def test_kqueue_watches_dir_and_files_and_reacts(tmp_path):
    (tmp_path / "a.ini").write_text("[uwsgi]\n")
    (tmp_path / "notes.txt").write_text("not a vassal")
    kq = FakeKqueueModule()
    loop = Loop()
    paths: list[str] = []
    rescans: list[Source] = []
    source = Source(str(tmp_path))
    monitor = DirMonitor(loop, [source], paths.append, rescans.append, scan_interval=5.0, kqueue_module=kq)
    try:
        assert monitor.mode == "kqueue"
        names = {path: fd for fd, (path, _) in monitor.kqueue.fds.items()}
        assert set(names) == {str(tmp_path), str(tmp_path / "a.ini")}  # the dir and each config, nothing else
        dir_flags = kq.KQ_NOTE_WRITE | kq.KQ_NOTE_DELETE | kq.KQ_NOTE_RENAME | kq.KQ_NOTE_EXTEND
        assert (names[str(tmp_path)], kq.KQ_FILTER_VNODE, kq.KQ_EV_ADD | kq.KQ_EV_CLEAR, dir_flags) in kq.registered
        assert (names[str(tmp_path / "a.ini")], kq.KQ_FILTER_VNODE, kq.KQ_EV_ADD | kq.KQ_EV_CLEAR,
                dir_flags | kq.KQ_NOTE_ATTRIB) in kq.registered

        # A config written: that path is looked at.
        kq.queue.fire(names[str(tmp_path / "a.ini")], kq.KQ_NOTE_WRITE)
        loop.run_once(0.1)
        assert paths == [str(tmp_path / "a.ini")] and rescans == []

        # A new file in the dir: the dir is rescanned and the file watched from now on.
        (tmp_path / "b.toml").write_text("[vassal]\n")
        kq.queue.fire(names[str(tmp_path)], kq.KQ_NOTE_WRITE)
        loop.run_once(0.1)
        assert rescans == [source]
        assert str(tmp_path / "b.toml") in {p for p, _ in monitor.kqueue.fds.values()}

        # A config deleted: its watch goes, the path is looked at and the dir rescanned.
        fd = names[str(tmp_path / "a.ini")]
        os.unlink(tmp_path / "a.ini")
        kq.queue.fire(fd, kq.KQ_NOTE_DELETE)
        loop.run_once(0.1)
        assert paths[-1] == str(tmp_path / "a.ini") and len(rescans) == 2
        assert fd not in monitor.kqueue.fds
    finally:
        monitor.close()
