"""jails/ owns the platform (issue 13): outside it no module asks which OS
it runs on, imports a platform module, reads /proc, calls prctl, reads
SO_PEERCRED or TCP_INFO, calls ioctl or calls libc through ctypes. Everything else goes through
``jails.backend()``, so a FreeBSD port touches jails/ only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
OUTSIDE = ["bedrock", "netrouter", "vassal", "emperor"]
PLATFORM_MODULES = {"jails.linux", "jails.linux_backend", "jails.namespaces", "jails.netlink",
                    "jails.freebsd", "jails.tun", "pyroute2", "inotify_simple", "ctypes"}
PLATFORM_NAMES = {"SO_PEERCRED", "prctl", "CDLL", "getpeereid", "ioctl", "TCP_INFO"}
# (module, what): portable on every platform we run on, said why.
ALLOWED = {
    # accept4(2) is in Linux and FreeBSD libc alike: the pure-Python fallback
    # of the C accept speedup, not a platform question.
    ("vassal.fdconn", "ctypes"), ("vassal.fdconn", "CDLL"),
    # The tun device's fds and name pass through; opening is jails.tun's.
    ("emperor.router_supervisor", "jails.tun"), ("emperor.spawn", "jails.tun"), ("emperor.zygote", "jails.tun"),
    ("emperor.cli", "jails.tun"), ("netrouter.cli", "jails.tun"),
    ("netrouter.client", "jails.tun"),
    # A passed fd is taken only if jails.tun says it is a framed tun device.
    ("netrouter.router", "jails.tun"),
    # The directory monitor: inotify on Linux, kqueue elsewhere, chosen by
    # what the platform offers (tests/freebsd checks the kqueue side).
    ("emperor.monitor", "inotify_simple"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _platform_uses(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                     if f"{node.module}.{alias.name}" in PLATFORM_MODULES]
        else:
            names = []
        found.update(name for name in names if name in PLATFORM_MODULES or name.split(".")[0] in PLATFORM_MODULES)
        if isinstance(node, ast.Attribute) and node.attr in PLATFORM_NAMES:
            found.add(node.attr)
        if isinstance(node, ast.Name) and node.id in PLATFORM_NAMES:
            found.add(node.id)
        if isinstance(node, ast.Attribute) and ast.unparse(node) in ("sys.platform", "platform.system", "os.uname"):
            found.add(ast.unparse(node))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and "/proc/" in node.value:
            found.add("/proc")
        if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) and "/proc/" in str(v.value) for v in node.values):
            found.add("/proc")
    return found


def test_platform_questions_are_asked_in_jails_only():
    found = set()
    for package in OUTSIDE:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found.update((module, what) for what in _platform_uses(path))
    assert found - ALLOWED == set()
    assert ALLOWED - found == set(), "no longer used: take it off ALLOWED"


def test_the_guard_sees_each_kind(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text('"""reads /proc/ in a docstring: fine"""\nimport sys, ctypes\nfrom jails import linux\n'
                      'import socket\nsocket.SO_PEERCRED\nopen(f"/proc/{1}/stat")\nsys.platform\n')
    assert _platform_uses(sample) == {"ctypes", "jails.linux", "SO_PEERCRED", "/proc", "sys.platform"}
