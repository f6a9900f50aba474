"""``vassal``: run one vassal in the foreground, as uWSGI's emperor runs its
vassals (``vassal [--inherit F]... [--set K=V]... --ini FILE``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jails
from bedrock import options, protocol
from bedrock.cliopts import add_option_flags, preprocess_argv
from bedrock.config import Config, ConfigError, from_fd, load

_PARSER: argparse.ArgumentParser | None = None


def shared_parser() -> argparse.ArgumentParser:
    """Built once: in the zygote, so every vassal forked from it shares it
    (building ~150 flags costs milliseconds and half a megabyte each time)."""
    global _PARSER
    if _PARSER is None:
        _PARSER = build_parser()
    return _PARSER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vassal",
        description="Run one vassal in the foreground (or validate its config with --check).",
    )
    parser.add_argument("file", nargs="?", help="config file (.ini or .toml)")
    parser.add_argument("--ini", metavar="FILE", help="config file in uWSGI's INI dialect")
    parser.add_argument("--toml", metavar="FILE", help="config file in TOML")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="set an option (wins over the file)")
    parser.add_argument("--inherit", metavar="FILE", action="append", default=[], help="read this template first")
    parser.add_argument("--check", action="store_true", help="only validate the config: exit 0, or 1 listing every error")
    add_option_flags(parser, options.VASSAL)
    return parser


def _config_source(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str | None]:
    given = [(p, k) for p, k in ((args.file, None), (args.ini, "ini"), (args.toml, "toml")) if p]
    if len(given) != 1:
        parser.error("give exactly one config: FILE, --ini FILE or --toml FILE")
    path, kind = given[0]
    return os.path.abspath(path), kind


def load_from_args(args: argparse.Namespace, path: str, kind: str | None) -> Config:
    overrides = parse_sets(args.set) + list(args.settings)
    return load(path, kind=kind, inherit=args.inherit, overrides=overrides)


def parse_sets(items: list[str]) -> list[tuple[str, str]]:
    overrides: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([_problem(f"--set expects KEY=VALUE, got {item!r}")])
        overrides.append((key.strip(), value))
    return overrides


def handed_config() -> Config | None:
    """The config the emperor validated and handed over (an fd named by
    PYEMPEROR_CONFIG_FD), or None when we run on our own."""
    fd_text = os.environ.pop(protocol.ENV_CONFIG_FD, "")
    if not fd_text.isdigit():
        return None
    return from_fd(int(fd_text))


def run_handed() -> int:
    """A vassal started by our emperor (the zygote's, or ``vassal`` with
    PYEMPEROR_CONFIG_FD): it runs exactly the config the emperor validated,
    and on reload the one the emperor hands over next; it reads no file."""
    try:
        config = handed_config()
        if config is None:
            raise ConfigError([_problem(f"no config handed over ({protocol.ENV_CONFIG_FD} unset)")])
        if problems := jails.unsupported(config):
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vassal: {problem}", file=sys.stderr)
        return protocol.EXIT_CONFIG
    return run(config, None)


def _problem(message: str):
    from bedrock.config import Problem

    return Problem("<command line>", None, None, message)


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--check" not in raw and os.environ.get(protocol.ENV_CONFIG_FD):
        # Started by our emperor: the argv only names the file, for ps.
        return run_handed()
    parser = shared_parser()
    args = parser.parse_args(preprocess_argv(raw, options.VASSAL))
    path, kind = _config_source(args, parser)
    try:
        config = load_from_args(args, path, kind)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vassal: {problem}", file=sys.stderr)
        return 1 if args.check else protocol.EXIT_CONFIG
    missing = jails.unsupported(config)
    if args.check:
        for problem in missing:
            print(f"vassal: warning: {problem}", file=sys.stderr)
        print(f"{path}: OK")
        return 0
    if missing:
        for problem in missing:
            print(f"vassal: {problem}", file=sys.stderr)
        return protocol.EXIT_CONFIG
    return run(config, lambda: load_from_args(args, path, kind))


def run(config: Config, reload_config: Callable[[], Config] | None) -> int:
    """``reload_config`` re-reads the file on a reload; None: the emperor
    hands every new config over (protocol.CONFIG_FD)."""

    from vassal.top import Top

    name = os.path.basename(config.path)
    return Top(name, config, reload_config).run()


if __name__ == "__main__":
    sys.exit(main())
