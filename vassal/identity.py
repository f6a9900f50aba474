"""Acting as another user for a moment: how the emperor (root) reads files a
tenant named, so that the kernel checks every path as that tenant (the
tyrant rule: never act as root on a path a tenant chose).

POSIX effective ids: the real and saved ids stay root, so the way back is
always open; while the effective uid is not 0 the process has no effective
capabilities at all (DAC override included). The emperor is single-threaded,
so nothing else runs with the borrowed identity.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager


def groups_of(uid: int, gid: int) -> list[int]:
    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        return [gid]


@contextmanager
def acting_as(owner: tuple[int, int] | None) -> Iterator[None]:
    """File access as ``owner`` (uid, gid, and its groups) inside the block;
    a no-op for None or when we are not root (we act as ourselves anyway)."""
    if owner is None or os.geteuid() != 0:
        yield
        return
    uid, gid = owner
    saved_groups = os.getgroups()
    saved_gid = os.getegid()
    os.setgroups(groups_of(uid, gid))
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)
