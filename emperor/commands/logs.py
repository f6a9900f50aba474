"""logs NAME [-n N] [-f]: the vassal's captured stdout/stderr (the last N
lines, at most 1 MiB of them, ``omitted`` counting the rest; with -f, new
lines are pushed as they come)."""

import json

from emperor.commands import USAGE, CommandError, select_vassals

# A reply's lines, JSON-encoded, stay under this: a ring of 1 MiB of control
# characters encodes to 6 MB, and a client that does not read pins it.
MAX_REPLY_BYTES = 1 << 20


def execute(emperor, args, peer):
    vassals = select_vassals(emperor, args, peer, allow_all=False)
    if len(vassals) != 1:
        raise CommandError("logs takes exactly one vassal name", USAGE)
    count = args.get("lines", 50)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise CommandError("-n wants a non-negative number", USAGE)
    vassal = vassals[0]
    lines = vassal.log.tail(count)
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        size += len(json.dumps(line)) + 2
        if size > MAX_REPLY_BYTES:
            break
        kept.append(line)
    kept.reverse()
    return {"name": vassal.name, "lines": kept, "omitted": len(lines) - len(kept), "follow": bool(args.get("follow"))}
