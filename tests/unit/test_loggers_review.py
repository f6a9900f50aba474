"""Review of the ``logger`` key: values that passed validation and then
raised out of the log path (crashing the vassal at start, or half-applying a
reload), uWSGI's parsing of a logger's name and its framing of lines, and
output that never ends its line."""

from __future__ import annotations

import os
import socket

import pytest

from bedrock.datagram import DatagramSender
from bedrock.options import BadValue, parse_logger
from vassal import loggers


@pytest.mark.parametrize("value", [
    "rsyslog:logs..example.com:514",  # (a typo: getaddrinfo raised UnicodeError, not OSError)
    "rsyslog:" + "a" * 64 + ".example.com",
    "socket:a..b:514",
    "rsyslog:127.0.0.1:514,app,\u00b2",  # ("²".isdigit() is True; int("²") raised a plain ValueError)
    "socket:127.0.0.1:\u00b2",
    "rsyslog:127.0.0.1:\u00b2",
    "file:/tmp/a\0b",  # (os.open raised ValueError on the first line)
])
def test_values_that_used_to_raise_later_are_validation_errors(value):
    with pytest.raises(BadValue):
        parse_logger(value)


def test_an_unencodable_host_name_only_drops():
    sender = DatagramSender(("logs..example.com", 514))  # (raised UnicodeError: the vassal died at start)
    try:
        assert sender.send(b"x") is False
    finally:
        sender.close()


def test_a_nul_in_a_file_path_only_drops():
    logger = loggers.File("file:/tmp/a\0b", "", "/tmp/a\0b")
    logger.send(b"line\n")  # (raised ValueError out of LogPipe.emit)
    assert logger.dropped == 1


def test_a_name_is_only_an_alphanumeric_word_as_in_uwsgi(tmp_path):
    # uWSGI's setup_choosen_logger: the text before the first space is an id only if isalnum().
    assert parse_logger("rsyslog:127.0.0.1:514,web01 myapp,134") == ("", "rsyslog", "127.0.0.1:514,web01 myapp,134")
    assert parse_logger(f"file:{tmp_path}/my app.log") == ("", "file", f"{tmp_path}/my app.log")
    assert parse_logger("remote1 rsyslog:127.0.0.1") == ("remote1", "rsyslog", "127.0.0.1")
    logger = loggers.build("rsyslog:127.0.0.1:514,web01 myapp")
    assert logger.prefix == b"web01 myapp"
    logger.close()


def test_syslog_defaults_to_daemon_info_as_uwsgi():
    logger = loggers.build("syslog")  # (uWSGI: openlog(ident, 0, LOG_DAEMON); syslog(LOG_INFO, ...))
    assert logger.priority == 3 * 8 + 6
    logger.close()


def test_output_without_a_newline_is_bounded():
    from vassal.logpipe import LogPipe

    pipe = LogPipe("/dev/null", [], None)
    try:
        for _ in range(64):  # 4 MiB of progress bar, no newline
            os.write(pipe.write_fd, b"x" * 65536)
            pipe._drain()
        assert len(pipe.partial) <= 65536  # (uWSGI's log master hands on each 64 KiB read)
    finally:
        os.close(pipe.read_fd)
        os.close(pipe.write_fd)
        os.close(pipe.stderr)


def test_a_reload_changing_rsyslog_packet_size_keeps_a_journal_or_socket_logger(tmp_path):
    from bedrock.config import load
    from vassal.logpipe import fanout

    path = str(tmp_path / "sink.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    ini = tmp_path / "v.ini"
    try:
        ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:9000\nlogger = socket:{path}\n")
        before = fanout(load(str(ini)), lambda line: None)
        ini.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:9000\nlogger = socket:{path}\nrsyslog-packet-size = 2048\n")
        after = fanout(load(str(ini)), lambda line: None, before)
        # (made again, it looks the path up in the vassal's new root: after pivot-root, all dropped)
        assert after.loggers[0] is before.loggers[0]
        after.close()
    finally:
        sink.close()


def test_a_file_logger_of_gzip_lines_is_one_gzip_stream(tmp_path):
    import gzip

    from vassal.logpipe import chain

    encode = chain(["gzip"])
    logger = loggers.build(f"file:{tmp_path}/g.log")
    for n in range(3):
        logger.send(encode(b"line %d\n" % n))
    logger.close()
    assert gzip.decompress((tmp_path / "g.log").read_bytes()) == b"line 0\nline 1\nline 2\n"  # (zcat: "trailing garbage")


def test_a_compressed_line_reaches_a_socket_logger_whole(tmp_path):
    import zlib

    from vassal.logpipe import chain

    encode = chain(["compress"])
    line = next(b"line %d\n" % n for n in range(10000) if encode(b"line %d\n" % n).endswith(b"\n"))  # (1 line in 256)
    path = str(tmp_path / "z.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(5)
    logger = loggers.build(f"socket:{path}")
    try:
        logger.send(encode(line))
        assert zlib.decompress(sink.recv(4096)) == line
    finally:
        logger.close()
        sink.close()


@pytest.mark.parametrize(("text", "address"), [
    ("[::1]", ("::1", 514)),
    ("[::1]:5140", ("::1", 5140)),
    ("::1", ("::1", 514)),  # (a bare IPv6 address: no port can follow it)
    ("logs.example.com", ("logs.example.com", 514)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ("/dev/log", "/dev/log"),
])
def test_logger_addresses(text, address):
    from bedrock.options import logger_address

    assert logger_address(text) == address


@pytest.mark.parametrize("text", ["127.0.0.1:0", "[::1", "[::1]x", ":514", "host:65536"])
def test_bad_logger_addresses(text):
    from bedrock.options import logger_address

    with pytest.raises(BadValue):
        logger_address(text)


def test_rsyslog_packet_size_bounds_and_split_cap(tmp_path):
    from bedrock.config import ConfigError, load

    for size in ("63", "65508"):
        (tmp_path / "v.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:9000\nrsyslog-packet-size = {size}\n")
        with pytest.raises(ConfigError, match="v.ini:3.*rsyslog-packet-size.*64-65507"):
            load(str(tmp_path / "v.ini"))
    path = str(tmp_path / "r.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sink.setblocking(False)
    logger = loggers.build(f"rsyslog:{path},app", packet_size=64, split=True)
    try:
        logger.send(b"x" * 100_000 + b"\n")
        packets = []
        while True:
            try:
                packets.append(sink.recv(4096))
            except BlockingIOError:
                break
        assert len(packets) + logger.dropped == loggers.Rsyslog.MAX_PACKETS
        assert all(len(packet) <= 64 for packet in packets)
    finally:
        logger.close()
        sink.close()
