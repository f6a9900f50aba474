"""status [NAME...]: state, pid, restarts, last exit, resources of each vassal.

Result: {"emperor": {...}, "vassals": [{"name", "config", "state", "pid",
"restarts", "last_exit", "loyal", "started_at", "ready_at", "backoff_until",
"error", "rss_bytes", "cpu_percent", ...}]}.
"""

from emperor.commands import CommandError


def execute(emperor, args, peer):
    names = args.get("names") or []
    unknown = [n for n in names if n not in emperor.vassals]
    if unknown:
        raise CommandError(f"no vassal named {unknown[0]!r}")
    return emperor.status(names, peer)
