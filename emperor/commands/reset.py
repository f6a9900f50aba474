"""reset NAME...: clear the backoff and try now (also releases a hold)."""

from emperor.commands import select_vassals


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer)
    for vassal in vassals:
        vassal.reset()
    return {"reset": [v.name for v in vassals]}
