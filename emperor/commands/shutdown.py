"""shutdown: stop every vassal (stop byte, SIGTERM, SIGKILL after the curse
tolerance), then exit 0. Same as SIGTERM/SIGINT to the emperor."""

from emperor.commands import require_privileged


def execute(emperor, args, peer):
    require_privileged(peer)
    emperor.shutdown()
    return {"shutting_down": True}
