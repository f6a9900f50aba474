"""The router's firewall (DESIGN section 6): chains ``out`` (vassal → router)
and ``in`` (router → vassal) of rules ``ACTION SRC[/MASK] DST[/MASK]``; a
bare ``allow``/``deny`` matches everything; ``0.0.0.0`` matches any address;
a missing mask is /32; first match wins; default allow."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class RuleError(ValueError):
    pass


@dataclass
class Rule:
    text: str
    allow: bool
    src: tuple[int, int] | None  # (network, mask); None: any
    dst: tuple[int, int] | None
    packets: int = 0
    bytes: int = 0

    def matches(self, src: int, dst: int) -> bool:
        return (self.src is None or src & self.src[1] == self.src[0]) and (
            self.dst is None or dst & self.dst[1] == self.dst[0])


def _address(text: str, rule: str) -> tuple[int, int] | None:
    address, sep, mask_text = text.partition("/")
    try:
        ip = int(ipaddress.IPv4Address(address))
    except ValueError:
        raise RuleError(f"rule {rule!r}: bad address {address!r}") from None
    if sep:
        if not (mask_text.isascii() and mask_text.isdigit()) or not 0 <= int(mask_text) <= 32:
            raise RuleError(f"rule {rule!r}: bad mask {mask_text!r} (0..32)")
        bits = int(mask_text)
    else:
        bits = 32
    if ip == 0 and not sep:
        return None  # 0.0.0.0: any address
    # Computed without shifting by 32 (uWSGI's parser breaks on /0).
    mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF if bits else 0
    return ip & mask, mask


def parse_rule(text: str) -> Rule:
    words = text.split()
    if not words:
        raise RuleError("empty firewall rule")
    action = words[0].lower()
    if action not in ("allow", "deny"):
        raise RuleError(f"rule {text!r}: action must be allow or deny, not {words[0]!r}")
    if len(words) == 1:
        return Rule(text, action == "allow", None, None)
    if len(words) != 3:
        raise RuleError(f"rule {text!r}: expected ACTION SRC[/MASK] DST[/MASK] (or a bare {action})")
    return Rule(text, action == "allow", _address(words[1], text), _address(words[2], text))


class Chain:
    def __init__(self, name: str, rules: list[str]):
        self.name = name
        self.rules = [parse_rule(r) for r in rules]

    def allows(self, src: int, dst: int, size: int) -> bool:
        for rule in self.rules:
            if rule.matches(src, dst):
                rule.packets += 1
                rule.bytes += size
                return rule.allow
        return True

    def stats(self) -> list[dict]:
        return [{"rule": r.text, "packets": r.packets, "bytes": r.bytes} for r in self.rules]
