"""Loading the WSGI app named by ``wsgi-file`` or ``module``, and the apps
of ``mount = /PREFIX=APP`` lines, behind one dispatcher that sets
SCRIPT_NAME and PATH_INFO for the one chosen."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Callable

from bedrock.config import Config
from vassal import routing


class AppLoadError(Exception):
    pass


def has_app(config: Config) -> bool:
    return config.has("wsgi-file") or config.has("module") or config.has("wsgi") or bool(config.getlist("mount")) \
        or config.has("rados-mount")


def prepare_paths(config: Config) -> None:
    for path in reversed(config.getlist("pythonpath")):
        if path not in sys.path:
            sys.path.insert(0, path)


def _load_file(path: str, callable_name: str) -> Callable:
    if not os.path.isfile(path):
        raise AppLoadError(f"wsgi-file {path!r} not found (cwd {os.getcwd()})")
    namespace = runpy.run_path(path, run_name="uwsgi_file_" + os.path.basename(path).replace(".", "_").replace("/", "_"))
    return _checked(namespace.get(callable_name), f"wsgi-file {path!r}", callable_name)


def _load_module(spec: str, callable_name: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return _checked(getattr(module, attr or callable_name, None), f"module {module_name!r}", attr or callable_name)


def _checked(app: object, where: str, callable_name: str) -> Callable:
    if app is None:
        raise AppLoadError(f"{where} has no callable {callable_name!r}")
    if not callable(app):
        raise AppLoadError(f"{where}: {callable_name!r} is not callable")
    return app


def load_app(config: Config) -> Callable:
    prepare_paths(config)
    callable_name = config.get_str("callable")
    main: Callable | None = None
    if config.has("wsgi-file"):
        main = _load_file(config.get_str("wsgi-file"), callable_name)
    elif config.has("module") or config.has("wsgi"):
        main = _load_module((config.get_str("module") or config.get_str("wsgi")), callable_name)
    mounts: dict[str, Callable] = {}
    for line in config.getlist("mount"):
        prefix, _, target = str(line).partition("=")
        # uWSGI's rule: a file path (or anything that exists) is a wsgi-file, else a module.
        loaded = _load_file(target, callable_name) if target.endswith((".py", ".wsgi")) or os.path.exists(target) \
            else _load_module(target, callable_name)
        mounts[prefix.rstrip("/")] = loaded
    script_name = os.environ.get("SCRIPT_NAME", "").rstrip("/")
    manage = config.get_bool("manage-script-name")
    if config.has("rados-mount"):
        from vassal import rados  # (python3-rados is optional: only a vassal that asks needs it)

        try:
            served = rados.wrap(main if not mounts and not script_name else Dispatcher(main, mounts, script_name, manage),
                                config)
        except rados.Unavailable as exc:
            raise AppLoadError(str(exc)) from None
        return routing.wrap(served, config)
    if not mounts and not script_name:
        assert main is not None
        return routing.wrap(main, config)  # the common case: no dispatch at all
    return routing.wrap(Dispatcher(main, mounts, script_name, manage), config)


class Dispatcher:
    """Several apps in one vassal (``mount``), or one under a prefix.

    With ``manage-script-name`` the longest mountpoint that PATH_INFO starts
    with (at a segment boundary) picks the app and moves from PATH_INFO to
    SCRIPT_NAME. Without it, as in uWSGI, the app is the one whose
    mountpoint is the SCRIPT_NAME the web server sent (nginx's
    ``uwsgi_param SCRIPT_NAME``), else the main one. ``env =
    SCRIPT_NAME=/prefix`` mounts the main app there (as gunicorn reads it).
    Nothing matching and no main app: 404."""

    def __init__(self, main: Callable | None, mounts: dict[str, Callable], script_name: str, manage: bool):
        self.main = main
        self.script_name = script_name
        self.manage = manage
        if script_name and main is not None:
            mounts = {script_name: main, **mounts}
        self.mounts = mounts
        # Longest first: /app/admin before /app.
        self.order = sorted(mounts, key=len, reverse=True)

    def __call__(self, environ: dict, start_response: Callable):
        path = environ.get("PATH_INFO", "")
        given = environ.get("SCRIPT_NAME", "").rstrip("/")
        app = None
        if given and given in self.mounts:
            app = self.mounts[given]
            if path == given or path.startswith(given + "/"):
                environ["PATH_INFO"] = path[len(given):]  # (a server that sent the whole path in PATH_INFO too)
        elif self.manage or self.script_name:
            candidates = self.order if self.manage else [self.script_name]
            for prefix in candidates:
                if prefix and (path == prefix or path.startswith(prefix + "/")):
                    app = self.mounts[prefix]
                    environ["SCRIPT_NAME"] = given + prefix
                    environ["PATH_INFO"] = path[len(prefix):]
                    break
        if app is None:
            app = self.mounts.get("") or self.main
        if app is None:
            body = b"404 Not Found (no app mounted here)\n"
            start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)
