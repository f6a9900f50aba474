"""stats: the stats document (uWSGI's emperor stats fields plus our status),
the same JSON the ``emperor-stats`` server sends."""

from emperor.commands import require_privileged


def execute(emperor, args, peer):
    require_privileged(peer)
    return emperor.stats_document()
