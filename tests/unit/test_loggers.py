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
    # (uWSGI's openlog(IDENT, 0, ...): no LOG_PID, so no [pid] after the ident)
    assert re.fullmatch(r"<158>[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d web: hello", packet)


def test_socket_and_file_loggers(unix_sink, tmp_path):
    path, sock = unix_sink
    raw = loggers.build(f"socket:{path}")
    raw.send(b"line one\n")
    assert sock.recv(2048) == b"line one\n"  # (untouched, as uWSGI sends it)
    prefixed = loggers.build(f"socket:{path},web1|")
    prefixed.send(b"line two\n")
    assert sock.recv(2048) == b"web1|line two\n"
    target = tmp_path / "copy.log"
    copy = loggers.build(f"named file:{target}")
    copy.send(b"a\n")
    copy.send(b"b")
    copy.close()
    assert target.read_bytes() == b"a\nb"  # (as it came, as logto writes it)


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


def _sink(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    return sock


def test_a_unix_destination_is_found_before_the_root_changes(unix_sink, tmp_path):
    """A logger made before pivot-root/chroot still reaches the host's
    socket after; one looking the path up in the new root would drop all."""
    path, sock = unix_sink
    early = loggers.build(f"socket:{path}")
    empty = tmp_path / "newroot"
    empty.mkdir()
    pid = os.fork()
    if pid == 0:  # (a child, so that the test process keeps its root)
        try:
            os.chroot(empty)
            os.chdir("/")
            early.send(b"after chroot\n")
            late = loggers.build(f"socket:{path}")
            late.send(b"never\n")
            os._exit(0 if late.dropped == 1 and early.dropped == 0 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sock.recv(2048) == b"after chroot\n"
    early.close()


def test_a_restarted_destination_is_found_again(tmp_path):
    """rsyslogd restarted: a new socket at the same path. The line sent
    while it was down is dropped, the next goes to the new one."""
    path = str(tmp_path / "restart.sock")
    first = _sink(path)
    logger = loggers.build(f"rsyslog:{path},app,134")
    logger.send(b"one\n")
    assert first.recv(2048).endswith(b"app: one")
    first.close()
    os.unlink(path)
    logger.send(b"lost\n")  # (nobody there)
    second = _sink(path)
    try:
        logger.send(b"two\n")  # (the next line after the restart goes)
        assert second.recv(2048).endswith(b"app: two")
        assert logger.dropped == 1
    finally:
        second.close()
        logger.close()


def test_a_host_name_is_resolved_once_and_as_ipv4(monkeypatch):
    """No DNS query per line (it would block the vassal's loop), and
    "localhost" is the 127.0.0.1 a syslog daemon listens on."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(5)
    try:
        logger = loggers.build(f"rsyslog:localhost:{sink.getsockname()[1]},app")

        def no_dns(*args, **kwargs):
            raise AssertionError("resolved again")

        monkeypatch.setattr(socket, "getaddrinfo", no_dns)
        for n in range(3):
            logger.send(b"line %d\n" % n)
        assert [sink.recv(2048).rsplit(b": ", 1)[1] for _ in range(3)] == [b"line 0", b"line 1", b"line 2"]
        logger.close()
    finally:
        sink.close()


def test_an_unresolvable_name_drops_without_asking_again_per_line(monkeypatch):
    calls = []
    real = socket.getaddrinfo

    def failing(*args, **kwargs):
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "no such name")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    logger = loggers.build("rsyslog:logs.invalid,app")
    for _ in range(100):
        logger.send(b"x\n")
    monkeypatch.setattr(socket, "getaddrinfo", real)
    assert logger.dropped == 100 and calls == ["logs.invalid"]


def test_a_reload_keeps_the_destinations_it_still_names(tmp_path, unix_sink):
    from bedrock.config import load
    from vassal.logpipe import fanout

    path, sock = unix_sink
    ini = tmp_path / "v.ini"
    ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:9000\nlogger = socket:{path}\nlogger = socket:{path}\n"
                   f"logger = file:{tmp_path}/a.log\n")
    before = fanout(load(str(ini)), lambda line: None)
    assert before is not None
    before.send(b"opened\n")
    assert before.loggers[2].fd is not None
    ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:9000\nlogger = socket:{path}\nlogger = file:{tmp_path}/b.log\n")
    after = fanout(load(str(ini)), lambda line: None, before)
    assert after is not None
    assert after.loggers[0] is before.loggers[0]  # (the same socket, found when the vassal started)
    assert before.loggers[1].sender.sock.fileno() == -1 and before.loggers[2].fd is None  # (the others closed)
    assert after.loggers[1] is not before.loggers[2]
    assert fanout(load(str(ini)), lambda line: None, after).loggers == after.loggers
