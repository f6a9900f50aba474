"""restart NAME...: stop, then spawn a new jail; every phase runs again."""

from emperor.commands import CommandError, select_vassals


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer)
    for vassal in vassals:
        if vassal.config is None:
            raise CommandError(f"{vassal.name}: config invalid: {vassal.error}")
    for vassal in vassals:
        vassal.restart()
    return {"restarted": [v.name for v in vassals]}
