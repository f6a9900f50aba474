"""The packages form layers (issue 13): bedrock/ below jails/ below netrouter/
below vassal/ below emperor/, no package importing one above it. Today's upward edges
are listed here and may only go away: a new one fails, and so does a
listed one that no longer exists (take it off the list)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
LAYERS = ["bedrock", "jails", "netrouter", "vassal", "emperor"]  # lowest first
# (importing module, imported package): edges to remove, not to add to.
KNOWN_UPWARD = {
    ("jails.linux_backend", "vassal"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _edges() -> set[tuple[str, str]]:
    edges = set()
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for name in _imports(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    edges.add((module, top))
    return edges


def test_no_package_imports_one_above_it():
    upward = {(m, p) for m, p in _edges() if LAYERS.index(p) > LAYERS.index(m.split(".")[0])}
    assert upward - KNOWN_UPWARD == set(), "a new upward import"
    assert KNOWN_UPWARD - upward == set(), "gone: take it off KNOWN_UPWARD"
