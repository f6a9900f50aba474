"""The emperor pipe: single bytes over a unix socketpair, as in uWSGI; and
the environment variables the emperor hands a vassal."""

from __future__ import annotations

import os

ENV_FD = "UWSGI_EMPEROR_FD"
# Ours: a datagram socket for the app master's status (emperor/spawn.py).
ENV_STATUS_FD = "PYEMPEROR_STATUS_FD"

# emperor -> vassal
STOP = 0
RELOAD = 1
# vassal -> emperor
SPAWNED = 1
CONFIG_CHUNK = 2
READY = 5
LOYAL = 17
VOLUNTARY_SHUTDOWN = 22
HEARTBEAT = 26
BROODLORD = 30
# emperor -> vassal, our extension: this byte carries an fd (SCM_RIGHTS), a
# connection to the netrouter brokered for the vassal's first tuntap-device.
ROUTER_FD = 40
ENV_BROKERED = "PYEMPEROR_TUNTAP_BROKERED"
# emperor -> vassal, ours: this byte carries an fd (SCM_RIGHTS), a sealed
# memfd holding the validated config (vassal/config.py to_json) that the next
# graceful reload (byte 1) applies: a vassal never parses its file itself.
CONFIG_FD = 41
# The same for the first start: the fd that holds the config.
ENV_CONFIG_FD = "PYEMPEROR_CONFIG_FD"

# Exit codes of our vassal's top process, so the emperor can name the reason.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_APP_LOAD = 3
EXIT_HOOK = 4
EXIT_REASONS = {EXIT_APP_LOAD: "app-load", EXIT_HOOK: "hook"}

# Namespaces the emperor cloned for the vassal (emperor-use-clone).
ENV_CLONED = "PYEMPEROR_CLONED"
# Tyrant mode: "UID:GID" of the vassal file's owner.
ENV_TYRANT = "PYEMPEROR_TYRANT"


def cloned_namespaces() -> set[str]:
    """In a vassal: the namespaces the emperor already made for it."""
    return {n for n in os.environ.get(ENV_CLONED, "").split(",") if n}


def tyrant_owner() -> tuple[int, int] | None:
    """In a vassal: the file's owner in tyrant mode, else None."""
    raw = os.environ.get(ENV_TYRANT, "")
    if not raw:
        return None
    uid, _, gid = raw.partition(":")
    return int(uid), int(gid)
