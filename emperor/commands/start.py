"""start NAME...: bring back vassals held down by ``stop``."""

from emperor.commands import CommandError, select_vassals


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer, allow_all=False)
    for vassal in vassals:
        if vassal.config is None:
            raise CommandError(f"{vassal.name}: config invalid: {vassal.error}")
    for vassal in vassals:
        vassal.held = False
        vassal.start_now()
    return {"started": [v.name for v in vassals]}
