"""reload NAME...|--all: graceful reload (byte 1): same jail, sockets kept,
new app master ready before the old one drains. A vassal that is not
running (backoff, stopped by the operator, invalid) is left as it is."""

from emperor.commands import select_vassals


def execute(emperor, args, peer):
    done = []
    skipped = []
    for vassal in select_vassals(emperor, args, peer):
        (done if vassal.reload() else skipped).append(vassal.name)
    return {"reloaded": done, "skipped": skipped}
