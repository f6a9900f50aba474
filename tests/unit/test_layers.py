"""The packages form layers (issue 13): bedrock/ (the ground floor) below
jails/ below netrouter/ below vassal/ below emperor/. A module may import
its own package and the ones below it, never one above, so no two packages
import each other; inside a package, modules import each other one way
(imports only made for type checking do not count: they run nowhere)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
LAYERS = ["bedrock", "jails", "netrouter", "vassal", "emperor"]  # lowest first


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _runtime_nodes(tree: ast.Module):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules that ``path`` imports, at any depth (lazy imports too)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # "from package import module" names a module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules)
    return {name for name in found if name.split(".")[0] in LAYERS}


def _graph() -> dict[str, set[str]]:
    paths = {_module(p): p for package in LAYERS for p in (ROOT / package).rglob("*.py")}
    modules = set(paths)
    return {module: {name for name in _imports(path, modules) if name in modules and name != module}
            for module, path in paths.items()}


def test_no_package_imports_one_above_it():
    upward = sorted((module, name) for module, names in _graph().items() for name in names
                    if LAYERS.index(name.split(".")[0]) > LAYERS.index(module.split(".")[0]))
    assert upward == [], "imports pointing up the layers"


def test_the_ground_floor_imports_only_itself():
    graph = _graph()
    assert {name for module, names in graph.items() if module.startswith("bedrock") for name in names
            if not name.startswith("bedrock")} == set()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_between_modules():
    # a package's __init__ importing its own modules is the usual facade, not a cycle
    graph = {m: {n for n in names if not (m == n.rsplit(".", 1)[0] or n == m.split(".")[0])}
             for m, names in _graph().items()}
    assert _cycle(graph) is None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_name_imported_from_our_modules_exists():
    """A moved function leaves no import behind it (lazy imports included:
    nothing else would notice before that code path runs)."""
    import importlib

    missing = []
    paths = {_module(p): p for package in LAYERS for p in (ROOT / package).rglob("*.py")}
    for module, path in sorted(paths.items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in LAYERS:
                if node.module.startswith("vassal._speedups"):
                    continue  # optional C extension
                target = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(target, alias.name) and f"{node.module}.{alias.name}" not in paths:
                        missing.append(f"{module}: from {node.module} import {alias.name}")
    assert missing == []


def test_the_readme_layout_names_every_module_and_no_other():
    """README "Layout" is the map of the tree: kept true by this test."""
    import re

    text = (ROOT / "README.md").read_text()
    layout = text[text.index("### Layout"):text.index("### Moving parts")]
    named: set[str] = set()
    for package in LAYERS:
        section = layout[layout.index(f"**`{package}/`**"):]
        section = section[:section.index("\n\n")]
        named |= {f"{package}/{name}" for name in re.findall(r"`([\w/]+\.(?:py|c))`", section)}
    present = {str(p.relative_to(ROOT)) for package in LAYERS for p in (ROOT / package).glob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    present |= {str(p.relative_to(ROOT)) for package in LAYERS for p in (ROOT / package).glob("*.c")}
    assert present - named == set(), "modules the README layout does not name"
    assert named - present == set(), "the README layout names modules that are gone"
