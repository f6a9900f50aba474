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
import stat
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


def stat_following(path: str) -> os.stat_result:
    """``os.stat``, and where the kernel refuses root to follow a user's
    symlink in a sticky world-writable dir (fs.protected_symlinks, which
    systemd hosts set), followed as the link's owner, as the kernel allows.
    Raises OSError as os.stat does."""
    try:
        return os.stat(path)
    except PermissionError:
        link = os.lstat(path)
        if not stat.S_ISLNK(link.st_mode) or os.geteuid() != 0:
            raise
        with acting_as((link.st_uid, link.st_gid)):
            return os.stat(path)
