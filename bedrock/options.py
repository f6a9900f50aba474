"""The one declarative table of options.

Every option is a config key (INI/TOML) and a command-line flag. The file
parser, the CLI parser, validation and ``--help`` all read this table, so a
key exists in exactly one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bedrock import routes

VASSAL = "vassal"
EMPEROR = "emperor"

# Hook phases in the order of DESIGN section 3a.
HOOK_PHASES = (
    "pre-jail",
    "post-jail",
    "in-jail",
    "as-root",
    "as-user",
    "pre-app",
    "post-app",
    "as-user-atexit",
)

CLONE_NAMESPACES = ("ipc", "uts", "fs", "mount", "pid", "net", "user", "cgroup")

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n", ""}


class BadValue(ValueError):
    """A value that does not fit its option's type; the message says why."""


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BadValue(f"expected true/false/1/0/yes/no, got {text!r}")


def parse_int(text: str) -> int:
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise BadValue(f"expected an integer, got {text!r}") from None


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_int(text)
        if value < minimum:
            raise BadValue(f"expected {what} integer, got {text!r}")
        return value

    return parse


parse_nonneg_int = _int_at_least(0, "a non-negative")
parse_positive_int = _int_at_least(1, "a positive")


def parse_async_cores(text: str) -> int:
    value = parse_int(text)
    if value < 2:
        raise BadValue(f"gevent needs at least 2 async cores per worker (uWSGI refuses fewer), got {text!r}")
    return value


def parse_mount(text: str) -> str:
    prefix, sep, target = text.partition("=")
    if not sep or not target.strip():
        raise BadValue(f"expected /PREFIX=APP, got {text!r}")
    if prefix and not prefix.startswith("/"):
        raise BadValue(f"the mountpoint {prefix!r} must start with / (or be empty: the root)")
    return f"{prefix.rstrip('/')}={target.strip()}"


def parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise BadValue(f"expected a number, got {text!r}") from None
    if value < 0:
        raise BadValue(f"expected a non-negative number, got {text!r}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    match = _SIZE_RE.match(text)
    if not match:
        raise BadValue(f"expected a size like 512M or 1G or 1048576, got {text!r}")
    return int(float(match.group(1)) * _SIZE_MULT[match.group(2).lower()])


def parse_mode(text: str) -> int:
    try:
        mode = int(text.strip(), 8)
    except ValueError:
        raise BadValue(f"expected an octal mode like 660, got {text!r}") from None
    if not 0 <= mode <= 0o7777:
        raise BadValue(f"mode out of range: {text!r}")
    return mode


def parse_kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BadValue(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_addr(text: str) -> str:
    """A listening address: ``host:port``, ``:port`` or a unix socket path."""
    text = text.strip()
    if not text:
        raise BadValue("empty address")
    if "/" in text or text.startswith("@"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep:
        raise BadValue(f"expected host:port or a unix socket path, got {text!r}")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # ("²" is a digit int() refuses)
        raise BadValue(f"bad port in address {text!r}")
    if host.startswith("[") != host.endswith("]"):
        raise BadValue(f"bad IPv6 host in address {text!r}")
    return text


def parse_clone_list(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in re.split(r"[,\s]+", text) if part.strip())
    for item in items:
        if item not in CLONE_NAMESPACES:
            raise BadValue(
                f"unknown namespace {item!r} (known: {', '.join(CLONE_NAMESPACES)})"
            )
    return items


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise BadValue(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_words(minimum: int, maximum: int | None = None) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        words = tuple(text.split())
        if len(words) < minimum or (maximum is not None and len(words) > maximum):
            want = str(minimum) if maximum == minimum else f"{minimum}..{maximum or 'n'}"
            raise BadValue(f"expected {want} space-separated values, got {text!r}")
        return words

    return parse


def parse_hook(text: str) -> tuple[str, str]:
    action, sep, args = text.partition(":")
    action = action.strip()
    if not sep:
        # uWSGI allows arg-less actions (e.g. "exit"); everything else needs ACTION:ARGS.
        if action in ("exit",):
            return action, ""
        raise BadValue(f"expected ACTION:ARGS, got {text!r}")
    if action not in HOOK_ACTIONS:
        raise BadValue(f"unknown hook action {action!r} (known: {', '.join(HOOK_ACTIONS)})")
    return action, args


HOOK_ACTIONS = (
    "exec",
    "cd",
    "mkdir",
    "putenv",
    "write",
    "unlink",
    "mount",
    "umount",
    "hostname",
    "call",
    "print",
    "exit",
    "wait_for_file",
    "wait_for_socket",
)


RADOS_MOUNT_KEYS = ("mountpoint", "pool", "config", "timeout", "allow_put", "allow_delete", "allow_mkcol")


def parse_rados_mount(text: str) -> dict[str, str]:
    """``mountpoint=/PATH,pool=NAME[,config=FILE][,timeout=S][,allow_put=1]...``"""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in RADOS_MOUNT_KEYS:
            raise BadValue(f"expected KEY=VALUE with KEY one of {', '.join(RADOS_MOUNT_KEYS)}, got {part.strip()!r}")
        if key in fields:
            raise BadValue(f"{key} given twice")
        fields[key] = value.strip()
    for required in ("mountpoint", "pool"):
        if not fields.get(required):
            raise BadValue(f"rados-mount needs {required}=")
    if not fields["mountpoint"].startswith("/"):
        raise BadValue(f"the mountpoint {fields['mountpoint']!r} must start with /")
    if "timeout" in fields:
        parse_float(fields["timeout"])
    for flag in ("allow_put", "allow_delete", "allow_mkcol"):
        if flag in fields:
            parse_bool(fields[flag])
    return fields


SYSLOG_FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
                     "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
                     **{f"local{n}": 16 + n for n in range(8)}}
LOGGERS = ("rsyslog", "syslog", "socket", "file", "journal")


def logger_address(text: str, default_port: int = 514) -> str | tuple[str, int]:
    """A logger's destination: a unix datagram socket path, or ``HOST[:PORT]``
    (``[V6]:PORT``, ``[V6]`` or a bare IPv6 address too) as (host, port),
    checked: ASCII digits for the port, a host name the resolver can encode
    (resolved later, by getaddrinfo, when the logger is made)."""
    text = text.strip()
    if text.startswith("/"):
        return text
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or rest and not rest.startswith(":"):
            raise BadValue(f"bad IPv6 host in address {text!r}")
        port = rest[1:] if rest else str(default_port)
    elif text.count(":") > 1:  # (a bare IPv6 address: no port can follow it)
        host, port = text, str(default_port)
    else:
        host, sep, port = text.partition(":")
        port = port if sep else str(default_port)
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:  # ("²".isdigit() is True)
        raise BadValue(f"bad port in address {text!r}")
    if not host:
        raise BadValue(f"no host in address {text!r}")
    try:
        host.encode("idna")
    except UnicodeError:
        raise BadValue(f"bad host name in address {text!r} (an empty or over-long label)") from None
    return host, int(port)


def parse_logger(text: str) -> tuple[str, str, str]:
    """``[NAME ]KIND[:ARGS]`` -> (name, kind, args), checked. As in uWSGI,
    the part before the first space is a NAME only if it is alphanumeric:
    ``rsyslog:host:514,web01 app`` is a prefix with a space in it."""
    text = text.strip()
    if "\0" in text:
        raise BadValue("a logger value may not hold a NUL byte")
    name, space, rest = text.partition(" ")
    if not (space and name.isascii() and name.isalnum()):
        name, rest = "", text
    kind, _, args = rest.strip().partition(":")
    if kind == "journal" and args.strip():
        raise BadValue(f"the journal logger takes no arguments, got {args!r}")
    if kind not in LOGGERS:
        raise BadValue(f"unknown logger {kind!r} (known: {', '.join(LOGGERS)})")
    if kind in ("rsyslog", "socket", "file") and not args.strip():
        raise BadValue(f"the {kind} logger needs {'a PATH' if kind == 'file' else 'an address'}")
    if kind == "rsyslog":
        target, _, rest = args.partition(",")
        _, _, priority = rest.partition(",")
        digits = priority.strip()
        if priority and (not (digits.isascii() and digits.isdigit()) or not 0 <= int(digits) <= 191):
            raise BadValue(f"rsyslog priority must be 0-191 (facility * 8 + severity), got {priority!r}")
        logger_address(target)
    if kind == "socket":
        logger_address(args.partition(",")[0])  # (uWSGI: socket:ADDR[,PREFIX])
    if kind == "syslog":
        _, _, facility = args.partition(",")
        if facility and facility not in SYSLOG_FACILITIES:
            raise BadValue(f"unknown syslog facility {facility!r} (known: {', '.join(SYSLOG_FACILITIES)})")
    return name, kind, args


def _logger(text: str) -> str:
    parse_logger(text)
    return text.strip()


LOG_ENCODERS = ("prefix", "suffix", "nl", "format", "json", "gzip", "compress")


def _log_encoder(text: str) -> str:
    name = text.strip().partition(" ")[0]
    if name not in LOG_ENCODERS:
        raise BadValue(f"unknown log encoder {name!r} (known: {', '.join(LOG_ENCODERS)})")
    return text.strip() if name not in ("prefix", "suffix") else text.lstrip()


def parse_nonempty(text: str) -> str:
    if not text.strip():
        raise BadValue("empty value")
    return text.strip()


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], object]
    help: str
    scope: frozenset[str] = field(default_factory=lambda: frozenset({VASSAL}))
    multi: bool = False
    default: object = None
    boolean: bool = False
    # A change to this key needs a new jail (restart), not a graceful reload.
    jail: bool = False
    group: str = "app"
    metavar: str = "VALUE"
    aliases: tuple[str, ...] = ()
    # Accepted for uWSGI configs but without effect here (the help says why).
    compat: bool = False
    # Validated by --check, refused at start until its feature lands.
    implemented: bool = True


_OPTIONS: dict[str, Option] = {}


def _opt(name: str, parse: Callable[[str], object], help: str, **kw: object) -> None:
    scope = kw.pop("scope", (VASSAL,))
    opt = Option(name=name, parse=parse, help=help, scope=frozenset(scope), **kw)  # type: ignore[arg-type]
    _OPTIONS[name] = opt


def _bool(name: str, help: str, default: bool = False, **kw: object) -> None:
    _opt(name, parse_bool, help, boolean=True, default=default, metavar="BOOL", **kw)


BOTH = (VASSAL, EMPEROR)
E = (EMPEROR,)

# --- app ---------------------------------------------------------------
_opt("wsgi-file", parse_nonempty, "load a WSGI app from this file", metavar="FILE")
_opt("wsgi", parse_nonempty, "alias of module", metavar="MODULE[:CALLABLE]")
_opt("module", parse_nonempty, "load a WSGI app from pkg.mod:callable", metavar="MODULE[:CALLABLE]")
_opt("callable", parse_nonempty, "name of the WSGI callable", default="application", metavar="NAME")
_opt("rados-mount", parse_rados_mount, "serve a Ceph pool over HTTP under a mountpoint (python3-rados)", multi=True,
     metavar="mountpoint=/PATH,pool=NAME[,config=FILE][,timeout=S][,allow_put=1][,allow_delete=1][,allow_mkcol=1]")
_opt("rados-timeout", parse_float, "seconds a RADOS operation may take (then 504); a mount's timeout= wins", default=30.0,
     metavar="S")
_opt("mount", parse_mount, "load another app at a URL prefix (a file or MODULE[:CALLABLE])", multi=True, metavar="/PREFIX=APP")
_bool("manage-script-name", "pick the mounted app by PATH_INFO's prefix and move it to SCRIPT_NAME")
_opt("chdir", parse_nonempty, "change to this dir before loading the app", metavar="DIR")
_opt("pythonpath", parse_nonempty, "add a dir to sys.path", multi=True, metavar="DIR")
_opt("env", parse_kv, "set an environment variable", multi=True, metavar="KEY=VALUE")
_opt("processes", parse_positive_int, "number of workers", default=1, metavar="N", aliases=("workers", "p"))
_opt("http-socket", parse_addr, "serve HTTP/1.1 on ADDR (host:port or unix path)", multi=True, metavar="ADDR")
_opt("socket", parse_addr, "serve the uwsgi protocol on ADDR", multi=True, metavar="ADDR", aliases=("uwsgi-socket", "s"))
_opt("chmod-socket", parse_mode, "mode of unix sockets", metavar="MODE")
_opt("chown-socket", parse_nonempty, "owner of unix sockets", metavar="USER[:GROUP]")
_bool("lazy-apps", "load the app in each worker instead of once in the master")
_opt("harakiri", parse_nonneg_int, "kill a worker stuck on one request for S seconds", default=0, metavar="S")
_opt("max-requests", parse_nonneg_int, "recycle a worker after N requests", default=0, metavar="N")
_opt("reload-on-rss", parse_nonneg_int, "recycle a worker above MB of RSS", default=0, metavar="MB")
_opt("heartbeat", parse_nonneg_int, "send a heartbeat to the emperor every S seconds", default=0, metavar="S")
_opt("listen", parse_positive_int, "listen queue size", default=1024, metavar="N", aliases=("l",))
_opt("buffer-size", parse_size, "largest request head accepted", default=65536, metavar="BYTES", aliases=("b",))
_opt("limit-post", parse_size, "largest request body accepted (0: no limit)", default=0, metavar="BYTES")
_opt("body-spool-limit", parse_size, "most bytes of request bodies one worker holds before its apps run, over all "
     "its connections (chunked ones, spooled; others up to 1 MiB); a body alone past it: 413, others holding it: 503; "
     "0: no limit", default=1 << 30, metavar="BYTES")
_opt("limit-request-line", parse_positive_int, "longest HTTP request line accepted (longer: 414)", default=8190, metavar="BYTES")
_opt("limit-request-fields", parse_positive_int, "most HTTP header fields in a request (more: 431)", default=100, metavar="N")
_opt("http-head-timeout", parse_positive_int, "seconds from a request head's first byte to its end (then 408)", default=30, metavar="S")
_opt("limit-request-field-size", parse_positive_int, "longest HTTP header field line (longer: 431)", default=8190, metavar="BYTES")
_opt("http-keepalive", parse_nonneg_int, "idle keep-alive timeout in seconds", default=15, metavar="S")
_opt("reload-mercy", parse_nonneg_int, "seconds an old app master may drain on reload", default=60, metavar="S")
_opt("procname", parse_nonempty, "process title prefix", metavar="NAME")
_bool("disable-logging", "no access log line per request (as in uWSGI)")
_bool("memory-report", "add the worker's RSS to every access log line")
_opt("set-placeholder", parse_kv, "define a placeholder usable as %(KEY)", multi=True, metavar="KEY=VALUE", aliases=("set-ph",))
_bool("thunder-lock", "serialize accept among the workers: one at a time waits for and takes a connection (no thundering herd)")
_opt("lock-engine", parse_choice("fcntl", "ipcsem"), "the thunder lock: fcntl (POSIX record lock) or ipcsem (SysV semaphore)",
     default="fcntl", metavar="ENGINE")
_opt("ftok", parse_nonempty, "lock-engine = ipcsem: the semaphore's key from ftok(FILE) (else IPC_PRIVATE)", metavar="FILE")
_bool("persistent-ipcsem", "lock-engine = ipcsem: keep the semaphore at exit (with ftok the next instance takes it over)")
_opt("gevent", parse_async_cores, "serve N connections at once in each worker, in gevent greenlets", metavar="N", group="gevent")
_bool("gevent-monkey-patch", "gevent.monkey.patch_all() in each worker before it serves", group="gevent")
_bool("gevent-early-monkey-patch", "gevent.monkey.patch_all() before the app is imported", group="gevent")
_bool("gevent-wait-for-hub", "at shutdown a worker waits for every greenlet (not just its requests), up to worker-reload-mercy", group="gevent")
_opt("worker-reload-mercy", parse_nonneg_int, "seconds a worker may take to stop before the master kills it", default=60, metavar="S")
_opt("rpc-max", parse_positive_int, "most RPC functions a process may register (uwsgi.register_rpc)", default=64, metavar="N")
_opt("signal-bufsize", parse_nonneg_int, "socket buffer of the uwsgi signal queues, per worker (0: the system's)", default=0, metavar="BYTES")
_opt("socket-timeout", parse_positive_int, "seconds an outgoing uwsgi.rpc / remote uwsgi.signal may take, and a streamed request body may stall", default=4, metavar="S")
_bool("skip-atexit", "a worker that exits does not run uwsgi.atexit and the atexit module's functions")
for _name in ("master", "vacuum", "die-on-term", "strict", "enable-threads", "single-interpreter", "need-app"):
    _bool(_name, "accepted for uWSGI configs; pyemperor always behaves this way", compat=True)

# --- internal routing (uWSGI's route* keys) ----------------------------------


def _route_parser(key: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return routes.parse_rule(key, text)
        except routes.RouteError as exc:
            raise BadValue(str(exc)) from None

    return parse


def _not_built(what: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        raise BadValue(f"{what} is a uWSGI routing feature pyemperor does not build")

    return parse


_ROUTE_HELP = {
    "route-if": "CONDITION:ARGS ACTION:ARGS", "route-if-not": "CONDITION:ARGS ACTION:ARGS",
    "route-status": "STATUS ACTION:ARGS", "route-run": "ACTION:ARGS", "route-label": "LABEL",
}
for _key in routes.ROUTE_KEYS:
    _base = _key.split("-", 1)[1] if _key.startswith(("final-", "error-")) else _key
    _opt(_key, _route_parser(_key), f"a rule of the {routes.chain_of(_key)} routing chain", multi=True,
         metavar=_ROUTE_HELP.get(_base, "REGEXP ACTION:ARGS"), group="routing")
    _opt("response-" + _key, _not_built("the response chain (response-route*)"), "not built: uWSGI's response routing chain",
         multi=True, group="routing")

# --- cheaper (validated now, implemented by the app server issue) -------
_opt("cheaper", parse_nonneg_int, "minimum number of workers", metavar="N", group="cheaper")
_opt("cheaper-initial", parse_positive_int, "workers started at first", metavar="N", group="cheaper")
_opt("cheaper-step", parse_positive_int, "workers added at a time", metavar="N", group="cheaper")
_opt("cheaper-rss-limit-soft", parse_size, "no new worker at or above this total RSS", metavar="BYTES", group="cheaper")
_opt("cheaper-rss-limit-hard", parse_size, "remove a worker above this total RSS", metavar="BYTES", group="cheaper")

# --- daemons --------------------------------------------------------------
_opt("attach-daemon", parse_nonempty, "run CMD beside the app, restarted if it dies", multi=True, metavar="CMD", group="daemons")
_opt("smart-attach-daemon", parse_words(2), "run a daemonizing CMD tracked by PIDFILE", multi=True, metavar="PIDFILE CMD", group="daemons")

# --- isolation --------------------------------------------------------------
_opt("unshare", parse_clone_list, "namespaces to unshare", metavar="LIST", jail=True, group="isolation")
_opt("pivot-root", parse_words(2, 2), "pivot_root into NEW, old root at OLD", metavar="NEW OLD", jail=True, group="isolation")
_opt("chroot", parse_nonempty, "chroot into DIR", metavar="DIR", jail=True, group="isolation")
_opt("uid", parse_nonempty, "run as this user", metavar="USER", jail=True, group="isolation")
_opt("gid", parse_nonempty, "run as this group", metavar="GROUP", jail=True, group="isolation")
_opt("hostname", parse_nonempty, "hostname in the uts namespace", metavar="NAME", jail=True, group="isolation")
_opt("memory-limit", parse_size, "memory limit of the vassal's cgroup", metavar="SIZE", jail=True, group="isolation")
_opt("pids-limit", parse_positive_int, "process/thread limit of the vassal's cgroup", metavar="N", jail=True, group="isolation")
_opt("cpu-limit", parse_float, "CPU limit in cores", metavar="CORES", jail=True, group="isolation")
_opt("uid-map", parse_nonempty, "user namespace uid map", metavar="INSIDE OUTSIDE COUNT", jail=True, group="isolation")
_opt("gid-map", parse_nonempty, "user namespace gid map", metavar="INSIDE OUTSIDE COUNT", jail=True, group="isolation")

# --- FreeBSD ----------------------------------------------------------------
_opt("jail", parse_words(1, 3), "FreeBSD jail ROOTFS [HOSTNAME [NAME]]", metavar="ROOTFS [HOST [NAME]]", jail=True, group="freebsd")
_opt("jail2", parse_nonempty, "extra jail_set parameter", multi=True, metavar="KEY[=VALUE]", jail=True, group="freebsd")
_opt("jail-ip4", parse_nonempty, "jail IPv4 address", multi=True, metavar="ADDR", jail=True, group="freebsd")
_opt("jail-ip6", parse_nonempty, "jail IPv6 address", multi=True, metavar="ADDR", jail=True, group="freebsd")
_opt("jidfile", parse_nonempty, "write the jail id here", metavar="FILE", jail=True, group="freebsd")
_opt("jail-attach", parse_nonempty, "attach to an existing jail", metavar="JID|NAME", jail=True, group="freebsd")

# --- network --------------------------------------------------------------
_opt("tuntap-device", parse_words(1, 2), "tun device bridged to the router", multi=True, metavar="DEV [SOCKET]", jail=True, group="network")
_opt("net-iface", parse_words(2, 2), "bring DEV up with ADDR/PREFIX", multi=True, metavar="DEV ADDR/PREFIX", jail=True, group="network")
_opt("net-mtu", parse_words(2, 2), "set the MTU of DEV (e.g. 65000 on a tuntap-device to a brokered router)", multi=True, metavar="DEV MTU", jail=True, group="network")
_opt("net-route", parse_words(2, 2), "route DEST via GATEWAY", multi=True, metavar="DEST GATEWAY", jail=True, group="network")

# --- hooks ------------------------------------------------------------------
for _phase in HOOK_PHASES:
    _jail = _phase in ("pre-jail", "post-jail", "in-jail", "as-root")
    _opt(f"hook-{_phase}", parse_hook, f"run ACTION:ARGS in phase {_phase}", multi=True, metavar="ACTION:ARGS", jail=_jail, group="hooks")
    _opt(f"exec-{_phase}", parse_nonempty, f"run CMD in phase {_phase}", multi=True, metavar="CMD", jail=_jail, group="hooks")
    _opt(f"mount-{_phase}", parse_words(3, 4), f"mount in phase {_phase}", multi=True, metavar="FS SRC DST [FLAGS]", jail=_jail, group="hooks")
    _opt(f"umount-{_phase}", parse_words(1, 2), f"umount in phase {_phase}", multi=True, metavar="DST [FLAGS]", jail=_jail, group="hooks")
    _opt(f"call-{_phase}", parse_nonempty, f"call a Python function in phase {_phase}", multi=True, metavar="DOTTED.PATH", jail=_jail, group="hooks")

_opt("hook-timeout", parse_float, "seconds an exec hook or a wait_for_* action may take before it is killed and the vassal fails"
     " with reason hook (0: no limit)", default=60.0, metavar="S", scope=BOTH, group="hooks")

# --- logging ------------------------------------------------------------------
_opt("logto", parse_nonempty, "write the log to FILE", metavar="FILE", group="logging", scope=BOTH)
_opt("logger", _logger, "also send each log line (after log-encoder) to rsyslog:HOST[:PORT][,PREFIX[,PRIORITY]], "
     "syslog[:IDENT[,FACILITY]], socket:ADDR[,PREFIX], file:PATH or journal (journald's native protocol, VASSAL= field)", multi=True, metavar="[NAME ]KIND:ARGS", group="logging")
def _packet_size(text: str) -> int:
    # (under 64 a packet is all header: a line would go out a byte per packet)
    value = parse_int(text)
    if not 64 <= value <= 65507:
        raise BadValue(f"expected 64-65507 (the largest UDP payload), got {text!r}")
    return value


_opt("rsyslog-packet-size", _packet_size, "largest rsyslog packet (RFC 3164 says 1024)", default=1024, metavar="BYTES",
     group="logging")
_bool("rsyslog-split-messages", "send a line too long for one rsyslog packet in several (else it is cut)", group="logging")
_opt("log-encoder", lambda text: _log_encoder(text), "encode every log line", multi=True, metavar="ENCODER [ARGS]", group="logging")

# --- emperor ------------------------------------------------------------------
_opt("emperor", parse_nonempty, "vassal dir, dir://DIR or glob://PATTERN", multi=True, metavar="DIR", scope=E, group="emperor")
_opt("emperor-control", parse_nonempty, "control socket path", default="/run/emperor/control.sock", metavar="PATH", scope=E, group="emperor", aliases=("control",))
_opt("emperor-control-mode", parse_mode, "mode of the control socket", default=0o600, metavar="MODE", scope=E, group="emperor")
_opt("emperor-stats", parse_addr, "stats server address (tcp or unix)", metavar="ADDR", scope=E, group="emperor", aliases=("emperor-stats-server",))
_opt("emperor-pidfile", parse_nonempty, "write the emperor's pid here", metavar="FILE", scope=E, group="emperor")
_opt("emperor-use-clone", parse_clone_list, "namespaces for every vassal", metavar="LIST", scope=E, group="emperor")
_bool("emperor-tyrant", "run each vassal as the owner of its file", scope=E, group="emperor")
_bool("emperor-tyrant-nofollow", "judge symlinked configs by the link's owner", scope=E, group="emperor")
_opt("emperor-tyrant-max-vassals", parse_nonneg_int, "tyrant mode: at most N vassals per owner (0: no limit); "
     "a file past the limit is invalid until one of the owner's vassals goes", default=0, metavar="N", scope=E, group="emperor")
_opt("emperor-throttle", parse_nonneg_int, "first respawn delay in ms", default=1000, metavar="MS", scope=E, group="emperor")
_opt("emperor-max-throttle", parse_nonneg_int, "largest respawn delay in ms", default=180000, metavar="MS", scope=E, group="emperor")
_opt("emperor-required-heartbeat", parse_positive_int, "seconds without heartbeat before a vassal is cursed", default=30, metavar="S", scope=E, group="emperor")
_opt("emperor-curse-tolerance", parse_nonneg_int, "seconds between SIGTERM and SIGKILL", default=10, metavar="S", scope=E, group="emperor")
_opt("emperor-freq", parse_positive_int, "scan interval in seconds where inotify is not available", default=3, metavar="S", scope=E, group="emperor")
_opt("emperor-log-lines", parse_positive_int, "log lines kept per vassal", default=2000, metavar="N", scope=E, group="emperor")
_opt("emperor-wrapper", parse_nonempty, "run .ini vassals with this binary", metavar="BINARY", scope=E, group="emperor")
_bool("emperor-zygote", "fork vassals from a pre-imported template process (=false: a fresh interpreter each)", default=True, scope=E, group="emperor")
_bool("emperor-nofollow", "do not follow symlinks when checking mtime", scope=E, group="emperor", compat=True)
_opt("vassals-inherit", parse_nonempty, "template read before every vassal", multi=True, metavar="FILE", scope=BOTH, group="emperor")
_opt("vassal-set", parse_kv, "set KEY=VALUE in every vassal", multi=True, metavar="KEY=VALUE", scope=E, group="emperor")
_opt("vassal-env-pass", parse_nonempty, "pass this emperor environment variable (or fnmatch pattern) to every vassal; "
     "besides it vassals get only PATH, LANG, LANGUAGE, LC_*, TZ, their own env keys and the emperor protocol's variables "
     "(the same environment $(VAR) expands from)", multi=True, metavar="NAME", scope=E, group="emperor")
_opt("tuntap-router", parse_words(2, 3), "run the netrouter", multi=True, metavar="DEV SOCKET [STATS]", scope=E, group="emperor")
_opt("tuntap-router-firewall-in", parse_nonempty, "router → vassal rule", multi=True, metavar="RULE", scope=E, group="emperor")
_opt("tuntap-router-firewall-out", parse_nonempty, "vassal → router rule", multi=True, metavar="RULE", scope=E, group="emperor")
_opt("tuntap-router-tenant-range", parse_words(2, 2), "tyrant mode: net-iface addresses the files of USER may declare (repeatable; once set, a tenant without one may declare none)", multi=True, metavar="USER|UID CIDR", scope=E, group="emperor")
# exec-as-root / hook-as-root are both a vassal phase and an emperor option
# (run by the emperor at start): one key, valid in both scopes.
for _name, _help in (("exec-as-root", "run CMD in phase as-root (in the emperor's config: run by the emperor at start)"),
                     ("hook-as-root", "run ACTION:ARGS in phase as-root (in the emperor's config: run by the emperor at start)")):
    _OPTIONS[_name] = Option(**{**_OPTIONS[_name].__dict__, "scope": frozenset(BOTH), "help": _help})
for _phase in ("as-emperor", "as-vassal"):
    _opt(f"hook-{_phase}", parse_hook, f"run ACTION:ARGS {_phase} for every vassal", multi=True, metavar="ACTION:ARGS", scope=E, group="emperor")
    _opt(f"exec-{_phase}", parse_nonempty, f"run CMD {_phase} for every vassal", multi=True, metavar="CMD", scope=E, group="emperor")


# Keys of the contract whose features are still being built: validated, but a
# vassal or emperor that uses them is refused at start with a clear error
# rather than run without them.
NOT_YET: set[str] = set()
for _name in NOT_YET:
    _opt_obj = _OPTIONS[_name]
    _OPTIONS[_name] = Option(**{**_opt_obj.__dict__, "implemented": False})


def get(name: str) -> Option | None:
    return _OPTIONS.get(name)


def all_options() -> Iterable[Option]:
    return _OPTIONS.values()


def lookup(name: str, scope: str) -> Option | None:
    """The option called ``name`` (or one of its aliases) valid in ``scope``."""
    opt = _OPTIONS.get(name)
    if opt is None:
        opt = _ALIASES.get(name)
    if opt is None or scope not in opt.scope:
        return None
    return opt


# One-letter aliases are command-line flags only (-p 4), as in uWSGI: in a
# file, "b" or "s" are far more likely a user's own placeholder keys.
_ALIASES = {alias: opt for opt in _OPTIONS.values() for alias in opt.aliases if len(alias) > 1}
