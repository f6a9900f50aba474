"""Loading the WSGI app named by ``wsgi-file`` or ``module``."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Callable

from vassal.config import Config


class AppLoadError(Exception):
    pass


def has_app(config: Config) -> bool:
    return config.has("wsgi-file") or config.has("module") or config.has("wsgi")


def prepare_paths(config: Config) -> None:
    for path in reversed(config.getlist("pythonpath")):
        if path not in sys.path:
            sys.path.insert(0, path)


def load_app(config: Config) -> Callable:
    prepare_paths(config)
    callable_name = str(config.get("callable"))
    if config.has("wsgi-file"):
        path = str(config.get("wsgi-file"))
        if not os.path.isfile(path):
            raise AppLoadError(f"wsgi-file {path!r} not found (cwd {os.getcwd()})")
        namespace = runpy.run_path(path, run_name="uwsgi_file_" + os.path.basename(path).replace(".", "_"))
        app = namespace.get(callable_name)
        where = f"wsgi-file {path!r}"
    else:
        spec = str(config.get("module") or config.get("wsgi"))
        module_name, _, attr = spec.partition(":")
        module = importlib.import_module(module_name)
        app = getattr(module, attr or callable_name, None)
        where = f"module {module_name!r}"
        callable_name = attr or callable_name
    if app is None:
        raise AppLoadError(f"{where} has no callable {callable_name!r}")
    if not callable(app):
        raise AppLoadError(f"{where}: {callable_name!r} is not callable")
    return app
