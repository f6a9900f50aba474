"""``netrouter DEV SOCKET``: not implemented yet (see the netrouter issue)."""

import sys


def main(argv: list[str] | None = None) -> int:
    print("netrouter: not yet implemented in this version of pyemperor", file=sys.stderr)
    return 2
