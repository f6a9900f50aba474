"""argparse flags generated from the option table, so every config key is
also ``--key value`` (repeatable where the key is) with one help text."""

from __future__ import annotations

import argparse

from bedrock import options


class _Collect(argparse.Action):
    """Keep every option as (key, raw value) in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        items = getattr(namespace, "settings", None) or []
        items.append((self.dest, "true" if values in (None, []) else values))
        namespace.settings = items


def add_option_flags(parser: argparse.ArgumentParser, scope: str, skip: tuple[str, ...] = ()) -> None:
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in options.all_options():
        if scope not in opt.scope or opt.name in skip:
            continue
        group = groups.get(opt.group)
        if group is None:
            group = groups[opt.group] = parser.add_argument_group(f"{opt.group} options")
        flags = [f"--{opt.name}"]
        for alias in opt.aliases:
            flags.append(f"-{alias}" if len(alias) == 1 else f"--{alias}")
        extra = []
        if opt.multi:
            extra.append("repeatable")
        if opt.default not in (None, False):
            extra.append(f"default {oct(opt.default)[2:] if opt.name.endswith('-mode') else opt.default}")
        if opt.jail:
            extra.append("restart on change")
        help_text = opt.help + (f" ({', '.join(extra)})" if extra else "")
        kwargs: dict = {"dest": opt.name, "action": _Collect, "help": help_text.replace("%", "%%")}
        if opt.boolean:
            kwargs.update(nargs=0)
        else:
            kwargs.update(metavar=opt.metavar)
        group.add_argument(*flags, **kwargs)
    add_bool_value_flag(parser)
    parser.set_defaults(settings=[])


class _CollectBool(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        key, _, value = str(values).partition("=")
        items = getattr(namespace, "settings", None) or []
        items.append((key, value))
        namespace.settings = items


BOOL_FLAG = "--x-bool-value"


def preprocess_argv(argv: list[str], scope: str) -> list[str]:
    """``--flag=false`` for a boolean: argparse cannot take an optional value
    only after ``=``, and a bare boolean must not swallow the next word."""
    out: list[str] = []
    for token in argv:
        if token.startswith("--") and "=" in token:
            name, _, value = token[2:].partition("=")
            opt = options.lookup(name, scope)
            if opt is not None and opt.boolean:
                out.extend([BOOL_FLAG, f"{opt.name}={value}"])
                continue
        out.append(token)
    return out


def add_bool_value_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(BOOL_FLAG, action=_CollectBool, help=argparse.SUPPRESS)
