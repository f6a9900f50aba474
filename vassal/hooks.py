"""The hooks subsystem: ``hook-PHASE = ACTION:ARGS`` and the fixed forms
``exec-``, ``mount-``, ``umount-``, ``call-PHASE``, run in file order within
their phase. Only the ``exec`` action goes through a shell.

A failing hook raises :class:`HookError` naming the phase, the hook (key,
file, line) and the error; the caller decides whether the phase is fatal
(every phase is, except ``as-user-atexit``).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jails
from bedrock.config import Config, Entry
from bedrock.log import log
from bedrock.proc import killpg_quietly

WAIT_DEFAULT_TIMEOUT = 10.0
# hook-timeout's default: a hook that hangs must not leave its vassal
# `starting` forever. None or 0: no limit.
HOOK_TIMEOUT = 60.0
FIXED_FORMS = ("exec", "mount", "umount", "call")


class HookError(Exception):
    pass


class HookExit(Exception):
    """The ``exit`` action: stop the vassal with this code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class Hook:
    phase: str
    action: str
    args: str
    entry: Entry

    def describe(self) -> str:
        where = f"{self.entry.file}:{self.entry.line}" if self.entry.line else self.entry.file
        return f"{self.entry.key} = {self.entry.value} ({where})"


def hooks_for(config: Config, phase: str) -> list[Hook]:
    found = []
    for key, value, entry in config.items:
        if key == f"hook-{phase}":
            assert isinstance(value, tuple)  # (parse_hook's)
            action, args = value
            found.append(Hook(phase, action, args, entry))
            continue
        for form in FIXED_FORMS:
            if key == f"{form}-{phase}":
                args = " ".join(value) if isinstance(value, tuple) else str(value)
                found.append(Hook(phase, form, args, entry))
    return found


def hook_timeout(config: Config) -> float | None:
    """``hook-timeout`` in seconds; None when 0 (no limit)."""
    return config.get_float("hook-timeout", HOOK_TIMEOUT) or None


def run_phase(config: Config, phase: str, fatal: bool = True) -> None:
    timeout = hook_timeout(config)
    for hook in hooks_for(config, phase):
        try:
            run_hook(hook, timeout)
        except HookExit:
            raise
        except Exception as exc:
            message = f"hook failed in phase {phase}: {hook.describe()}: {exc}"
            if fatal:
                raise HookError(message) from None
            log(message)


def run_hook(hook: Hook, timeout: float | None = HOOK_TIMEOUT) -> None:
    """Run one hook; ``timeout`` (hook-timeout) bounds exec and the waiting
    actions, whose overrun is a HookError naming it."""
    action, args = hook.action, hook.args
    if action == "exec":
        _exec(args, timeout)
    elif action == "cd":
        os.chdir(args)
    elif action == "mkdir":
        os.mkdir(args)
    elif action == "putenv":
        key, sep, value = args.partition("=")
        if not sep:
            raise HookError("putenv wants KEY=VALUE")
        os.environ[key] = value
    elif action == "write":
        path, _, content = args.partition(" ")
        with open(path, "w") as handle:
            handle.write(content)
    elif action == "unlink":
        os.unlink(args)
    elif action == "mount":
        words = args.split()
        if len(words) < 3:
            raise HookError("mount wants FS SRC DST [FLAGS]")
        fstype, source, target = words[:3]
        jails.backend().mount(fstype, source, target, words[3:])
    elif action == "umount":
        words = args.split()
        if not words:
            raise HookError("umount wants DST [FLAGS]")
        jails.backend().umount(words[0], words[1:])
    elif action == "hostname":
        jails.backend().sethostname(args.strip())
    elif action == "call":
        call(args)
    elif action == "print":
        log(args)
    elif action == "exit":
        raise HookExit(int(args) if args.strip() else 0)
    elif action == "wait_for_file":
        path, own = _with_timeout(args)
        _wait(lambda remaining: os.path.exists(path), own, timeout, f"file {path}")
    elif action == "wait_for_socket":
        address, own = _with_timeout(args)
        _wait(lambda remaining: _connects(address, remaining), own, timeout, f"socket {address}")
    else:  # the option table refuses unknown actions; kept as a guard
        raise HookError(f"unknown action {action!r}")


def _timed_out(timeout: float, done: str = "") -> HookError:
    return HookError(f"timed out after {timeout:g}s (hook-timeout = {timeout:g}){done}")


def _exec(command: str, timeout: float | None) -> None:
    # Its own process group, so that a timeout kills what the shell started
    # too (a pipeline, a backgrounded child), not just the shell.
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, process_group=0)
    try:
        # Waited for by pid: no other reaper runs while a hook does.
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        killpg_quietly(proc.pid, signal.SIGKILL)
        proc.wait()
        assert timeout is not None  # (only a timeout expires)
        raise _timed_out(timeout, ": killed its process group") from None
    except BaseException:
        # Interrupted (a signal handler raised): the hook must not outlive us.
        killpg_quietly(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if code != 0:
        raise HookError(f"command exited with {code}")


def call(spec: str) -> object:
    """``pkg.mod.func [ARGS...]``: import and call a Python function."""
    dotted, *arguments = spec.split()
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise HookError(f"call wants a dotted path, got {dotted!r}")
    module = importlib.import_module(module_name)
    func = getattr(module, attr, None)
    if not callable(func):
        raise HookError(f"{dotted} is not a callable")
    return func(*arguments)


def _with_timeout(args: str) -> tuple[str, float]:
    words = args.split()
    if not words:
        raise HookError("expects a path or address")
    timeout = float(words[1]) if len(words) > 1 else WAIT_DEFAULT_TIMEOUT
    return words[0], timeout


def _connects(address: str, within: float = 1.0) -> bool:
    wait = max(0.01, min(1.0, within))
    try:
        if "/" in address:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(wait)
                sock.connect(address)
        else:
            host, _, port = address.rpartition(":")
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=wait):
                pass
        return True
    except OSError:
        return False


def _wait(predicate: Callable[[float], bool], own: float, limit: float | None, what: str) -> None:
    """Poll ``predicate`` (given the seconds left) until it holds: past the
    action's own timeout it failed, past hook-timeout (``limit``) it hung."""
    timeout = own if limit is None else min(own, limit)
    deadline = time.monotonic() + timeout
    while not predicate(deadline - time.monotonic()):
        if time.monotonic() > deadline:
            if limit is not None and limit < own:
                raise _timed_out(limit)
            raise HookError(f"{what} did not appear within {own:g}s")
        time.sleep(0.05)
    sys.stdout.flush()
