"""status [NAME...]: state, pid, restarts, last exit, resources of each vassal.

Result: {"emperor": {...}, "vassals": [{"name", "config", "state", "pid",
"restarts", "last_exit", "loyal", "started_at", "ready_at", "backoff_until",
"error", "rss_bytes", "cpu_percent", "log_not_echoed", ...}]}.
``log_not_echoed``: lines of the vassal kept out of the emperor's own log by
the echo rate limit (``logs`` still has them); the emperor's is the total.
A tenant (tyrant mode) sees its own vassals only, and counts of those only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emperor import reporting
from emperor.commands import Peer, names_arg, select_vassals

if TYPE_CHECKING:
    from emperor.core import Emperor


def execute(emperor: Emperor, args: dict, peer: Peer) -> dict:
    names = names_arg(args)
    if names:
        # Refuses an unknown name and another tenant's alike (no oracle).
        select_vassals(emperor, {"names": names}, peer, allow_all=False)
    doc = reporting.status_document(emperor, names, peer)
    add_counters(emperor, doc["emperor"], doc["vassals"], peer)
    return doc


def add_counters(emperor: Emperor, section: dict, entries: list[dict], peer: Peer) -> None:
    from emperor.logbuf import TOTAL_ECHO

    for entry in entries:
        vassal = emperor.vassals.get(entry["name"])
        entry["log_not_echoed"] = vassal.log.not_echoed if vassal is not None and vassal.log is not None else 0
    if peer.privileged:
        section["log_not_echoed"] = TOTAL_ECHO.not_echoed
        if emperor.control is not None:
            section["control_clients"] = emperor.control.counters()
    else:
        # Nothing about other tenants' vassals, not even how many there are.
        section["vassal_count"] = len(entries)
        section["log_not_echoed"] = sum(entry["log_not_echoed"] for entry in entries)
