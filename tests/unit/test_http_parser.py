"""The request parser and the environ, fed the request tables of
tests/http_requests.py whole, byte by byte and in random pieces of
1-64 bytes, in-process over a socketpair: every split gives the same answer
and the same environ."""

from __future__ import annotations

import json
import random
import socket

import pytest

from tests.http_requests import ENV_APP, INVALID, VALID
from vassal.http import HttpConnection
from vassal.http_parser import Limits, Rejected, RequestParser

LIMITS = Limits(head=8192, body=16384)  # as the table vassal's buffer-size and limit-post
_namespace: dict = {}
exec(compile(ENV_APP, "envapp.py", "exec"), _namespace)
APP = _namespace["application"]


def splits(raw: bytes) -> list[list[bytes]]:
    rng = random.Random(len(raw))
    out = [[raw]]
    if len(raw) <= 4096:
        out.append([raw[i:i + 1] for i in range(len(raw))])
    for _ in range(3):
        pieces, at = [], 0
        while at < len(raw):
            size = rng.randint(1, 64)
            pieces.append(raw[at:at + size])
            at += size
        out.append(pieces)
    return out


def serve(pieces: list[bytes]) -> bytes:
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    conn = HttpConnection(ours, ("198.18.0.9", 40000), ("vassal-host", "8080"), APP, limits=LIMITS)
    try:
        for piece in pieces:
            if not conn.feed(piece):
                break
    finally:
        ours.close()
    out = b""
    while chunk := theirs.recv(65536):
        out += chunk
    theirs.close()
    return out


def _closing(raw: bytes) -> bytes:
    return raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


@pytest.mark.parametrize("name,raw,expected", VALID, ids=[row[0] for row in VALID])
def test_valid_rows_give_the_same_environ_however_split(name, raw, expected):
    answers = set()
    for pieces in splits(_closing(raw)):
        out = serve(pieces)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (name, out[:300])
        doc = json.loads(body)
        for key, value in expected.items():
            assert doc.get(key) == value, (name, key, doc.get(key))
        answers.add(body)
    assert len(answers) == 1, name


@pytest.mark.parametrize("name,raw,status", INVALID, ids=[row[0] for row in INVALID])
def test_invalid_rows_get_their_status_however_split(name, raw, status, capfd):
    for pieces in splits(raw):
        out = serve(pieces)
        assert out.startswith(f"HTTP/1.1 {status} ".encode()), (name, len(pieces), out[:200])
    assert "Traceback" not in capfd.readouterr().err


def test_oversized_lines_are_refused_before_they_end():
    """414/431 as soon as the limit is passed, not when the line ends."""
    for prefix, status in ((b"GET /" + b"a" * 9000, 414), (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"b" * 9000, 431)):
        parser = RequestParser(Limits())
        with pytest.raises(Rejected) as err:
            parser.feed(prefix)
        assert err.value.status == status


@pytest.mark.parametrize("key,lines,status", [
    ("request_line", [b"GET /" + b"a" * 200 + b" HTTP/1.1"], 414),
    ("field_size", [b"GET / HTTP/1.1", b"X: " + b"a" * 200], 431),
    ("fields", [b"GET / HTTP/1.1"] + [b"X-%d: v" % i for i in range(11)], 431),
    ("head", [b"GET / HTTP/1.1"] + [b"X-%d: %s" % (i, b"v" * 90) for i in range(5)], 431),
])
def test_each_limit_is_its_own(key, lines, status):
    small = {"request_line": 100, "field_size": 100, "fields": 10, "head": 400}[key]
    raw = b"\r\n".join([*lines, b"Host: h", b"", b""])
    with pytest.raises(Rejected) as err:
        RequestParser(Limits(**{key: small})).feed(raw)
    assert err.value.status == status
    RequestParser(Limits()).feed(raw)  # the defaults take it


def test_pipelined_requests_after_a_chunked_one():
    parser = RequestParser(Limits())
    parser.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n")
    assert [r.path for r in parser.done] == [b"/a", b"/b"]
    assert parser.current is not None and not parser.idle
    parser.feed(b"\r\n")
    assert [r.path for r in parser.done] == [b"/a", b"/b", b"/c"]


def test_a_space_run_in_a_field_costs_linear_time():
    """(a lazy regex group backtracked quadratically over runs of spaces):
    against the same head with letters instead of spaces, measured here."""
    import time

    def cost(filler: bytes) -> float:
        raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: a%sb\r\n" % (i, filler * 8000) for i in range(90)) + b"\r\n"
        started = time.monotonic()
        RequestParser(Limits(head=1 << 20)).feed(raw)
        return time.monotonic() - started

    assert cost(b" ") < 20 * cost(b"x") + 0.05


# --- the C lexer (vassal._speedups.lex_head) and the Python one agree -------------

def _outcome(raw: bytes, with_c: bool, monkeypatch) -> object:
    from vassal import http_parser

    if not with_c:
        monkeypatch.setattr(http_parser, "_lex_head", None)
    parser = RequestParser(Limits(head=2048, request_line=300, field_size=300, fields=12, body=4096))
    try:
        parser.feed(raw)
    except Rejected as exc:
        result: object = ("rejected", exc.status)
    else:
        result = [(r.method, r.target, r.version, r.headers, r.host, r.keep_alive, r.chunked, r.body.size) for r in parser.done]
    monkeypatch.undo()
    return result


def test_c_and_python_lexers_agree_on_the_tables(monkeypatch):
    pytest.importorskip("vassal._speedups")
    for _, raw, *_ in VALID + INVALID:
        assert _outcome(raw, True, monkeypatch) == _outcome(raw, False, monkeypatch), raw[:80]


_PIECES = [b"GET", b"POST", b"FOO", b"G T", b" ", b"/", b"/p?q", b"*", b"http://h/x", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
           b"HTTP/1.", b"\r\n", b"\n", b"\r", b"Host: h", b"Host:h", b"Host : h", b"HOST: a", b"Content-Length: 3",
           b"content-length: 03", b"Transfer-Encoding: chunked", b"X_Y: z", b"X: a\tb", b"X: \x00", b"X: \x7f", b"X: \xe9",
           b" folded", b"\tfolded", b":", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n", b"Connection: close", b"Expect: 100-continue",
           b"X" * 290, b"Y: " + b"v" * 300]


def test_c_and_python_lexers_agree_on_random_heads(monkeypatch):
    pytest.importorskip("vassal._speedups")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=14), st.booleans())
    def agree(pieces, end):
        raw = b"".join(pieces) + (b"\r\n\r\n" if end else b"")
        assert _outcome(raw, True, monkeypatch) == _outcome(raw, False, monkeypatch), raw

    agree()


def test_c_and_python_lexers_agree_on_structured_heads(monkeypatch):
    pytest.importorskip("vassal._speedups")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    methods = st.sampled_from([b"GET", b"POST", b"BREW", b"CONNECT", b"OPTIONS", b"G\x00T", b"", b"GET "])
    targets = st.sampled_from([b"/", b"/a?b=c", b"/%41", b"*", b"http://h:1/x", b"s://]x/", b"h:80", b"/\xe9", b"/a b", b""])
    versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.9", b"HTTP/2.0", b"HTTP/1.", b"http/1.1", b""])
    names = st.sampled_from([b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Connection",
                             b"Expect", b"X-A", b"X_A", b"X A", b"", b"N" * 280])
    values = st.sampled_from([b"h", b"3", b"chunked", b"gzip, chunked", b"close", b"keep-alive", b"100-continue", b" v ",
                              b"a\tb", b"a\x01b", b"a\rb", b"\xe9", b"", b"v" * 300, b"1.2.3.4:80", b"a b/c"])
    seps = st.sampled_from([b": ", b":", b" : ", b":\t"])
    eols = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])

    @settings(max_examples=3000, deadline=None)
    @given(methods, targets, versions, eols, st.lists(st.tuples(names, seps, values, eols), max_size=14),
           st.sampled_from([b"\r\n", b"", b"\n"]), st.sampled_from([b"", b"abc", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n"]))
    def agree(method, target, version, eol, fields, last, tail):
        raw = method + b" " + target + b" " + version + eol + b"".join(n + s + v + e for n, s, v, e in fields) + last + tail
        assert _outcome(raw, True, monkeypatch) == _outcome(raw, False, monkeypatch), raw

    agree()


def test_a_line_of_exactly_the_limit_is_taken_however_split():
    """(the CR of a line cut before its LF was counted against the limit)"""
    line = b"GET /" + b"a" * 8176 + b" HTTP/1.1"
    field = b"X: " + b"b" * 8187
    assert len(line) == len(field) == 8190
    for raw in (line + b"\r\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n"):
        cut = raw.index(b"\r\n", 20 if raw.startswith(b"GET / ") else 0) + 1
        for pieces in ([raw], [raw[:cut], raw[cut:]]):
            parser = RequestParser(Limits())
            for piece in pieces:
                parser.feed(piece)
            assert len(parser.done) == 1


def test_a_line_fed_byte_by_byte_is_not_rescanned():
    import time

    def cost(size: int) -> float:
        parser = RequestParser(Limits(field_size=1 << 20, head=1 << 21))
        data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * size
        started = time.monotonic()
        for i in range(len(data)):
            parser.feed(data[i:i + 1])
        return time.monotonic() - started

    small, big = cost(20000), cost(80000)
    assert big < 8 * small + 0.05  # linear: 4x; quadratic would be 16x


def test_a_pipelined_100_continue_waits_for_the_answers_before_it():
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    conn = HttpConnection(ours, ("198.18.0.9", 1), ("h", "80"), APP, limits=LIMITS)
    conn.feed(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    first = theirs.recv(65536)
    while b"100 Continue" not in first:
        first += theirs.recv(65536)
    assert first.startswith(b"HTTP/1.1 200") and first.index(b"HTTP/1.1 100 Continue") > first.index(b"\r\n\r\n")
    conn.feed(b"abc")
    assert b'"body": "abc"' in theirs.recv(65536)
    ours.close()
    theirs.close()


def _chunked_head(path: str = "/") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def test_bodies_share_the_workers_spool_budget():
    """What the connections of one worker hold of bodies before their apps
    run is charged to one budget, as the bytes come (an announced chunk
    size takes nothing), and given back when the body is closed, or its
    connection's parser closed. A body that alone passes it is 413; one
    refused because others hold the room, 503 (it may fit a moment later)."""
    from vassal.http_parser import RequestTooLarge
    from vassal.spool import SpoolBudget

    budget = SpoolBudget(1000)
    limits = Limits(head=8192, spool=budget)
    first, second = RequestParser(limits), RequestParser(limits)
    first.feed(_chunked_head() + b"fffffff\r\n" + b"a" * 700)  # (a 256 MiB chunk announced)
    assert budget.used == 700
    with pytest.raises(Rejected) as refused:
        second.feed(_chunked_head() + b"200\r\n" + b"b" * 400)
    assert refused.value.status == 503 and "body-spool-limit (1000 bytes)" in refused.value.detail
    with pytest.raises(RequestTooLarge) as alone:
        RequestParser(limits).feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"c" * 1001)
    assert alone.value.status == 413
    assert budget.used == 700
    third = RequestParser(limits)
    third.feed(_chunked_head() + b"12c\r\n" + b"c" * 300 + b"\r\n0\r\n\r\n")
    assert budget.used == 1000
    request = third.done.popleft()
    request.body.close()  # (as run_app does when the answer is out)
    assert budget.used == 700
    dropped = RequestParser(limits)
    dropped.feed(_chunked_head() + b"100\r\n" + b"d" * 200)
    assert budget.used == 900
    dropped.close()  # (the worker, as the connection goes)
    assert budget.used == 700
    pipelined = RequestParser(limits)
    pipelined.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"e" * 100
                   + _chunked_head() + b"c8\r\n" + b"f" * 200)
    assert budget.used == 1000 and len(pipelined.done) == 1
    pipelined.close()  # (a request parsed and never answered, one coming in)
    assert budget.used == 700
    first.current.body.close()
    assert budget.used == 0


def test_a_full_budget_refuses_before_the_go_ahead():
    """With Expect: 100-continue and no room, the refusal comes before the
    100 Continue: else the client sends its body only to be refused."""
    from vassal.spool import SpoolBudget

    budget = SpoolBudget(100)
    budget.used = 100
    sent = []
    parser = RequestParser(Limits(head=8192, spool=budget), lambda: sent.append("100"))
    with pytest.raises(Rejected) as refused:
        parser.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
    assert refused.value.status == 503 and sent == []


def test_a_length_known_to_pass_the_budget_is_refused_at_its_head():
    """A Content-Length whose body alone passes body-spool-limit is 413 from
    the head (before, with Expect, it got 100 Continue, the client sent it
    all, then 413); with Expect, one that does not fit beside the others'
    bodies is 503 before the go-ahead. A streamed length needs only its
    start (spool.STREAM_START), so a huge upload under a small limit passes."""
    from vassal.http_parser import RequestTooLarge
    from vassal.spool import STREAM_START, SpoolBudget

    budget = SpoolBudget(200_000)
    sent = []
    for expect in (b"", b"Expect: 100-continue\r\n"):
        with pytest.raises(RequestTooLarge) as alone:
            RequestParser(Limits(head=8192, spool=budget), lambda: sent.append("100")).feed(
                b"PUT / HTTP/1.1\r\nHost: x\r\n" + expect + b"Content-Length: 300000\r\n\r\n")
        assert alone.value.status == 413 and sent == []
    budget.used = 150_000
    with pytest.raises(Rejected) as others:
        RequestParser(Limits(head=8192, spool=budget), lambda: sent.append("100")).feed(
            b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 60000\r\n\r\n")
    assert others.value.status == 503 and sent == []
    budget.used = 0
    roomy = SpoolBudget(STREAM_START + 1000)
    upload = RequestParser(Limits(head=8192, spool=roomy), lambda: sent.append("100"))
    upload.feed(b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100000000\r\n\r\n")
    assert sent == ["100"]
    upload.feed(b"u" * (STREAM_START + 60000))  # (a read that brings more than its start)
    assert roomy.used == STREAM_START and len(upload.done) == 1
    upload.close()
    assert roomy.used == 0


def test_a_body_goes_to_its_file_once_bodies_hold_the_memory_they_may():
    from vassal.spool import SpoolBudget

    budget = SpoolBudget(10000, memory=1000)
    small = RequestParser(Limits(head=8192, spool=budget))
    small.feed(_chunked_head() + b"320\r\n" + b"a" * 800)
    assert budget.in_memory == 800 and not small.current.body.spooled
    other = RequestParser(Limits(head=8192, spool=budget))
    other.feed(_chunked_head() + b"12c\r\n" + b"b" * 300)
    assert other.current.body.spooled and budget.in_memory == 800 and budget.used == 1100
    small.close()
    other.close()
    assert budget.in_memory == 0 and budget.used == 0


def test_a_spool_that_cannot_be_written_is_answered_500(monkeypatch):
    import errno

    from vassal import spool

    def full(directory=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "open_tmpfile", full)
    budget = spool.SpoolBudget(1 << 30)
    parser = RequestParser(Limits(head=8192, spool=budget))
    with pytest.raises(Rejected) as refused:
        parser.feed(_chunked_head() + b"200000\r\n" + b"x" * (2 << 20))
    assert refused.value.status == 500 and "No space left on device" in refused.value.detail
    assert budget.used == 0  # (the refused body gave its room back)


def test_a_long_chunk_line_is_refused_whole_as_in_pieces():
    line = _chunked_head() + b"5;" + b"e" * 20000 + b"\r\nhello\r\n0\r\n\r\n"
    for pieces in ([line], [line[i:i + 1000] for i in range(0, len(line), 1000)]):
        parser = RequestParser(Limits(head=8192))
        with pytest.raises(Rejected) as refused:
            for piece in pieces:
                parser.feed(piece)
        assert refused.value.status == 400 and "chunk size line too long" in refused.value.detail


def test_a_content_length_body_is_charged_too():
    from vassal.spool import SpoolBudget

    budget = SpoolBudget(1000)
    parser = RequestParser(Limits(head=8192, spool=budget))
    parser.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert len(parser.done) == 1 and budget.used == 100
    parser.done.popleft().body.close()
    assert budget.used == 0


def test_a_deferred_go_ahead_is_sent_only_to_the_request_that_asked():
    """A, then B with Expect and its whole body, then C without Expect, its
    body partial, in one read: B's deferred 100 Continue was sent after B's
    answer, in front of C's, a go-ahead nobody asked for."""
    out = serve([b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nbbb"
                 b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nc",
                 b"ccc"])
    assert out.count(b"HTTP/1.1 200 ") == 3 and b"100 Continue" not in out, out[:500]


def test_a_deferred_go_ahead_still_reaches_its_request():
    """C asks, behind A: its 100 Continue comes after A's answer."""
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    conn = HttpConnection(ours, ("198.18.0.9", 40000), ("vassal-host", "8080"), APP, limits=LIMITS)
    try:
        conn.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /c HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
        got = b""
        while b"100 Continue" not in got:
            got += theirs.recv(65536)
        assert got.index(b"HTTP/1.1 200 ") < got.index(b"100 Continue")
        conn.feed(b"cccc")
    finally:
        conn.close()
        ours.close()
        theirs.close()
