import os

import pytest

from vassal.spool import BodySpool, open_tmpfile


def test_small_body_stays_in_memory():
    spool = BodySpool(threshold=10)
    spool.write(b"hello")
    assert not spool.spooled
    assert spool.finish().read() == b"hello"


def test_large_body_spooled_to_nameless_file(tmp_path):
    spool = BodySpool(threshold=10)
    spool.write(b"0123456789")
    spool.write(b"abcdef")
    assert spool.spooled and spool.size == 16
    link = os.readlink(f"/proc/self/fd/{spool.file.fileno()}")
    assert "(deleted)" in link or link.startswith("/tmp/#")  # O_TMPFILE or unlinked: no name left
    assert spool.finish().read() == b"0123456789abcdef"
    spool.close()


def test_open_tmpfile_fallback_on_unsupported_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "O_TMPFILE", 0, raising=False)
    f = open_tmpfile(str(tmp_path))
    f.write(b"x")
    f.seek(0)
    assert f.read() == b"x"
    assert os.listdir(tmp_path) == []
    f.close()


def _streamed(prefix: bytes, rest: bytes, size: int, follow: bytes = b"", timeout: float = 2.0):
    """A StreamedBody of ``size`` whose loop-read part is ``prefix``, the
    rest (and what follows the body) waiting on a socket."""
    import socket

    from vassal.spool import StreamedBody

    ours, theirs = socket.socketpair()
    body = StreamedBody(size)
    body.write(prefix)
    counted: list[int] = []
    body.attach(ours, timeout, counted.append)
    theirs.sendall(rest + follow)
    return body, ours, theirs, counted


def test_a_streamed_body_reads_to_its_end_and_never_past_it():
    body, ours, theirs, counted = _streamed(b"0123", b"456789", 10, follow=b"GET / HTTP/1.1\r\n")
    try:
        assert body.read(2) == b"01" and body.read(5) == b"23456"
        assert body.read() == b"789" and body.read() == b"" and body.read(5) == b""
        assert body.complete and sum(counted) == 6
        assert ours.recv(100) == b"GET / HTTP/1.1\r\n"  # (the next request's bytes stay on the socket)
    finally:
        ours.close()
        theirs.close()


def test_a_streamed_body_by_lines():
    body, ours, theirs, _ = _streamed(b"a\nbb", b"b\ncccc\nd", 12)
    try:
        assert body.readline() == b"a\n" and body.readline(2) == b"bb" and body.readline() == b"b\n"
        assert list(body) == [b"cccc\n", b"d"] and body.readline() == b""
    finally:
        ours.close()
        theirs.close()


def test_a_streamed_body_cut_short_or_stalled_raises_and_says_so(monkeypatch):
    from vassal import spool

    lines: list[str] = []
    monkeypatch.setattr(spool, "log", lines.append)
    body, ours, theirs, _ = _streamed(b"ab", b"cd", 10)
    theirs.close()
    try:
        with pytest.raises(ConnectionResetError):
            body.read()
        assert body.failed and lines == ["request body cut short: the client closed after 4 of 10 bytes"]
        with pytest.raises(ConnectionResetError):
            body.read(1)  # (no second try on a failed connection)
    finally:
        ours.close()
    body, ours, theirs, _ = _streamed(b"", b"xy", 10, timeout=0.2)
    try:
        assert body.read(2) == b"xy"
        with pytest.raises(TimeoutError):
            body.read(1)
        assert lines[-1] == "request body cut short: the client sent nothing for 0.2s after 2 of 10 bytes"
    finally:
        ours.close()
        theirs.close()


def test_a_trickling_client_is_cut_at_the_minimum_rate(monkeypatch):
    import threading
    import time

    from vassal import spool

    lines: list[str] = []
    monkeypatch.setattr(spool, "log", lines.append)
    body, ours, theirs, _ = _streamed(b"", b"", 1 << 20, timeout=0.5)
    stop = threading.Event()

    def trickle() -> None:  # a byte per 0.2 s: never a 0.5 s stall, far under the rate
        while not stop.wait(0.2):
            try:
                theirs.send(b"t")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            body.read()
        assert time.monotonic() - started < 3
        assert lines[-1].startswith(f"request body cut short: the client sent under {spool.MIN_BODY_RATE >> 10} KiB/s")
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()


def test_time_the_app_takes_between_reads_is_not_held_against_the_client():
    import time

    body, ours, theirs, _ = _streamed(b"", b"a" * 1000, 2000, timeout=0.3)
    try:
        time.sleep(0.6)  # (the app at work: the bytes wait in the kernel)
        assert body.read(1000) == b"a" * 1000
        theirs.sendall(b"b" * 1000)
        time.sleep(0.6)
        assert body.read() == b"b" * 1000
    finally:
        ours.close()
        theirs.close()


def test_read_does_not_take_memory_for_what_was_only_announced():
    import tracemalloc

    body, ours, theirs, _ = _streamed(b"x" * 10, b"y" * 10, 3 << 30)
    theirs.close()
    tracemalloc.start()
    try:
        with pytest.raises(ConnectionResetError):
            body.read()
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()
        ours.close()


def test_sending_fast_first_banks_no_licence_to_trickle_later(monkeypatch):
    import threading
    import time

    from vassal import spool

    monkeypatch.setattr(spool, "log", lambda line: None)
    body, ours, theirs, _ = _streamed(b"", b"", 4 << 20, timeout=0.3)
    stop = threading.Event()

    def fast_then_trickle() -> None:
        try:
            theirs.sendall(b"f" * (1 << 20))
            while not stop.wait(0.2):
                theirs.send(b"t")
        except OSError:
            return

    sender = threading.Thread(target=fast_then_trickle)
    sender.start()
    try:
        assert len(body.read(1 << 20)) == 1 << 20
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            body.read()
        assert time.monotonic() - started < spool.CREDIT_CAP * 0.3 + 1.5
    finally:
        stop.set()
        sender.join()
        ours.close()
        theirs.close()


def test_lines_read_are_let_go(tmp_path):
    import threading

    lines = b"".join(b"%099d\n" % i for i in range(40000))  # 4 MB of 100-byte lines
    body, ours, theirs, _ = _streamed(b"", b"", len(lines))

    def send() -> None:  # in pieces that never end on a line
        for at in range(0, len(lines), 65537):
            theirs.sendall(lines[at:at + 65537])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        held = 0
        count = 0
        for line in body:
            count += len(line) == 100
            held = max(held, len(body._buf))
        assert count == 40000 and held < 256 << 10
    finally:
        sender.join()
        ours.close()
        theirs.close()
