"""uWSGI's internal routing: the rule grammar and the table checks.

Each ``route*`` key is one rule of a chain (the request chain, or with a
``final-`` / ``error-`` prefix the final and error ones), in file order.
A rule is a subject and a regexp (``route``, ``route-host``...), a
condition (``route-if``, ``route-if-not``), a status (``route-status``,
for the error chain), a bare action (``route-run``) or a label
(``route-label``); the action is ``NAME:ARGS``, the colon required as in
uWSGI. This module parses and checks rules and tables, and prints a table
as uWSGI's startup log does; running them is ``vassal.routing``'s.

What uWSGI has and we do not build (the response chain, some actions and
conditions) is refused by name, never mistaken for an unknown key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHAINS = {"": "request", "final-": "final", "error-": "error"}

# The subject of each regexp key: the CGI variable it matches, and the name
# uWSGI's table dump gives it.
SUBJECTS = {
    "route": ("PATH_INFO", "path_info"),
    "route-host": ("HTTP_HOST", "http_host"),
    "route-uri": ("REQUEST_URI", "request_uri"),
    "route-qs": ("QUERY_STRING", "query_string"),
    "route-remote-addr": ("REMOTE_ADDR", "remote_addr"),
    "route-user-agent": ("HTTP_USER_AGENT", "user_agent"),
    "route-referer": ("HTTP_REFERER", "referer"),
    "route-remote-user": ("REMOTE_USER", "remote_user"),
}
OTHER_KINDS = ("route-if", "route-if-not", "route-status", "route-run", "route-label")
ROUTE_KEYS = tuple(prefix + key for prefix in CHAINS for key in (*SUBJECTS, *OTHER_KINDS))

# Actions: name -> what ARGS must be ("" none, "any", "status", "kv",
# "header", "auth", "text" non-empty).
ACTIONS: dict[str, str] = {
    "continue": "", "last": "",
    "break": "status?", "return": "status", "break-with-status": "status",
    "log": "any", "donotlog": "",
    "goto": "text",
    "addvar": "kv",
    "addheader": "header", "delheader": "text", "remheader": "text",
    "setpathinfo": "any", "setscriptname": "any", "setmethod": "text", "seturi": "text",
    "setremoteaddr": "text", "setdocroot": "any", "setuser": "any",
    "rewrite": "text", "rewrite-last": "text",
    "redirect": "text", "redirect-302": "text", "redirect-301": "text", "redirect-permanent": "text",
    "basicauth": "auth", "basicauth-next": "auth",
    "static": "text",
}

# uWSGI 2.0's other actions and conditions: refused by name.
UWSGI_ACTIONS_NOT_BUILT = frozenset((
    "donotoffload", "logvar", "clearheaders", "resetheaders", "disableheaders", "signal", "send", "send-crnl",
    "chdir", "setapp", "sethome", "setfile", "fixpathinfo", "setscheme", "setprocname", "alarm",
    "setmodifier1", "setmodifier2", "+", "-", "*", "/", "flush", "fixcl", "forcecl", "harakiri",
    "static-next", "file", "file-next", "sendfile", "sendfile-next", "fastfile", "fastfile-next",
    "cache", "cachestore", "cacheset", "cachevar", "cacheinc", "cachedec", "cachemul", "cachediv",
    "uwsgi", "http", "proxyhttp", "proxyuwsgi", "xsendfile", "x-sendfile", "gzip", "chunked", "spool",
    "rpc", "rpcret", "rpcnext", "rpcraw", "rpcvar", "rpcblob", "memcached", "memcachedstore", "redis",
    "redisstore", "offload", "template", "toupper", "tofile", "upper", "cgi", "access", "ldapauth",
    "radius", "xattr", "geoip", "ssi", "stats", "metricinc", "metricdec", "metricmul", "metricdiv",
    "metricset", "serve_static", "websocket",
))
CONDITIONS = {
    "equal": "pair", "isequal": "pair", "eq": "pair", "==": "pair",
    "startswith": "pair", "endswith": "pair", "contains": "pair", "contain": "pair",
    "regexp": "regexp", "re": "regexp",
    "exists": "one", "isfile": "one", "isdir": "one", "empty": "one",
}
UWSGI_CONDITIONS_NOT_BUILT = frozenset((
    "islink", "isexec", "ishigher", ">", "islower", "<", "ishigherequal", ">=", "islowerequal", "<=",
    "ipv4in", "ipv6in", "lord",
))
# ${NAME[ARG]} in a template: the bracketed variables we have.
# Headers that frame the answer: the server's, never a rule's to add.
FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding"))
HTTPTIME_ARG = re.compile(r"-?\d{1,12}")
ROUTE_VARS = ("qs", "cookie", "mime", "uwsgi", "time", "httptime", "base64", "hex")
UWSGI_VARS = ("wid", "pid", "uuid", "status", "rtime", "rsize", "sor", "lq")


class RouteError(ValueError):
    """A rule that cannot be built; the message says what and why."""


@dataclass(frozen=True)
class Rule:
    """One parsed rule, before its place in a table is known."""

    kind: str            # "regexp", "if", "if-not", "status", "run" or "label"
    text: str            # the value as written
    subject: str = ""    # CGI variable (regexp), condition arguments (if), status (status)
    dump_subject: str = ""
    pattern: str = ""    # the regexp, the condition's name, the label
    action: str = ""
    arg: str = ""
    status: int = 0

    def dump(self, pos: int) -> str:
        """The line uWSGI's startup log gives this rule."""
        if self.kind == "label":
            return f"[rule: {pos}] label: {self.pattern}"
        command = f"{self.action}:{self.arg}"
        if self.kind == "run":
            return f"[rule: {pos}] action: {command}"
        func = "regexp" if self.kind == "regexp" else "func"
        negate = "!" if self.kind == "if-not" else ""
        return f"[rule: {pos}] subject: {self.dump_subject} {func}: {negate}{self.pattern} action: {command}"


_TEMPLATE_VAR = re.compile(r"\$\{([^}]*)\}")


def check_template(text: str) -> None:
    """``${NAME[ARG]}`` must name a variable we have (a plain ``${VAR}`` is
    any CGI variable)."""
    for match in _TEMPLATE_VAR.finditer(text):
        key = match.group(1)
        name, bracket, rest = key.partition("[")
        if bracket and rest.endswith("]"):
            if name not in ROUTE_VARS:
                raise RouteError(f"unknown routing variable ${{{key}}} (known: {', '.join(ROUTE_VARS)} as NAME[...])")
            if name == "httptime" and not HTTPTIME_ARG.fullmatch(rest[:-1]):
                raise RouteError(f"${{httptime[N]}} needs N seconds from now (an integer of up to 12 digits), got {rest[:-1]!r}")
            if name == "uwsgi" and rest[:-1] not in UWSGI_VARS:
                raise RouteError(f"unknown ${{uwsgi[...]}} field {rest[:-1]!r} (known: {', '.join(UWSGI_VARS)})")


_STATUS_RE = re.compile(r"([1-5]\d\d)(?: \S.*)?")


def _status(text: str, what: str, answer: bool = True) -> int:
    """The code of ``NNN`` or ``NNN Reason``; ``answer``: it is the final
    answer's, so not an interim 1xx (a client would wait for another)."""
    match = _STATUS_RE.fullmatch(text.strip())
    if not match:
        raise RouteError(f"{what} needs an HTTP status like 404 or '404 Not Found', got {text!r}")
    code = int(match.group(1))
    if answer and code < 200:
        raise RouteError(f"{what} cannot answer with an interim status (1xx), got {text!r}")
    return code


# A group holding a quantifier, itself quantified: (a+)*, (\w+-?)+, (x|y*){2,}.
_NESTED = re.compile(r"\((?:[^()\\]|\\.)*[*+}](?:[^()\\]|\\.)*\)[*+{]")


def nested_quantifier(pattern: str) -> bool:
    """Whether ``pattern`` nests quantifiers, the shape that lets a crafted
    subject take exponential time in a backtracking engine (Python's re has
    no match limit, where PCRE gives up)."""
    return bool(_NESTED.search(pattern))


def _lookup(kind: str, text: str, known: dict[str, str], not_built: frozenset[str], hint: str) -> tuple[str, str, str]:
    """NAME:ARGS of an action or condition: (name, args, its form in ``known``)."""
    name, colon, arg = text.partition(":")
    if not colon:
        raise RouteError(f"expected {kind.upper()}:ARGS, got {text!r}{hint}")
    if name in not_built:
        raise RouteError(f"the routing {kind} {name!r} is a uWSGI {kind} pyemperor does not build")
    form = known.get(name)
    if form is None:
        raise RouteError(f"unknown routing {kind} {name!r} (known: {', '.join(sorted(known))})")
    return name, arg, form


def parse_action(command: str) -> tuple[str, str]:
    name, arg, spec = _lookup("action", command, ACTIONS, UWSGI_ACTIONS_NOT_BUILT,
                              f" (uWSGI needs the colon even without arguments: '{command.partition(':')[0]}:')")
    if spec == "" and arg.strip():
        raise RouteError(f"the routing action {name!r} takes no arguments, got {arg!r}")
    if spec == "text" and not arg.strip():
        raise RouteError(f"the routing action {name!r} needs an argument")
    if spec == "status" or (spec == "status?" and arg):
        _status(arg, f"the routing action {name!r}")
    if spec == "kv" and ("=" not in arg or not arg.partition("=")[0]):
        raise RouteError(f"the routing action {name!r} needs KEY=VALUE, got {arg!r}")
    if spec == "header":
        header, sep, _ = arg.partition(":")
        if not sep or not header.strip() or any(c in header for c in " \t\r\n"):
            raise RouteError(f"the routing action {name!r} needs 'Name: value', got {arg!r}")
        if header.strip().lower() in FRAMING_HEADERS:
            raise RouteError(f"{header.strip()} frames the answer: the server sets it, not an {name!r} rule")
    if spec == "auth":
        realm, comma, creds = arg.partition(",")
        if not comma or not creds:
            raise RouteError(f"the routing action {name!r} needs REALM,USER:PASSWORD or REALM,HTPASSWD_FILE, got {arg!r}")
        if '"' in realm:
            raise RouteError(f"the realm of {name!r} cannot hold a double quote: {realm!r}")
    if any(c in arg for c in "\r\n\0"):
        raise RouteError(f"the routing action {name!r} has a control character in {arg!r}")
    check_template(arg)
    return name, arg


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RouteError(f"bad regexp {pattern!r} in {what}: {exc}") from None


def parse_rule(key: str, text: str) -> Rule:
    """One ``route*`` value of the key ``key`` (any chain prefix)."""
    base = key
    for prefix in CHAINS:
        if prefix and key.startswith(prefix):
            base = key[len(prefix):]
    if base == "route-label":
        label = text.strip()
        if not label or " " in label:
            raise RouteError(f"a label is one word, got {text!r}")
        return Rule("label", text, pattern=label)
    if base == "route-run":
        action, arg = parse_action(text.strip())
        return Rule("run", text, action=action, arg=arg)
    head, space, command = text.strip().partition(" ")
    command = command.strip()
    if not space or not command:
        raise RouteError(f"expected '{'CONDITION:ARGS' if base.startswith('route-if') else 'SUBJECT'} ACTION:ARGS', got {text!r}")
    action, arg = parse_action(command)
    if base in ("route-if", "route-if-not"):
        name, args, form = _lookup("condition", head, CONDITIONS, UWSGI_CONDITIONS_NOT_BUILT, " before the action")
        if form in ("pair", "regexp") and ";" not in args:
            raise RouteError(f"the condition {name!r} needs two values split by ';', got {args!r}")
        subject = args.partition(";")[0] if form == "regexp" else args
        check_template(subject)
        if form == "regexp":
            _compile(args.partition(";")[2], f"the condition {name!r}")
        return Rule(base[len("route-"):], text, subject=args, dump_subject=args, pattern=name, action=action, arg=arg)
    if base == "route-status":
        code = _status(head, "route-status", answer=False)
        return Rule("status", text, subject=head, dump_subject=head, pattern=head, action=action, arg=arg, status=code)
    variable, dump_name = SUBJECTS[base]
    _compile(head, key)
    return Rule("regexp", text, subject=variable, dump_subject=dump_name, pattern=head, action=action, arg=arg)


def chain_of(key: str) -> str:
    for prefix, chain in CHAINS.items():
        if prefix and key.startswith(prefix):
            return chain
    return "request"


def goto_problems(chain: str, rules: list[tuple[Rule, object]]) -> list[tuple[object, str]]:
    """Within one chain (rules in order, each with where it was written): a
    ``goto`` names a label written after it (or a rule number past it, as
    uWSGI allows); a label is defined once. Returns (where, message)."""
    found = []
    labels: dict[str, int] = {}
    for pos, (rule, where) in enumerate(rules):
        if rule.kind == "label":
            if rule.pattern in labels:
                found.append((where, f"the label {rule.pattern!r} is defined twice in the {chain} chain"))
            labels.setdefault(rule.pattern, pos)
    for pos, (rule, where) in enumerate(rules):
        if rule.action != "goto" or "$" in rule.arg:
            continue
        target = labels.get(rule.arg)
        if target is None and rule.arg.isdigit():
            target = int(rule.arg)
        if target is None:
            found.append((where, f"goto: no label {rule.arg!r} in the {chain} chain"))
        elif target <= pos:
            found.append((where, f"goto:{rule.arg} jumps backwards (goto can only jump forward)"))
    return found


STATUS_TEXT = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    203: "Non-Authoritative Information", 204: "No Content", 205: "Reset Content", 206: "Partial Content",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
    305: "Use Proxy", 307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
    401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 411: "Length Required", 412: "Precondition Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type", 416: "Requested Range Not Satisfiable",
    417: "Expectation Failed", 418: "I'm a teapot", 422: "Unprocessable Entity", 425: "Too Early",
    426: "Upgrade Required", 428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported", 511: "Network Authentication Required",
}


def status_line(text: str) -> str | None:
    """'404' -> '404 Not Found'; a longer status is kept; None for a code
    without a known reason (uWSGI's return answers nothing then)."""
    text = text.strip()
    if len(text) > 4:
        return text
    reason = STATUS_TEXT.get(int(text[:3]))
    return f"{text[:3]} {reason}" if reason else None
