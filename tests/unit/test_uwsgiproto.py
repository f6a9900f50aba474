"""The uwsgi vars parser: the C speedup and the pure-Python fallback agree
on every input, valid or not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vassal import uwsgiproto
from vassal.uwsgiproto import ProtocolError, _parse_vars_py, encode_vars, parse_vars, respond_whole

speedups = pytest.importorskip("vassal._speedups", reason="the C speedup was not built (no compiler)")

latin1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=40)


def outcome(parse, block, start, end):
    try:
        return parse(block, start, end)
    except (ValueError, ProtocolError) as exc:
        return ("error", str(exc))


@given(st.dictionaries(latin1, latin1, max_size=12), st.binary(max_size=6), st.integers(0, 400))
def test_c_and_python_agree(env, prefix, cut):
    block = prefix + encode_vars(env) + b"trailing body"
    end = min(len(block), len(prefix) + cut)
    assert outcome(speedups.parse_vars, block, len(prefix), end) == outcome(_parse_vars_py, block, len(prefix), end)
    if cut >= len(block) - len(prefix) - len(b"trailing body"):
        assert parse_vars(block, len(prefix), len(prefix) + len(encode_vars(env))) == env
        end = len(prefix) + len(encode_vars(env))
        defaults, overrides = {"PATH_INFO": "/", "only": "default"}, {"wsgi.run_once": False}
        for parse in (speedups.parse_vars, _parse_vars_py):
            got = parse(block, len(prefix), end, defaults, overrides)
            assert got == {**defaults, **env, **overrides}
        assert defaults == {"PATH_INFO": "/", "only": "default"}  # copied, never changed


@pytest.mark.parametrize("block,message", [
    (b"\x05", "truncated key length"),
    (b"\x05\x00ab", "truncated key"),
    (b"\x01\x00a\x01", "truncated value length"),
    (b"\x01\x00a\x05\x00xy", "truncated value"),
])
def test_truncations_named(block, message):
    with pytest.raises(ProtocolError, match=f"^{message}$"):
        parse_vars(block)
    assert outcome(_parse_vars_py, block, 0, len(block)) == ("error", message)


def test_whole_request_fast_path_only_for_bodyless_complete_requests():
    sent = []

    class Sink:
        def sendall(self, data):
            sent.append(data)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    def packet(env):
        block = encode_vars(env)
        return bytes((0, len(block) & 255, len(block) >> 8, 0)) + block

    get = packet({"REQUEST_METHOD": "GET", "PATH_INFO": "/x", "CONTENT_LENGTH": ""})
    assert respond_whole(Sink(), get, app, None, 65536)
    assert sent[0].startswith(b"HTTP/1.1 200 OK\r\n") and sent[0].endswith(b"\r\n\r\n/x")
    post = packet({"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "3"}) + b"abc"
    assert not respond_whole(Sink(), post, app, None, 65536)  # has a body: the incremental path
    assert not respond_whole(Sink(), get[:-1], app, None, 65536)  # incomplete
    assert not respond_whole(Sink(), get, app, None, 10)  # over buffer-size: answered 431 elsewhere
    assert not respond_whole(Sink(), b"\x05" + get[1:], app, None, 65536)  # modifier1 501 elsewhere
    assert uwsgiproto._fast_parse_vars is speedups.parse_vars


@pytest.mark.parametrize("use_c", [True, False])
def test_accept_read(tmp_path, monkeypatch, use_c):
    import os
    import socket

    from vassal import fdconn

    if not use_c:
        monkeypatch.setattr(fdconn, "_accept_read_c", None)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "l.sock"))
    listener.listen(8)
    listener.setblocking(False)
    clients = []
    try:
        assert fdconn.accept_read(listener.fileno()) is None  # nobody waiting
        for payload in (b"request", None, b""):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(tmp_path / "l.sock"))
            if payload:
                client.sendall(payload)
            elif payload == b"":
                client.close()
            clients.append(client)
            fd, data = fdconn.accept_read(listener.fileno(), 100)
            assert data == payload
            assert not os.get_blocking(fd) and not os.get_inheritable(fd)
            os.close(fd)
    finally:
        for client in clients:
            client.close()
        listener.close()
