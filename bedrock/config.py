"""Vassal and emperor config files: uWSGI's INI dialect and TOML.

A config is read into a flat, ordered list of entries (key, raw value, file,
line); ``vassals-inherit`` templates come first, the file's own entries after
and ``--set`` overrides last. Placeholders are expanded for the vassal (its
name and dir, even inside a template), then every value is checked against
the option table. Every problem is collected with its file, line and key, so
``vassal --check`` can list them all at once.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from bedrock import options, routes
from bedrock.identity import acting_as
from bedrock.options import Option

VALID_EXTENSIONS = (".ini", ".toml")
INI_SECTIONS = ("uwsgi", "vassal")


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    file: str
    line: int | None


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        what = f"key {self.key!r}: " if self.key else ""
        return f"{where}: {what}{self.message}"


class ConfigError(Exception):
    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- reading files ---------------------------------------------------------


# A config or template is a small text file; anything bigger is a mistake or
# an attack (a 100k-line file froze the emperor's loop for most of a second).
MAX_CONFIG_BYTES = 1 << 20
# ...and so is one with more entries than this (5000 parse in ~25 ms).
MAX_CONFIG_ENTRIES = 5000
# Placeholders may not make a value, or the whole config, grow past these.
MAX_EXPANDED_VALUE = 64 * 1024
MAX_EXPANDED_TOTAL = 2 * MAX_CONFIG_BYTES
# ...nor chain %(a) -> %(b) -> ... deeper than this (each level recurses).
MAX_PLACEHOLDER_DEPTH = 32


class ConfigUnavailable(ConfigError):
    """The file could not be read for lack of a resource (fds, memory): not
    the file's fault, so the reader tries again later."""


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def tenant_may_read(st: os.stat_result, owner: int) -> bool:
    """Tyrant mode: a tenant includes its own files, or the operator's shared
    templates (root's and world-readable), never another tenant's."""
    return st.st_uid == owner or (st.st_uid == 0 and bool(st.st_mode & stat.S_IROTH))


def _read_text(path: str, owner: tuple[int, int] | None = None, template: bool = False) -> str:
    """The text of a regular file of at most MAX_CONFIG_BYTES. It is looked at
    before it is opened (a FIFO would block the reader, a device may act on
    open), opened non-blocking, and checked again on the open fd. With
    ``owner`` (tyrant mode) the file is read as that user, so the kernel
    judges the path as the tenant would; a ``template`` must moreover be the
    owner's own, or one of root's world-readable shared ones."""

    def problem(message: str) -> ConfigError:
        return ConfigError([Problem(path, None, None, message)])

    with acting_as(owner):
        return _read_checked(path, owner[0] if owner and template else None, problem)


def _read_checked(path: str, owner: int | None, problem: Callable[[str], ConfigError]) -> str:
    try:
        # Opened by its resolved name: a /proc magic link (/proc/self/fd/2
        # is the emperor's own log, whatever our effective ids) resolves to
        # a real path whose every dir is then traversed as the reader.
        real = os.path.realpath(path)
        if real.split("/")[1] in ("proc", "sys"):
            raise problem(f"resolves to {real}, not a config file")
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise problem(f"is {_file_kind(st.st_mode)}, not a config file")
        if owner is not None and not tenant_may_read(st, owner):
            raise problem(f"tyrant mode: owned by uid {st.st_uid}, not by the vassal's owner (uid {owner}) nor a "
                          "world-readable template of root's: refusing to read it")
        if st.st_size > MAX_CONFIG_BYTES:
            raise problem(f"too large ({st.st_size} bytes; a config may have at most {MAX_CONFIG_BYTES})")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(opened.st_mode):
                raise problem("replaced while being read")
            chunks = []
            size = 0
            while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise problem("file not found") from None
    except PermissionError:
        raise problem("permission denied") from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN):
            raise ConfigUnavailable([Problem(path, None, None, f"cannot read now: {exc.strerror}")]) from None
        raise problem(f"cannot read: {exc.strerror}") from None
    data = b"".join(chunks)
    if len(data) > MAX_CONFIG_BYTES:
        raise problem(f"too large (over {MAX_CONFIG_BYTES} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [Problem(path, line, None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})")]
        ) from None


def read_ini(path: str, text: str, sections: Sequence[str] = INI_SECTIONS) -> list[Entry]:
    """uWSGI's INI: repeated keys kept in order, ``;``/``#`` comments, no
    interpolation, a bare key meaning ``true``; only the given sections."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    section: str | None = None
    seen_section = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                problems.append(Problem(path, number, None, f"malformed section header {line!r}"))
                section = None
                continue
            section = line[1:-1].strip()
            if section in sections:
                seen_section = True
            continue
        if section is None:
            problems.append(Problem(path, number, None, "option outside of any section (expected [uwsgi] or [vassal] first)"))
            continue
        if section not in sections:
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key:
            problems.append(Problem(path, number, None, f"missing key in {line!r}"))
            continue
        entries.append(Entry(key, value.strip() if sep else "true", path, number))
        if len(entries) > MAX_CONFIG_ENTRIES:
            raise ConfigError([Problem(path, number, None, f"too many entries (at most {MAX_CONFIG_ENTRIES})")])
    if not seen_section and not problems:
        wanted = " or ".join(f"[{s}]" for s in sections)
        problems.append(Problem(path, None, None, f"no {wanted} section"))
    if problems:
        raise ConfigError(problems)
    return entries


_TOML_KEY_RE = re.compile(r"""^\s*("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")


def _toml_lines(text: str, table: str) -> dict[str, int]:
    """Best-effort line of each key inside ``[table]`` (tomllib keeps no
    positions), in one pass: a lookup per key made big files quadratic."""
    lines: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_table = stripped.strip("[] ") == table
            continue
        if in_table and (match := _TOML_KEY_RE.match(line)):
            key = match.group(1)
            if key[0] in "\"'":
                key = key[1:-1]
            lines.setdefault(key, number)
    return lines


def _toml_scalar(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def read_toml(path: str, text: str, tables: Sequence[str] = ("vassal",)) -> list[Entry]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError([Problem(path, int(match.group(1)) if match else None, None, f"TOML syntax error: {exc}")]) from None
    except RecursionError:
        raise ConfigError([Problem(path, None, None, "TOML nested too deeply")]) from None
    table_name = next((t for t in tables if t in doc), None)
    if table_name is None:
        wanted = " or ".join(f"[{t}]" for t in tables)
        raise ConfigError([Problem(path, None, None, f"no {wanted} table")])
    table = doc[table_name]
    entries: list[Entry] = []
    problems: list[Problem] = []
    lines = _toml_lines(text, table_name)
    for key, value in table.items():
        line = lines.get(key)
        values = value if isinstance(value, list) else [value]
        if len(entries) + len(values) > MAX_CONFIG_ENTRIES:
            raise ConfigError([Problem(path, line, key, f"too many entries (at most {MAX_CONFIG_ENTRIES})")])
        for item in values:
            scalar = _toml_scalar(item)
            if scalar is None:
                problems.append(Problem(path, line, key, f"expected a string, number or boolean (or a list of them), got {type(item).__name__}"))
                continue
            entries.append(Entry(key, scalar, path, line))
    if problems:
        raise ConfigError(problems)
    return entries


def read_entries(path: str, kind: str | None = None, emperor: bool = False, owner: tuple[int, int] | None = None,
                 template: bool = False) -> list[Entry]:
    """Entries of one file; ``kind`` is ``ini`` or ``toml`` (else by extension);
    ``owner`` (tyrant mode): read as that user (see _read_text)."""
    if kind is None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in VALID_EXTENSIONS:
            raise ConfigError([Problem(path, None, None, f"unknown config type {ext or '(none)'!r}: use .ini or .toml")])
        kind = ext[1:]
    text = _read_text(path, owner, template)
    if text.count("\n") > 4 * MAX_CONFIG_ENTRIES:
        raise ConfigError([Problem(path, None, None, f"too many lines (at most {4 * MAX_CONFIG_ENTRIES})")])
    if kind == "toml":
        entries = read_toml(path, text, ("emperor", "uwsgi") if emperor else ("vassal", "uwsgi"))
    else:
        entries = read_ini(path, text, ("uwsgi", "emperor") if emperor else INI_SECTIONS)
    if len(entries) > MAX_CONFIG_ENTRIES:
        raise ConfigError([Problem(path, None, None, f"too many entries ({len(entries)}; at most {MAX_CONFIG_ENTRIES})")])
    return entries


# --- placeholders ------------------------------------------------------------

# Placeholders every config has unless it defines them itself (ours, not
# uWSGI's): where pyemperor runs from, for a jail that must bind it in.
BUILTIN_PLACEHOLDERS = {"pyemperor-prefix": sys.prefix}

_PLACEHOLDER_RE = re.compile(r"%\(([^)]*)\)|%(.)|\$\(([^)]*)\)")


@dataclass
class _Expander:
    magic: dict[str, str]
    entries: list[Entry]
    env: dict[str, str]
    cache: dict[str, str] = field(default_factory=dict)
    total: int = 0

    def named(self, name: str) -> Entry | None:
        # The last definition wins: the vassal's own value comes after a template's.
        for entry in reversed(self.entries):
            if entry.key == name:
                return entry
            if entry.key in ("set-placeholder", "set-ph"):
                key, sep, _ = entry.value.partition("=")
                if sep and key.strip() == name:
                    return Entry(name, entry.value.partition("=")[2], entry.file, entry.line)
        return None

    def expand(self, entry: Entry, stack: tuple[str, ...] = (), root: Entry | None = None) -> str:
        # Errors name the option being read (root), wherever the chain leads.
        root = root or entry
        size = len(entry.value)

        def sub(match: re.Match[str]) -> str:
            nonlocal size
            ref, magic, var = match.group(1), match.group(2), match.group(3)
            if var is not None:
                piece = self.env.get(var, match.group(0))
            elif magic is not None:
                piece = "%" if magic == "%" else self.magic.get(magic, match.group(0))
            else:
                piece = self.resolve(ref, root, stack)
            # %(a)%(a) doubling at every level is a memory bomb: bound every
            # value, and the whole config, before anything is concatenated.
            size += len(piece)
            if size > MAX_EXPANDED_VALUE:
                raise ConfigError([Problem(root.file, root.line, root.key, f"expands to more than {MAX_EXPANDED_VALUE} characters")])
            return piece

        value = _PLACEHOLDER_RE.sub(sub, entry.value)
        self.total += len(value)
        if self.total > MAX_EXPANDED_TOTAL:
            raise ConfigError([Problem(root.file, root.line, root.key, f"the config expands to more than {MAX_EXPANDED_TOTAL} characters in all")])
        return value

    def resolve(self, name: str, origin: Entry, stack: tuple[str, ...]) -> str:
        if name in self.magic and len(name) == 1:
            return self.magic[name]
        if name in stack:
            chain = " -> ".join((*stack, name))
            raise ConfigError([Problem(origin.file, origin.line, origin.key, f"placeholder loop: {chain}")])
        if len(stack) >= MAX_PLACEHOLDER_DEPTH:
            raise ConfigError([Problem(origin.file, origin.line, origin.key,
                                       f"placeholders nested more than {MAX_PLACEHOLDER_DEPTH} deep (%({stack[0]}) -> ...)")])
        if name in self.cache:
            return self.cache[name]
        target = self.named(name)
        if target is None and name in BUILTIN_PLACEHOLDERS:
            return BUILTIN_PLACEHOLDERS[name]
        if target is None:
            raise ConfigError([Problem(origin.file, origin.line, origin.key, f"undefined placeholder %({name})")])
        value = self.expand(target, (*stack, name), origin)
        self.cache[name] = value
        return value


def magic_vars(path: str) -> dict[str, str]:
    full = os.path.abspath(path)
    directory = os.path.dirname(full)
    base = os.path.basename(full)
    stem, ext = os.path.splitext(base)
    return {
        "n": stem,
        "s": base,
        "p": full,
        "d": directory + "/",
        "e": ext.lstrip("."),
        "c": os.path.basename(directory),
    }


def _expand_magic(text: str, magic: dict[str, str], env: dict[str, str]) -> str:
    """Only the file-derived placeholders and the environment (a template
    path cannot use %(key))."""

    def sub(match: re.Match[str]) -> str:
        if match.group(2) is not None:
            return "%" if match.group(2) == "%" else magic.get(match.group(2), match.group(0))
        if match.group(3) is not None:
            return env.get(match.group(3), match.group(0))
        return match.group(0)

    return _PLACEHOLDER_RE.sub(sub, text)


# --- the validated config ------------------------------------------------------


@dataclass
class Config:
    path: str
    scope: str
    values: dict[str, list[object]] = field(default_factory=dict)
    sources: dict[str, list[Entry]] = field(default_factory=dict)
    raw: list[Entry] = field(default_factory=list)
    # Every validated value in file order (hooks of one phase run in this order).
    items: list[tuple[str, object, Entry]] = field(default_factory=list)
    # The same, each as its text after placeholder expansion: what a vassal is
    # handed, so that it runs exactly what was validated (see to_json).
    expanded: list[Entry] = field(default_factory=list)
    # Tyrant mode: the (uid, gid) that owns the file, which this config was
    # validated for and runs as.
    owner: tuple[int, int] | None = None

    def get(self, key: str, default: object = None) -> object:
        found = self.values.get(key)
        if found:
            return found[-1]
        opt = options.get(key)
        if opt is not None and opt.default is not None and default is None:
            return opt.default
        return default

    # Typed reads: the value as its option parsed it, or the default when
    # the key is unset; a key read as a type its option does not parse to
    # is a bug here, not a config error (TypeError).
    def _typed(self, key: str, kinds: tuple[type, ...], what: str) -> object:
        value = self.get(key)
        # (bool is an int to isinstance, never to us)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"option {key} holds {type(value).__name__}, not {what}")
        return value

    def get_opt_int(self, key: str) -> int | None:
        value = self._typed(key, (int,), "an integer")
        return value if isinstance(value, int) else None

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.get_opt_int(key)
        return default if value is None else value

    def get_opt_float(self, key: str) -> float | None:
        value = self._typed(key, (int, float), "a number")
        return float(value) if isinstance(value, (int, float)) else None

    def get_float(self, key: str, default: float = 0.0) -> float:
        value = self.get_opt_float(key)
        return default if value is None else value

    def get_opt_str(self, key: str) -> str | None:
        value = self._typed(key, (str,), "a string")
        return value if isinstance(value, str) else None

    def get_str(self, key: str, default: str = "") -> str:
        value = self.get_opt_str(key)
        return default if value is None else value

    def get_words(self, key: str) -> tuple[str, ...]:
        value = self._typed(key, (tuple,), "words")
        return tuple(str(w) for w in value) if isinstance(value, tuple) else ()

    def get_bool(self, key: str) -> bool:
        return bool(self._typed(key, (bool,), "a boolean"))

    def getlist(self, key: str) -> list:
        return list(self.values.get(key, ()))

    def has(self, key: str) -> bool:
        return bool(self.values.get(key))

    def fingerprint(self, keys: Iterable[str]) -> tuple:
        """A comparable snapshot of the given keys (to tell reload from restart)."""
        return tuple((k, tuple(map(repr, self.values.get(k, ())))) for k in sorted(keys))

    def jail_fingerprint(self) -> tuple:
        return self.fingerprint(o.name for o in options.all_options() if o.jail)

    def to_json(self) -> bytes:
        """The validated config, expanded: the emperor parses a file once, in
        one environment, and hands this to the vassal (DESIGN 3, tyrant mode),
        which rebuilds it with :func:`from_json` without reading any file."""
        files = list(dict.fromkeys(e.file for e in self.expanded))
        index = {name: number for number, name in enumerate(files)}
        return json.dumps({"path": self.path, "scope": self.scope, "files": files,
                           "entries": [[e.key, e.value, index[e.file], e.line] for e in self.expanded]}).encode()


def unimplemented(config: Config) -> list[Problem]:
    """Keys this version validates but does not act on yet (keys for another
    platform are the jail backend's to refuse: ``jails.unsupported``)."""
    found = []
    for key, entries in config.sources.items():
        opt = options.get(key)
        if opt is not None and not opt.implemented:
            entry = entries[0]
            found.append(Problem(entry.file, entry.line, key, "not implemented yet in this version of pyemperor"))
    return found


def _referenced_names(entries: Sequence[Entry]) -> set[str]:
    names: set[str] = set()
    for entry in entries:
        for match in _PLACEHOLDER_RE.finditer(entry.value):
            if match.group(1) is not None:
                names.add(match.group(1))
    return names


def build(
    path: str,
    entries: Sequence[Entry],
    scope: str = options.VASSAL,
    env: dict[str, str] | None = None,
    lenient: bool = False,
    expanded: bool = False,
) -> Config:
    """Expand placeholders and validate ``entries`` (already in precedence order).

    ``lenient`` is for configs that belong to a wrapped program (a real uWSGI):
    keys we do not know are kept raw instead of refused. ``expanded``: the
    entries' values are already expanded (a config handed over by the emperor).
    """
    expander = _Expander(magic_vars(path), list(entries), dict(os.environ if env is None else env))
    referenced = set() if expanded else _referenced_names(entries)
    config = Config(path=path, scope=scope, raw=list(entries))
    problems: list[Problem] = []
    for entry in entries:
        opt: Option | None = options.lookup(entry.key, scope)
        if opt is None:
            if entry.key in referenced or lenient:
                # A custom key used as %(key) is a placeholder definition, as in uWSGI.
                continue
            other = options.get(entry.key)
            hint = f" (it is an {sorted(other.scope)[0]} option)" if other else ""
            if not other and _ROUTING_KEY_RE.match(entry.key):
                hint = f" (not a routing key pyemperor builds; the routing keys are {', '.join(routes.ROUTE_KEYS[:13])} and their final-/error- forms)"
            problems.append(Problem(entry.file, entry.line, entry.key, f"unknown option{hint}"))
            continue
        try:
            text = entry.value if expanded else expander.expand(entry)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        try:
            value = opt.parse(text)
        except options.BadValue as exc:
            problems.append(Problem(entry.file, entry.line, entry.key, str(exc)))
            continue
        name = opt.name
        if opt.multi:
            config.values.setdefault(name, []).append(value)
        else:
            config.values[name] = [value]
        config.sources.setdefault(name, []).append(entry)
        config.items.append((name, value, entry))
        config.expanded.append(Entry(entry.key, text, entry.file, entry.line))
    for chain, rules in route_tables(config).items():
        for entry, message in routes.goto_problems(chain, rules):
            problems.append(Problem(entry.file, entry.line, entry.key, message))
    if problems:
        raise ConfigError(problems)
    return config


_ROUTING_KEY_RE = re.compile(r"^(final-|error-|response-)?route(-|$)")


def route_tables(config: Config) -> dict[str, list[tuple[routes.Rule, Entry]]]:
    """The internal routing chains of ``config``: each chain's rules in the
    order they were written, each with its entry (file and line)."""
    tables: dict[str, list[tuple[routes.Rule, Entry]]] = {}
    for name, value, entry in config.items:
        if isinstance(value, routes.Rule):
            tables.setdefault(routes.chain_of(name), []).append((value, entry))
    return tables


# A handed-over config is at most a full-size file plus its templates, as JSON.
MAX_HANDED_BYTES = 8 * MAX_CONFIG_BYTES


def from_json(data: bytes) -> Config:
    """A config handed over by the emperor (Config.to_json), validated again
    against the option table but never expanded again."""
    if len(data) > MAX_HANDED_BYTES:
        raise ConfigError([Problem("<emperor>", None, None, f"handed config too large ({len(data)} bytes)")])
    try:
        doc = json.loads(data)
        path = str(doc["path"])
        files = [str(f) for f in doc["files"]]
        entries = [Entry(str(k), str(v), files[f], ln if isinstance(ln, int) else None) for k, v, f, ln in doc["entries"]]
        scope = str(doc.get("scope", options.VASSAL))
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise ConfigError([Problem("<emperor>", None, None, f"malformed handed config: {exc}")]) from None
    return build(path, entries, scope=scope, expanded=True)


def from_fd(fd: int) -> Config:
    """The handed config from the sealed memfd the emperor passed (closed
    here), bounded like :func:`from_json`."""
    try:
        chunks = []
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
            if offset > MAX_HANDED_BYTES:
                break
    except OSError as exc:
        raise ConfigError([Problem("<emperor>", None, None, f"cannot read the handed config: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    return from_json(b"".join(chunks))


def read_with_templates(
    path: str,
    *,
    kind: str | None = None,
    inherit: Sequence[str] = (),
    scope: str = options.VASSAL,
    env: dict[str, str] | None = None,
    owner: tuple[int, int] | None = None,
) -> list[Entry]:
    """The entries of ``inherit`` templates, then of the file's own
    ``vassals-inherit`` templates, then of the file itself. ``owner`` (tyrant
    mode): the file and its own templates are read as that user, and the
    templates must be files that user may include."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    own: list[Entry] = []
    try:
        own = read_entries(path, kind, emperor=scope == options.EMPEROR, owner=owner)
    except ConfigUnavailable:
        raise
    except ConfigError as exc:
        problems.extend(exc.problems)
    magic = magic_vars(path)
    environ = dict(os.environ if env is None else env)
    own_templates = [
        os.path.join(os.path.dirname(os.path.abspath(path)), _expand_magic(e.value, magic, environ))
        for e in own
        if e.key == "vassals-inherit" and scope == options.VASSAL
    ]
    for template, trusted in [(t, True) for t in inherit] + [(t, False) for t in own_templates]:
        try:
            found = read_entries(template, emperor=False, owner=None if trusted else owner, template=True)
            entries.extend(e for e in found if e.key != "vassals-inherit")
        except ConfigUnavailable:
            raise
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    entries.extend(own)
    return entries


def load(
    path: str,
    *,
    kind: str | None = None,
    inherit: Sequence[str] = (),
    overrides: Sequence[tuple[str, str]] = (),
    scope: str = options.VASSAL,
    env: dict[str, str] | None = None,
    lenient: bool = False,
    owner: tuple[int, int] | None = None,
) -> Config:
    """Read a config with its templates and ``--set`` overrides, then validate it.

    Templates come first so that the file's own single-valued keys win and its
    repeated keys follow the inherited ones. Overrides (``--set``,
    ``vassal-set``) come last: they are the operator's word.
    """
    entries = read_with_templates(path, kind=kind, inherit=inherit, scope=scope, env=env, owner=owner)
    return build(path, entries + overrides_entries(overrides), scope=scope, env=env, lenient=lenient)


def overrides_entries(overrides: Sequence[tuple[str, str]]) -> list[Entry]:
    return [Entry(key, value, "--set", None) for key, value in overrides]
