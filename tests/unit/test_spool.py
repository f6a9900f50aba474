import os

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
