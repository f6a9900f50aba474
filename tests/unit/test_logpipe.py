"""Every log encoder and template variable, byte for byte."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import pytest

from vassal.logpipe import EncoderError, build_encoder, chain


def test_prefix_suffix_nl():
    assert chain(["prefix [app]"])(b"hello\n") == b"[app]hello\n"
    assert chain(["prefix [app] "])(b"hello\n") == b"[app] hello\n"
    assert chain(["suffix !"])(b"hello\n") == b"hello\n!"
    assert chain(["nl"])(b"hello") == b"hello\n"


def test_format_variables(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1700000000.123456)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    encode = chain(["format [${unix}] [${micros}] ${strftime:%Y-%m-%d %H:%M} ${msg}|${msgnl}"])
    assert encode(b"hello\n") == b"[1700000000] [1700000000123456] 2023-11-14 22:13 hello|hello\n"


def test_json_escapes_msg():
    line = b'say "hi"\tnow\n'
    out = chain(["json {\"message\": \"${msg}\"}", "nl"])(line)
    assert out.endswith(b"\n")
    assert json.loads(out) == {"message": 'say "hi"\tnow'}


def test_gzip_and_compress_chain():
    assert gzip.decompress(chain(["gzip"])(b"x\n")) == b"x\n"
    assert zlib.decompress(chain(["compress"])(b"x\n")) == b"x\n"
    out = chain(["gzip", "prefix gz:"])(b"data\n")
    assert out.startswith(b"gz:") and gzip.decompress(out[3:]) == b"data\n"


def test_unknown_encoder():
    with pytest.raises(EncoderError, match="unknown log encoder 'rot13'"):
        build_encoder("rot13")
