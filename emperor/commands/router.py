"""router: the netrouter's connections (vassal, address, packets and bytes
each way, drops), firewall rule counters and drops by reason, as reported by
the router within the last second."""

from emperor import reporting
from emperor.commands import require_privileged


def execute(emperor, args, peer):
    require_privileged(peer)
    return reporting.router_stats(emperor)
