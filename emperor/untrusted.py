"""JSON from parties the emperor does not trust (a tenant's app on its status
socket, any local user on a 666 control socket), decoded with bounded size
and nesting, and complaints about such input logged once instead of per
message.

CPython's json recurses once per nesting level and raises RecursionError
(not ValueError) past the interpreter's limit, so ``b"[" * 50000`` used to
escape every ``except ValueError`` and take the emperor down. The depth is
checked before json.loads recurses at all."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Hashable

MAX_BYTES = 65536
MAX_DEPTH = 32

# A JSON string, escapes included: brackets inside strings do not nest. The
# closing quote is optional so that an unterminated string matches to the
# end instead of failing and being retried from every later quote (which
# made '"\\"\\"...' quadratic).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.S)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


class UntrustedJSONError(ValueError):
    """Refused before decoding (too big, too deep); a ValueError, so every
    caller that handles bad JSON handles this too."""


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """True when arrays/objects nest deeper than ``max_depth`` (brackets
    inside strings not counted). Cheap for the common case: a document with
    no more brackets than the limit cannot nest deeper than it."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = 0
    for char in brackets:
        if char == 0x5B or char == 0x7B:  # [ {
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def loads(data: bytes | str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> object:
    """json.loads for hostile input: ValueError (UntrustedJSONError or
    json's own) for anything too big, too deep or not JSON; never
    RecursionError, whatever the input."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise UntrustedJSONError(f"too long ({len(raw)} bytes; at most {max_bytes})")
    if nesting_exceeds(raw, max_depth):
        raise UntrustedJSONError(f"nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except RecursionError:
        # Belt and braces: the scan above should make this unreachable.
        raise UntrustedJSONError(f"nested too deeply (limit {max_depth})") from None
    except UnicodeDecodeError as exc:
        raise UntrustedJSONError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None


class Once:
    """Remembers which complaints were made, so that a party repeating the
    same bad input gets one log line, not one per message. Bounded: the
    oldest keys are forgotten first (and may then be logged once more)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.seen: OrderedDict[Hashable, int] = OrderedDict()

    def __call__(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen; counts the repeats."""
        if key in self.seen:
            self.seen[key] += 1
            return False
        self.seen[key] = 0
        if len(self.seen) > self.size:
            self.seen.popitem(last=False)
        return True

    def repeats(self, key: Hashable) -> int:
        return self.seen.get(key, 0)


first_time = Once()
