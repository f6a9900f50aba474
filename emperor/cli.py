"""``emperor [OPTIONS] [DIR ...]``: run the emperor on one or more vassal dirs."""

from __future__ import annotations

import argparse
import os
import sys

import jails
from bedrock import options
from bedrock.cliopts import add_option_flags, preprocess_argv
from bedrock.config import ConfigError, Entry, build, read_entries

DEFAULT_DIR = "/etc/vassals"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emperor",
        description="Watch vassal dirs and run one supervised vassal per config file.",
    )
    parser.add_argument("dirs", nargs="*", metavar="DIR", help=f"vassal dir, dir://DIR or glob://PATTERN (default {DEFAULT_DIR})")
    parser.add_argument("--ini", metavar="FILE", help="read emperor options from FILE ([uwsgi] or [emperor] section)")
    parser.add_argument("--toml", metavar="FILE", help="read emperor options from a TOML FILE ([emperor] table)")
    parser.add_argument("--scan", action="store_true", help="poll the dirs instead of using inotify")
    add_option_flags(parser, options.EMPEROR)
    return parser


def load_settings(args: argparse.Namespace):
    entries: list[Entry] = []
    for path, kind in ((args.ini, "ini"), (args.toml, "toml")):
        if path:
            entries.extend(read_entries(os.path.abspath(path), kind, emperor=True))
    for key, value in args.settings:
        entries.append(Entry(key, value, "<command line>", None))
    for directory in args.dirs:
        entries.append(Entry("emperor", directory, "<command line>", None))
    if not any(e.key == "emperor" for e in entries):
        entries.append(Entry("emperor", DEFAULT_DIR, "<default>", None))
    source = os.path.abspath(args.ini or args.toml or "emperor")
    return build(source, entries, scope=options.EMPEROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(preprocess_argv(list(sys.argv[1:] if argv is None else argv), options.EMPEROR))
    try:
        settings = load_settings(args)
        from emperor.launcher import emperor_hook_problems

        if problems := jails.unsupported(settings) + emperor_hook_problems(settings):
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"emperor: {problem}", file=sys.stderr)
        return 2
    from emperor.core import Emperor
    from emperor.router_supervisor import RangeError
    from emperor.singleton import AlreadyRunning
    from jails.tun import TunError
    from netrouter.firewall import RuleError
    from vassal.hooks import HookError

    emperor = Emperor(settings)
    try:
        emperor.start(force_scan=args.scan)
    except AlreadyRunning as exc:
        emperor.cleanup()
        print(f"emperor: {exc}", file=sys.stderr)
        return 1
    except RuleError as exc:
        emperor.cleanup()
        # A firewall rule, or a tuntap-router-tenant-range (RangeError) that names its key.
        what = "" if isinstance(exc, RangeError) else "tuntap-router firewall: "
        print(f"emperor: {what}{exc}", file=sys.stderr)
        return 2
    except (OSError, TunError, HookError) as exc:
        emperor.cleanup()
        print(f"emperor: cannot start: {exc}", file=sys.stderr)
        return 1
    return emperor.run()



if __name__ == "__main__":
    sys.exit(main())
