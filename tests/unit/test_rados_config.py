"""rados-mount in process: the value's validation (each error naming the
field) and a vassal asking for it without python3-rados."""

from __future__ import annotations

import sys

import pytest

from bedrock.options import BadValue, parse_rados_mount


@pytest.mark.parametrize(("value", "message"), [
    ("pool=web", "needs mountpoint="),
    ("mountpoint=/x", "needs pool="),
    ("mountpoint=x,pool=web", "must start with /"),
    ("mountpoint=/x,pool=web,colour=blue", "KEY one of"),
    ("mountpoint=/x,pool=web,timeout=soon", "expected a number"),
    ("mountpoint=/x,pool=web,allow_put=perhaps", "expected true/false"),
    ("mountpoint=/x,pool=web,pool=other", "pool given twice"),
])
def test_bad_mounts(value, message):
    with pytest.raises(BadValue, match=message):
        parse_rados_mount(value)


def test_a_good_mount():
    assert parse_rados_mount("mountpoint=/files,pool=web,config=/etc/ceph/c.conf,timeout=2.5,allow_put=1") == {
        "mountpoint": "/files", "pool": "web", "config": "/etc/ceph/c.conf", "timeout": "2.5", "allow_put": "1"}


def test_without_python3_rados_the_message_names_it(monkeypatch):
    from vassal import rados

    monkeypatch.setitem(sys.modules, "rados", None)  # (import rados now fails)
    with pytest.raises(rados.Unavailable, match="python3-rados"):
        rados._import_rados()
