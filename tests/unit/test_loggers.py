"""The ``logger`` destinations in process: the packets each one sends (to
sockets bound here), validation, and that a destination that is gone or
full only counts drops."""

from __future__ import annotations

import os
import re
import socket

import pytest

from bedrock.options import BadValue, parse_logger
from vassal import loggers


@pytest.fixture
def unix_sink(tmp_path):
    path = str(tmp_path / "sink.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_syslog_writes_what_libc_syslog_writes(unix_sink):
    path, sock = unix_sink
    logger = loggers.Syslog("syslog:web,local3", "", "web", 19, path=path)
    logger.send(b"hello\n")
    packet = sock.recv(2048).decode()
    assert re.fullmatch(rf"<158>[A-Z][a-z]{{2}} [ 123]\d \d\d:\d\d:\d\d web\[{os.getpid()}\]: hello", packet)


def test_socket_and_file_loggers(unix_sink, tmp_path):
    path, sock = unix_sink
    raw = loggers.build(f"socket:{path}")
    raw.send(b"line one\n")
    assert sock.recv(2048) == b"line one"
    target = tmp_path / "copy.log"
    copy = loggers.build(f"named file:{target}")
    copy.send(b"a\n")
    copy.send(b"b")
    copy.close()
    assert target.read_bytes() == b"a\nb\n"


def test_a_gone_or_full_destination_only_counts_drops(tmp_path, unix_sink):
    said = []
    gone = loggers.build(f"rsyslog:{tmp_path}/nobody.sock")
    path, sock = unix_sink
    full = loggers.build(f"socket:{path}")
    fan = loggers.Fanout([gone, full], said.append)
    for _ in range(5000):  # (the sink never reads: its queue fills)
        fan.send(b"x" * 200 + b"\n")
    assert gone.dropped == 5000 and full.dropped > 0
    assert len(said) == 2 and all(b"destination unavailable" in line for line in said)  # once a minute each


@pytest.mark.parametrize(("value", "message"), [
    ("rsyslog:127.0.0.1:514,app,192", "0-191"),
    ("rsyslog:127.0.0.1:514,app,x", "0-191"),
    ("rsyslog:", "needs an address"),
    ("rsyslog:host:99999", "bad port"),
    ("syslog:web,local9", "unknown syslog facility"),
    ("journal:x", "takes no arguments"),
    ("smoke:signals", "unknown logger 'smoke'"),
    ("file:", "needs a PATH"),
])
def test_bad_values(value, message):
    with pytest.raises(BadValue, match=message):
        parse_logger(value)


def test_good_values():
    assert parse_logger("rsyslog:10.0.0.1") == ("", "rsyslog", "10.0.0.1")
    assert parse_logger("remote rsyslog:[::1]:5140,app,134") == ("remote", "rsyslog", "[::1]:5140,app,134")
    assert parse_logger("syslog") == ("", "syslog", "")
    assert parse_logger("journal") == ("", "journal", "")


def test_journal_fields_in_the_native_wire_format():
    from bedrock.journal import encode

    assert encode({"MESSAGE": "one line", "VASSAL": "a.ini"}) == b"MESSAGE=one line\nVASSAL=a.ini\n"
    assert encode({"MESSAGE": "two\nlines"}) == b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\n"
