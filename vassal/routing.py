"""uWSGI's internal routing, run around the WSGI app.

The request chain runs before the app: a rule whose subject matches (or
whose condition holds) runs its action, which goes on to the next rule,
stops routing and lets the app answer (``continue``/``last``), or answers
itself (``break``, ``return``, ``redirect``, ``basicauth``, ``static``).
The error chain runs each time a status is set (the app's or an
action's), as uWSGI's does, and may replace that answer; the final chain
runs once the answer has gone. ``addheader``/``delheader`` change the
answer's headers, ``donotlog`` drops its access log line.

Templates in actions and conditions expand ``$N`` (the rule's regexp
captures) and ``${VAR}`` (a CGI variable, or ``qs[...]``, ``cookie[...]``
and uWSGI's other bracketed variables) in one pass, so a captured value is
never expanded a second time.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import hashlib
import hmac
import mimetypes
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from urllib.parse import unquote_to_bytes

from bedrock import routes
from bedrock.config import Config, Entry, route_tables
from bedrock.log import log, printable
from vassal.http import DONOTLOG, CloseConnection, FileWrapper

NEXT, CONTINUE, BREAK = 0, 1, 2
TABLE_TITLES = {"request": "internal routing table", "error": "internal error routing table",
                "final": "internal final routing table"}
MAX_HTPASSWD = 1 << 20

HTTPTIME_RANGE = 100 * 365 * 86400  # ${httptime[N]}: N clamped to a century either way
_TOKEN = re.compile(r"\$(\d)|\$\{([^}]*)\}")


class State:
    """One request's routing: what the actions asked of its answer."""

    __slots__ = ("add", "remove", "response", "status", "goto", "in_error")

    def __init__(self) -> None:
        self.add: list[tuple[str, str]] | None = None  # (made on first use: most requests change nothing)
        self.remove: set[str] | None = None
        self.response: tuple[str, list[tuple[str, str]], Iterable[bytes]] | None = None
        self.status = 0
        self.goto = 0
        self.in_error = False

    def answer(self, status: str, headers: list[tuple[str, str]], body: Iterable[bytes]) -> int:
        self.response = (status, headers, body)
        return BREAK


# --- templates ----------------------------------------------------------------


def _qs(env: dict, key: str) -> str:
    for part in env.get("QUERY_STRING", "").split("&"):
        name, _, value = part.partition("=")
        if name == key:
            return value
    return ""


def _cookie(env: dict, key: str) -> str:
    for part in env.get("HTTP_COOKIE", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == key:
            return value
    return ""


def _var(env: dict, key: str) -> str:
    value = env.get(key)
    return value if isinstance(value, str) else ""


def _worker_id() -> str:
    module = sys.modules.get("uwsgi")
    try:
        return str(module.worker_id()) if module is not None else "0"
    except Exception:
        return "0"


def _uwsgi_var(env: dict, state: State, key: str) -> str:
    if key == "wid":
        return _worker_id()
    if key == "pid":
        return str(os.getpid())
    if key == "uuid":
        return str(uuid.uuid4())
    if key == "status":
        return str(state.status)
    return "0"  # rtime, rsize, sor, lq: not tracked per request here


def _bracketed(name: str, arg: str) -> Callable[[dict, State], str]:
    if name == "qs":
        return lambda env, state: _qs(env, arg)
    if name == "cookie":
        return lambda env, state: _cookie(env, arg)
    if name == "mime":
        return lambda env, state: mimetypes.guess_type(_var(env, arg))[0] or ""
    if name == "uwsgi":
        return lambda env, state: _uwsgi_var(env, state, arg)
    if name == "time":
        return lambda env, state: str(int(time.time())) if arg == "unix" else str(time.time_ns() // 1000)
    if name == "httptime":
        offset = max(-HTTPTIME_RANGE, min(HTTPTIME_RANGE, int(arg))) if routes.HTTPTIME_ARG.fullmatch(arg) else 0
        return lambda env, state: email.utils.formatdate(time.time() + offset, usegmt=True)
    if name == "base64":
        return lambda env, state: base64.b64encode(_var(env, arg).encode("latin-1", "replace")).decode()
    return lambda env, state: _var(env, arg).encode("latin-1", "replace").hex()


class Template:
    """An action's or condition's text, split once into literals, captures
    and variables."""

    __slots__ = ("text", "parts", "constant")

    def __init__(self, text: str):
        self.text = text
        self.parts: list[object] = []
        last = 0
        for match in _TOKEN.finditer(text):
            if match.start() > last:
                self.parts.append(text[last:match.start()])
            if match.group(1) is not None:
                self.parts.append(int(match.group(1)))
            else:
                key = match.group(2)
                name, bracket, rest = key.partition("[")
                if bracket and rest.endswith("]") and name in routes.ROUTE_VARS:
                    self.parts.append(_bracketed(name, rest[:-1]))
                else:
                    self.parts.append(("var", key))
            last = match.end()
        if last < len(text):
            self.parts.append(text[last:])
        self.constant = text if all(isinstance(p, str) for p in self.parts) else None

    def render(self, env: dict, state: State, match: re.Match | None) -> str:
        if self.constant is not None:
            return self.constant
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, int):
                if match is None:
                    out.append(f"${part}")  # (no captures here: uWSGI keeps it as written)
                elif part <= (match.re.groups or 0):
                    out.append(match.group(part) or "")
            elif isinstance(part, tuple):
                out.append(_var(env, part[1]))
            else:
                out.append(part(env, state))
        return "".join(out)


# --- conditions -----------------------------------------------------------------


def _condition(name: str, args: str) -> Callable[[dict, State], object]:
    form = routes.CONDITIONS[name]
    if form == "regexp":
        subject, _, pattern = args.partition(";")
        template, search = Template(subject), re.compile(pattern).search
        return lambda env, state: search(template.render(env, state, None))
    if form == "one":
        one = Template(args)
        if name == "empty":
            return lambda env, state: one.render(env, state, None) == ""
        test = {"exists": os.path.exists, "isfile": os.path.isfile, "isdir": os.path.isdir}[name]
        return lambda env, state: test(_as_bytes(one.render(env, state, None)))
    left, _, right = args.partition(";")
    a, b = Template(left), Template(right)
    compare: Callable[[str, str], bool] = {
        "startswith": str.startswith, "endswith": str.endswith,
        "contains": str.__contains__, "contain": str.__contains__,
    }.get(name, str.__eq__)
    return lambda env, state: compare(a.render(env, state, None), b.render(env, state, None))


# --- actions ----------------------------------------------------------------------


def _text_answer(status: str, body: bytes, extra: list[tuple[str, str]] = ()) -> tuple:
    return status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *extra], [body]


class Compiled:
    """One rule of a chain, ready to run."""

    __slots__ = ("rule", "entry", "pos", "test", "run", "arg", "label", "search", "variable")

    def __init__(self, rule: routes.Rule, entry: Entry, pos: int, labels: dict[str, int]):
        self.rule = rule
        self.entry = entry
        self.pos = pos
        self.label = rule.kind == "label"
        self.arg = Template(rule.arg)
        self.test: Callable[[dict, State], object] | None = None
        self.search: Callable[[str], re.Match | None] | None = None
        self.variable = rule.subject
        if rule.kind == "regexp":
            self.search = re.compile(rule.pattern).search  # (run_chain calls it itself: the common rule, kept cheap)
        elif rule.kind in ("if", "if-not"):
            cond = _condition(rule.pattern, rule.subject)
            if rule.kind == "if":
                self.test = cond
            else:
                self.test = lambda env, state: not cond(env, state)
        elif rule.kind == "status":
            code = rule.status
            self.test = lambda env, state: state.status == code
        self.run = _action(self, rule, labels) if not self.label else (lambda env, state, match: NEXT)


def _action(compiled: Compiled, rule: routes.Rule, labels: dict[str, int]) -> Callable[[dict, State, object], int]:
    name, arg = rule.action, compiled.arg

    def render(env: dict, state: State, match: object) -> str:
        return arg.render(env, state, match if isinstance(match, re.Match) else None)

    if name in ("continue", "last"):
        return lambda env, state, match: CONTINUE
    if name == "break":
        if not rule.arg:
            return lambda env, state, match: BREAK
        status = routes.status_line(rule.arg) or rule.arg.strip()
        return lambda env, state, match: state.answer(
            status, [("Connection", "close"), ("Content-Type", "text/plain")], [])
    if name in ("return", "break-with-status"):
        line = routes.status_line(rule.arg)
        if line is None:
            return lambda env, state, match: BREAK
        if line[0] == "1" or line[:3] in ("204", "304"):  # (no body may follow these)
            return lambda env, state, match: state.answer(line, [], [])
        body = line[4:].encode("latin-1", "replace")
        return lambda env, state, match: state.answer(*_text_answer(line, body))
    if name == "log":
        def do_log(env: dict, state: State, match: object) -> int:
            log(printable(_as_bytes(render(env, state, match)).decode("utf-8", "replace")))
            return NEXT
        return do_log
    if name == "donotlog":
        def donotlog(env: dict, state: State, match: object) -> int:
            env[DONOTLOG] = True
            return NEXT
        return donotlog
    if name == "goto":
        def goto(env: dict, state: State, match: object) -> int:
            target_name = render(env, state, match)
            target = labels.get(target_name)
            if target is None:
                target = int(target_name) if target_name.isascii() and target_name.isdigit() and len(target_name) < 10 else 0
            if target <= compiled.pos:
                log(f"[uwsgi-route] ERROR \"goto\" instruction can only jump forward (check your label !!!): {printable(target_name)}")
                return BREAK
            state.goto = target
            return NEXT
        return goto
    if name == "addvar":
        key, _, value = rule.arg.partition("=")
        template = Template(value)

        def addvar(env: dict, state: State, match: object) -> int:
            env[key] = template.render(env, state, match if isinstance(match, re.Match) else None)
            return NEXT
        return addvar
    if name == "addheader":
        def split(text: str) -> tuple[str, str] | None:
            header, _, value = text.partition(":")
            header = header.strip()
            # A name made of request data that is not a token is dropped: it
            # could end the header and start another.
            ok = _TOKEN_RE.fullmatch(header) and header.lower() not in routes.FRAMING_HEADERS
            return (header, _header_value(value)) if ok else None

        fixed = split(arg.constant) if arg.constant is not None else None

        def addheader(env: dict, state: State, match: object) -> int:
            pair = fixed or split(render(env, state, match))
            if pair is None:
                return NEXT
            if state.add is None:
                state.add = [pair]
            else:
                state.add.append(pair)
            return NEXT
        return addheader
    if name in ("delheader", "remheader"):
        def delheader(env: dict, state: State, match: object) -> int:
            if state.remove is None:
                state.remove = set()
            state.remove.add(render(env, state, match).strip().lower())
            return NEXT
        return delheader
    if name in SETTERS:
        variable = SETTERS[name]

        def setter(env: dict, state: State, match: object) -> int:
            value = render(env, state, match)
            env[variable] = value.partition(":")[0] if name == "setuser" else value
            return NEXT
        return setter
    if name in ("rewrite", "rewrite-last"):
        done = CONTINUE if name == "rewrite-last" else NEXT

        def rewrite(env: dict, state: State, match: object) -> int:
            path, question, query = render(env, state, match).partition("?")
            old = env.get("QUERY_STRING", "")
            if question:
                env["QUERY_STRING"] = f"{query}&{old}" if old else query
            env["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
            return done
        return rewrite
    if name in ("redirect", "redirect-302", "redirect-301", "redirect-permanent"):
        line, text = ("302 Found", b"Moved") if name in ("redirect", "redirect-302") else \
            ("301 Moved Permanently", b"Moved Permanently")  # (uWSGI's bodies)

        def redirect(env: dict, state: State, match: object) -> int:
            location = _header_value(render(env, state, match))
            return state.answer(*_text_answer(line, text, [("Location", location)]))
        return redirect
    if name in ("basicauth", "basicauth-next"):
        return BasicAuth(rule.arg, name == "basicauth-next")
    if name == "static":
        return lambda env, state, match: _static(env, state, render(env, state, match))
    raise routes.RouteError(f"the routing action {name!r} has no runner")  # (the grammar and this table disagree)


SETTERS = {"setpathinfo": "PATH_INFO", "setscriptname": "SCRIPT_NAME", "setmethod": "REQUEST_METHOD",
           "seturi": "REQUEST_URI", "setremoteaddr": "REMOTE_ADDR", "setdocroot": "DOCUMENT_ROOT",
           "setuser": "REMOTE_USER"}


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_value(value: str) -> str:
    """A header value built from request data cannot split the answer."""
    return value.strip().replace("\r", "").replace("\n", "").replace("\0", "")


def _static(env: dict, state: State, path: str) -> int:
    """``static:FILE``: the file, sent with sendfile; 404 if it is not a
    regular file. A path with a '..' segment (a client's PATH_INFO walking
    out of the directory the rule meant) or a NUL is never opened."""
    if "\0" in path or ".." in path.split("/"):
        return state.answer(*_text_answer("404 Not Found", b"Not Found"))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(_as_bytes(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return state.answer(*_text_answer("404 Not Found", b"Not Found"))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return state.answer(*_text_answer("404 Not Found", b"Not Found"))
    os.set_blocking(fd, True)
    handle = os.fdopen(fd, "rb")
    modified = email.utils.formatdate(int(info.st_mtime), usegmt=True)
    since = env.get("HTTP_IF_MODIFIED_SINCE")
    if since:
        try:
            when = email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None and int(info.st_mtime) <= when:
            handle.close()
            return state.answer("304 Not Modified", [("Last-Modified", modified)], [])
    headers = [("Content-Length", str(info.st_size)), ("Last-Modified", modified)]
    kind = mimetypes.guess_type(_as_bytes(path).decode("utf-8", "replace"))[0]
    if kind:
        headers.insert(0, ("Content-Type", kind))
    return state.answer("200 OK", headers, FileWrapper(handle))


# --- basicauth ------------------------------------------------------------------


_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def md5_crypt(password: bytes, salt: bytes, magic: bytes) -> str:
    """The MD5 crypt of FreeBSD and Apache ($1$ and $apr1$ in htpasswd files)."""
    salt = salt[:8]
    alternate = hashlib.md5(password + salt + password).digest()
    ctx = password + magic + salt
    ctx += (alternate * (len(password) // 16 + 1))[:len(password)]
    length = len(password)
    while length:
        ctx += b"\0" if length & 1 else password[:1]
        length >>= 1
    final = hashlib.md5(ctx).digest()
    for i in range(1000):
        step = password if i & 1 else final
        if i % 3:
            step += salt
        if i % 7:
            step += password
        step += final if i & 1 else password
        final = hashlib.md5(step).digest()
    out = []
    for a, b, c, n in ((0, 6, 12, 4), (1, 7, 13, 4), (2, 8, 14, 4), (3, 9, 15, 4), (4, 10, 5, 4), (None, None, 11, 2)):
        value = (final[a] << 16 if a is not None else 0) | (final[b] << 8 if b is not None else 0) | final[c]
        for _ in range(n):
            out.append(_ITOA64[value & 0x3F])
            value >>= 6
    return (magic + salt).decode("latin-1") + "$" + "".join(out)


class BasicAuth:
    """``basicauth:REALM,USER:PASSWORD`` or ``basicauth:REALM,HTPASSWD``;
    ``basicauth-next`` goes on to the next rule instead of answering 401.
    An htpasswd file may hold bcrypt ($2a$/$2b$/$2y$, with the bcrypt
    package), {SHA}, $apr1$ and $1$ hashes; it is read again when it
    changes, and a password once verified against a hash is remembered
    (bcrypt costs tens of milliseconds a check)."""

    def __init__(self, arg: str, next_on_failure: bool):
        self.realm, _, creds = arg.partition(",")
        self.inline = creds if ":" in creds else None
        self.path = None if self.inline is not None else creds
        self.next_on_failure = next_on_failure
        self.users: dict[str, str] = {}
        self.stamp: tuple | None = None
        self.verified: dict[tuple[str, bytes], bool] = {}
        self.warned: set[str] = set()

    def __call__(self, env: dict, state: State, match: object) -> int:
        if env.get("REMOTE_USER"):
            return NEXT
        header = env.get("HTTP_AUTHORIZATION", "")
        user = self._user(header)
        if user is not None:
            env["REMOTE_USER"] = user
            return NEXT
        if self.next_on_failure and user is None and self._decodable(header):
            return NEXT  # (wrong credentials; none at all, or not Basic: challenged, as uWSGI does)
        return state.answer("401 Authorization Required", [
            ("WWW-Authenticate", f'Basic realm="{self.realm}"'), ("Content-Type", "text/plain"),
            ("Content-Length", "12")], [b"Unauthorized"])

    @staticmethod
    def _decodable(header: str) -> bool:
        try:
            return header.startswith("Basic ") and len(header) > 7 and \
                ":" in base64.b64decode(header[6:].strip(), validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            return False

    def _user(self, header: str) -> str | None:
        if not header.startswith("Basic ") or len(header) > 8192:
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            return None
        user, colon, password = decoded.partition(":")
        if not colon:
            return None
        if self.inline is not None:
            return user if hmac.compare_digest(decoded.encode("latin-1"), _as_bytes(self.inline)) else None
        hashed = self._load().get(user)
        if hashed is None:
            return None
        return user if self._check(password.encode("latin-1"), hashed) else None

    def _load(self) -> dict[str, str]:
        try:
            info = os.stat(_as_bytes(self.path))
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp != self.stamp:
                with open(_as_bytes(self.path), "rb") as handle:
                    data = handle.read(MAX_HTPASSWD + 1)
                if len(data) > MAX_HTPASSWD:
                    raise OSError(f"larger than {MAX_HTPASSWD} bytes")
                users = {}
                for line in data.decode("latin-1").splitlines():
                    name, colon, hashed = line.rstrip("\r\n").partition(":")
                    hashed = hashed.strip()
                    if colon and name and not name.startswith("#"):
                        users.setdefault(name, hashed)
                self.users, self.stamp, self.verified = users, stamp, {}
        except OSError as exc:
            if self.path not in self.warned:
                self.warned.add(self.path)
                log(f"basicauth: cannot read {self.path}: {exc}")
            return {}
        return self.users

    def _check(self, password: bytes, hashed: str) -> bool:
        key = (hashed, hashlib.sha256(password).digest())
        known = self.verified.get(key)
        if known is not None:
            return known
        ok = self._verify(password, hashed)
        if len(self.verified) > 1024:
            self.verified.clear()
        self.verified[key] = ok
        return ok

    def _verify(self, password: bytes, hashed: str) -> bool:
        if hashed.startswith("{SHA}"):
            digest = base64.b64encode(hashlib.sha1(password).digest()).decode()
            return hmac.compare_digest(digest, hashed[5:])
        if hashed.startswith(("$2a$", "$2b$", "$2y$")):
            try:
                import bcrypt
            except ImportError:
                self._warn("bcrypt", "bcrypt hashes need the bcrypt package (pip install pyemperor[auth])")
                return False
            try:
                return bcrypt.checkpw(password, hashed.replace("$2y$", "$2b$", 1).encode())
            except ValueError:
                return False
        for magic in ("$apr1$", "$1$"):
            if hashed.startswith(magic):
                salt = hashed[len(magic):].partition("$")[0].encode("latin-1")
                return hmac.compare_digest(md5_crypt(password, salt, magic.encode()), hashed)
        self._warn(hashed[:4], f"{self.path}: a hash format basicauth does not know ({hashed[:4]!r}...): "
                   "use bcrypt (htpasswd -B), {SHA} or $apr1$")
        return False

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log(f"basicauth: {message}")


# --- the engine -------------------------------------------------------------------


def wsgi_str(text: str) -> str:
    """Config text (UTF-8) as a WSGI string (its bytes as latin-1), the form
    of every environ value: a rule for ``/café`` matches the path a client
    sent as UTF-8, and what it puts in a header encodes back to those bytes."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _as_bytes(text: str) -> bytes:
    return text.encode("latin-1", "replace")


def _compile_chain(rules: list[tuple[routes.Rule, Entry]]) -> list[Compiled]:
    rules = [(dataclasses.replace(rule, subject=wsgi_str(rule.subject), pattern=wsgi_str(rule.pattern),
                                  arg=wsgi_str(rule.arg)), entry) for rule, entry in rules]
    labels = {rule.pattern: pos for pos, (rule, _) in enumerate(rules) if rule.kind == "label"}
    return [Compiled(rule, entry, pos, labels) for pos, (rule, entry) in enumerate(rules)]


def run_chain(chain: list[Compiled], env: dict, state: State) -> int:
    goto = 0
    for rule in chain:
        if rule.label or rule.pos < goto:
            continue
        search = rule.search
        if search is not None:
            match = search(env.get(rule.variable) or "")
        elif rule.test is not None:
            match = rule.test(env, state)
        else:
            match = True
        if not match:
            continue
        done = rule.run(env, state, match)
        if done == NEXT:
            if state.goto:
                goto, state.goto = state.goto, 0
            continue
        return done
    return CONTINUE


class Routed:
    """The app behind the routing chains (a WSGI app itself)."""

    def __init__(self, app: Callable, tables: dict[str, list[tuple[routes.Rule, Entry]]]):
        self.app = app
        self.request = _compile_chain(tables.get("request", []))
        self.error = _compile_chain(tables.get("error", []))
        self.final = _compile_chain(tables.get("final", []))

    def __call__(self, env: dict, start_response: Callable):
        state = State()
        if not self.final:
            return self._route(env, state, start_response)
        try:
            return self._route(env, state, start_response)
        except BaseException as exc:
            # An answer that never was: a bare break, or the app raised (the
            # server answers 500 then).
            if not isinstance(exc, CloseConnection):
                state.status = 500
            run_chain(self.final, env, state)
            raise

    def _route(self, env: dict, state: State, start_response: Callable):
        if self.request and run_chain(self.request, env, state) == BREAK:
            if state.response is None:
                raise CloseConnection()
            status, headers, body = state.response
            state.response = None
            responder = _Responder(self, env, state, start_response)
            responder(status, headers)  # (the error chain has run: the body is known now)
            return self._finish(responder, body)
        if not self.error and not self.final:
            add, remove = state.add, state.remove
            if add is None and remove is None:
                return self.app(env, start_response)

            def changed(status: str, headers: list[tuple[str, str]], exc_info=None):
                if remove:
                    headers = [(name, value) for name, value in headers if name.lower() not in remove]
                return start_response(status, headers + add if add else headers, exc_info)
            return self.app(env, changed)
        responder = _Responder(self, env, state, start_response)
        return self._finish(responder, self.app(env, responder))

    def _finish(self, responder: _Responder, body: Iterable[bytes]):
        """The body as the server should get it. A generator app sets its
        status (and the error chain may replace its answer) only once it is
        iterated: wrapped. An answer whose status is known and kept goes
        as it is, a list or a file wrapper, so the server still frames it
        with Content-Length or sends it with sendfile; with a final chain,
        its close() runs that chain."""
        if not responder.called or responder.replaced is not None:
            return _Body(self, responder, body)
        if not self.final:
            return body
        final = lambda: run_chain(self.final, responder.env, responder.state)  # noqa: E731
        if type(body) is list:
            return _ClosingList(body, final)
        if isinstance(body, FileWrapper):
            return _ClosingFile(body, final)
        return _Body(self, responder, body)


class _ClosingList(list):
    """A list answer that runs ``on_close`` when the server closes it."""

    def __init__(self, items: list, on_close: Callable[[], object]):
        super().__init__(items)
        self.on_close = on_close

    def close(self) -> None:
        self.on_close()


class _ClosingFile(FileWrapper):
    """A file answer (still sent with sendfile) that runs ``on_close`` after
    the file's own close."""

    def __init__(self, wrapper: FileWrapper, on_close: Callable[[], object]):
        super().__init__(wrapper.filelike, wrapper.block_size)
        inner = wrapper.close

        def close() -> None:
            try:
                inner()
            finally:
                on_close()

        self.close = close


class _Responder:
    """start_response for the app (and the actions' own answers): runs the
    error chain on each status, applies the header changes, and swaps in
    an answer the error chain made."""

    __slots__ = ("routed", "env", "state", "start_response", "replaced", "called")

    def __init__(self, routed: Routed, env: dict, state: State, start_response: Callable):
        self.routed = routed
        self.env = env
        self.state = state
        self.start_response = start_response
        self.replaced: Iterable[bytes] | None = None
        self.called = False

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info=None):
        self.called = True
        if self.replaced is not None:
            # The error chain answered already; the app's later start_response
            # (an error middleware's, with exc_info) changes nothing of it.
            return lambda data: None
        state = self.state
        try:
            state.status = int(status[:3])
        except ValueError:
            state.status = 0
        if self.routed.error and not state.in_error:
            state.in_error = True
            done = run_chain(self.routed.error, self.env, state)
            state.in_error = False
            if state.response is not None:
                status, headers, self.replaced = state.response
                state.response = None
                state.status = int(status[:3])
            elif done == BREAK:
                raise CloseConnection()
        if state.remove:
            headers = [(name, value) for name, value in headers if name.lower() not in state.remove]
        if state.add:
            headers = [*headers, *state.add]
        write = self.start_response(status, headers, exc_info)
        return (lambda data: None) if self.replaced is not None else write


class _Body:
    """The answer's body: the error chain's instead of the app's if it made
    one; the final chain runs when the server closes it."""

    def __init__(self, routed: Routed, responder: _Responder, body: Iterable[bytes]):
        self.routed = routed
        self.responder = responder
        self.body = body

    def __iter__(self):
        responder = self.responder
        if responder.replaced is None:
            for chunk in self.body:
                if responder.replaced is not None:
                    break  # (that chunk was the replaced answer's)
                yield chunk
        if responder.replaced is not None:
            self._close_app()
            yield from responder.replaced

    def _close_app(self) -> None:
        close = getattr(self.body, "close", None)
        self.body = ()
        if close is not None:
            close()

    def close(self) -> None:
        try:
            self._close_app()
            replaced = getattr(self.responder.replaced, "close", None)
            if replaced is not None:
                replaced()
        finally:
            if self.routed.final:
                run_chain(self.routed.final, self.responder.env, self.responder.state)


def wrap(app: Callable, config: Config) -> Callable:
    """``app`` behind the config's routing chains (``app`` itself without)."""
    tables = route_tables(config)
    return Routed(app, tables) if tables else app


def log_tables(config: Config) -> None:
    """The routing tables as uWSGI's startup log prints them."""
    tables = route_tables(config)
    for chain in ("request", "error", "final"):
        rules = tables.get(chain)
        if not rules:
            continue
        title = TABLE_TITLES[chain]
        lines = [f"*** dumping {title} ***"]
        lines += [rule.dump(pos) for pos, (rule, _) in enumerate(rules)]
        lines.append(f"*** end of the {title} ***")
        log("\n".join(lines))
        for pos, (rule, entry) in enumerate(rules):
            pattern = rule.pattern if rule.kind == "regexp" else \
                rule.subject.partition(";")[2] if rule.kind.startswith("if") and routes.CONDITIONS[rule.pattern] == "regexp" else ""
            if pattern and routes.nested_quantifier(pattern):
                log(f"routing: WARNING {entry.file}:{entry.line}: the regexp {pattern!r} ({chain} rule {pos}) nests quantifiers: "
                    "a crafted request can make it take exponential time (Python's re has no match limit); "
                    "set harakiri to bound a worker's request")
