"""Log lines of a vassal's processes, written straight to stderr.

Under the emperor, stderr is a pipe that the emperor reads and keeps per
vassal; one ``write`` per line keeps lines from different processes whole.
"""

from __future__ import annotations

import os
import re
import time

# C0 controls but tab, DEL, C1 controls (NEL, CSI...), the Unicode line and
# paragraph separators (some viewers break lines there) and lone surrogates.
# Tab is harmless: it cannot start a line or move the cursor back.
UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_BUT_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # the original byte (surrogateescape)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control character (tab excepted) and every
    undecodable byte written as a visible escape (``\\x0a``, ``\\xff``,
    ``\\u2028``). With ``keep_newlines``, newlines stay (the caller indents
    continuation lines)."""
    pattern = _UNSAFE_BUT_NEWLINE if keep_newlines else UNSAFE
    if pattern.search(text) is None:
        return text
    return pattern.sub(escape, text)


def stamped(tag: str, message: str) -> bytes:
    """A log record of the emperor's or a loop's own: only its first line
    starts like one (stamp, ``[tag]``); the rest (a config error's problems,
    a traceback) are indented, and nothing in it is a raw control character,
    so no text inside a message (a tenant's file name) passes for a line of ours."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    first, *rest = printable(message, keep_newlines=True).rstrip("\n").split("\n")
    return (f"{stamp} [{tag}] {first}\n" + "".join(f"    {line}\n" for line in rest)).encode("utf-8", "replace")

_role = "vassal"
# Where log lines go instead of fd 2 (the top process's log pipe, if any).
_sink = None


def set_sink(sink) -> None:
    global _sink
    _sink = sink


def set_role(role: str) -> None:
    global _role
    _role = role


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "".join(f"{stamp} [{_role} {os.getpid()}] {line}\n" for line in message.splitlines() or [""])
    data = text.encode("utf-8", "replace")
    if _sink is not None:
        _sink(data)
        return
    try:
        os.write(2, data)
    except OSError:
        pass
