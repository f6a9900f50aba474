"""stats: the stats document (uWSGI's emperor stats fields plus our status),
the same JSON the ``emperor-stats`` server sends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emperor import reporting
from emperor.commands import Peer, require_privileged

if TYPE_CHECKING:
    from emperor.core import Emperor


def document(emperor: Emperor) -> dict:
    from emperor.commands.status import add_counters

    doc = reporting.stats_document(emperor)
    add_counters(emperor, doc["status"], doc["vassals"], Peer.root())
    return doc


def execute(emperor: Emperor, args: dict, peer: Peer) -> dict:
    require_privileged(peer)
    return document(emperor)
