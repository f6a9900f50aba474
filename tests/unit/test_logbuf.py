from emperor.logbuf import LogBuffer


def test_lines_split_and_bounded():
    buf = LogBuffer(3)
    buf.feed(b"one\ntw")
    buf.feed(b"o\nthree\nfour\nfi")
    assert buf.tail() == ["two", "three", "four"]
    buf.flush()
    assert buf.tail(1) == ["fi"]
    assert buf.tail(0) == []


def test_bounded_in_bytes():
    buf = LogBuffer(1000, max_bytes=100)
    for i in range(50):
        buf.add(f"{i:09d}")
    assert buf.size <= 100 and buf.tail()[-1] == f"{49:09d}"


def test_followers_dropped_when_gone():
    buf = LogBuffer(10)
    seen = []
    buf.followers.append(lambda line: seen.append(line) or len(seen) < 2)
    for word in ("a", "b", "c"):
        buf.add(word)
    assert seen == ["a", "b"] and not buf.followers


def test_bad_utf8_replaced():
    buf = LogBuffer(10)
    buf.feed(b"caf\xe9\n")
    assert buf.tail() == ["caf\ufffd"]
