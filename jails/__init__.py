"""Jails: the platform's isolation backend.

``backend()`` is the only place that asks which OS this is: Linux gets
namespaces and cgroups (jails/linux_backend.py), FreeBSD gets jail(2) and
rctl (jails/freebsd.py). Both implement jails/base.Backend.
"""

from __future__ import annotations

import sys
from functools import cache

from bedrock.config import Config, Problem, unimplemented
from jails.base import Backend, JailError

__all__ = ["Backend", "JailError", "backend", "unsupported"]


@cache
def backend() -> Backend:
    if sys.platform.startswith("freebsd"):
        from jails.freebsd import FreeBSDBackend

        return FreeBSDBackend()
    from jails.linux_backend import LinuxBackend

    return LinuxBackend()


def unsupported(config: Config) -> list[Problem]:
    """Keys this version validates but cannot act on here: not implemented
    yet, or for another platform (the backend says which)."""
    return unimplemented(config) + backend().refused(config)
