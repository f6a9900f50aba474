"""logs NAME [-n N] [-f]: the vassal's captured stdout/stderr (the last N
lines; with -f, new lines are pushed as they come)."""

from emperor.commands import USAGE, CommandError, select_vassals


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer, allow_all=False)
    if len(vassals) != 1:
        raise CommandError("logs takes exactly one vassal name", USAGE)
    count = args.get("lines", 50)
    if not isinstance(count, int) or count < 0:
        raise CommandError("-n wants a non-negative number", USAGE)
    vassal = vassals[0]
    return {"name": vassal.name, "lines": vassal.log.tail(count), "follow": bool(args.get("follow"))}
