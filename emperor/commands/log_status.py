"""log-status: write a status table to the emperor's log (SIGUSR1). Root
only: the log is the operator's, and every vassal is in the table."""

from emperor import reporting
from emperor.commands import require_privileged


def execute(emperor, args, peer):
    require_privileged(peer)
    doc = reporting.status_document(emperor, peer=peer)
    emperor.log(f"{len(doc['vassals'])} vassal(s):")
    for v in doc["vassals"]:
        emperor.log(
            f"  {v['name']:<30} {v['state']:<10} pid={v['pid']} restarts={v['restarts']} "
            f"loyal={v['loyal']} rss={v['rss_bytes'] // 1024}KiB error={v['error'] or '-'}"
        )
    return {"logged": len(doc["vassals"])}
