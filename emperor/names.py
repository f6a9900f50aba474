"""What text from outside (vassal file names, a vassal's output) may reach
the emperor's log as is, and which vassal file names the emperor can
represent at all.

A file name is any bytes but NUL and '/': a tenant can name a file
"x\\n2024-01-01 00:00:00 [emperor] ...ini" and, before this, forge whole
emperor log lines; non-UTF-8 bytes come in as lone surrogates (PEP 383)
that fail to encode later, far from where the name was read."""

from __future__ import annotations

import re

from bedrock.log import UNSAFE, escape, printable

__all__ = ["name_problem", "printable"]

# Longest vassal file name, in UTF-8 bytes: below the 255 of file systems
# and cgroupfs, leaving room for what the emperor derives from it (a "_"
# prefix for dotted cgroup names, suffixes of temporary files).
MAX_NAME_BYTES = 200

# Bidirectional overrides and isolates: they make a name display as another.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def name_problem(name: str) -> str | None:
    """Why ``name`` (a vassal file name, as os.fsdecode gives it) cannot be
    a vassal, or None when it can. The text names the problem and says what
    to do, and shows the name escaped, so it can be logged and shown as is."""
    shown = '"' + printable(name).replace("\t", "\\x09") + '"'
    if not name:
        return "the vassal file name is empty"
    if re.search("[\udc80-\udcff]", name):
        return f"the file name {shown} is not valid UTF-8; rename the file"
    if re.search("[\ud800-\udfff]", name):
        return f"the file name {shown} holds a lone surrogate; rename the file"
    if UNSAFE.search(name) or "\t" in name:
        return f"the file name {shown} holds a control character (newline, tab, escape...); rename the file"
    if _BIDI.search(name):
        return f"the file name \"{_BIDI.sub(escape, printable(name))}\" holds a bidirectional override; rename the file"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"the file name is too long ({size} bytes in UTF-8, at most {MAX_NAME_BYTES}); rename the file"
    return None


# What a shell treats as syntax when a name reaches it unquoted (an
# operator's exec-as-emperor hook with $UWSGI_VASSAL_CONFIG, run as root):
# globs, word splitting, redirections, expansions, and a leading "-" (an option).
_SHELL_SYNTAX = re.compile(r"[\s*?\[\]$`;&|<>()'\"\\{}~!#^]")


def tenant_name_problem(name: str) -> str | None:
    """Tyrant mode: why a tenant's file name is refused besides name_problem."""
    if name.startswith("-"):
        return f"tyrant mode: the file name {printable(name)!r} starts with '-'; rename the file"
    if _SHELL_SYNTAX.search(name):
        return (f"tyrant mode: the file name {printable(name)!r} holds a space or a shell character "
                "(* ? [ ] $ ` ; & | < > ( ) quotes \\ { } ~ ! # ^); rename the file")
    return None
