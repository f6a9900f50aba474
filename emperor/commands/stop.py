"""stop NAME...: hold vassals down without touching their files (state
``stopped`` until ``start``, ``restart`` or ``reset``)."""

from emperor.commands import select_vassals


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer, allow_all=False)
    for vassal in vassals:
        vassal.hold()
    return {"stopped": [v.name for v in vassals]}
