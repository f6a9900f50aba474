"""Raw HTTP requests and what the server must make of them, in the form of
gunicorn's tests/requests: each valid request with the environ it must give
the app (and its body), each invalid one with the status it must get.

The app (ENV_APP) answers with a JSON object of the environ's string values
plus "body" (the request body as latin-1), so a valid case compares fields.
"""

from __future__ import annotations

ENV_APP = '''
import json


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    doc = {k: v for k, v in environ.items() if isinstance(v, str)}
    doc["body"] = body.decode("latin-1")
    out = json.dumps(doc).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]
'''

# (name, raw request, expected environ subset; None for "key must be absent")
VALID = [
    ("simple get", b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
     {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "example", "body": ""}),
    ("query string", b"GET /search?q=a+b&x=%20&empty= HTTP/1.1\r\nHost: h\r\n\r\n",
     {"PATH_INFO": "/search", "QUERY_STRING": "q=a+b&x=%20&empty=", "REQUEST_URI": "/search?q=a+b&x=%20&empty="}),
    ("empty query", b"GET /p? HTTP/1.1\r\nHost: h\r\n\r\n", {"PATH_INFO": "/p", "QUERY_STRING": ""}),
    ("percent-encoded path, decoded as latin-1", b"GET /caf%C3%A9/a%2Fb HTTP/1.1\r\nHost: h\r\n\r\n",
     {"PATH_INFO": "/caf\u00c3\u00a9/a/b", "REQUEST_URI": "/caf%C3%A9/a%2Fb"}),
    ("absolute-form target", b"GET http://example.org:8080/x/y?z=1 HTTP/1.1\r\nHost: example.org:8080\r\n\r\n",
     {"PATH_INFO": "/x/y", "QUERY_STRING": "z=1"}),
    ("http/1.0 without host", b"GET /old HTTP/1.0\r\n\r\n", {"SERVER_PROTOCOL": "HTTP/1.0", "PATH_INFO": "/old", "HTTP_HOST": None}),
    ("repeated header joined with commas", b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a/b\r\nAccept: c/d\r\n\r\n",
     {"HTTP_ACCEPT": "a/b, c/d"}),
    ("repeated cookie joined with semicolons", b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
     {"HTTP_COOKIE": "a=1; b=2"}),
    ("header value whitespace trimmed", b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad:   padded value \t\r\n\r\n",
     {"HTTP_X_PAD": "padded value"}),
    ("header names are case-insensitive", b"GET / HTTP/1.1\r\nhOsT: h\r\nx-LoWeR: v\r\n\r\n", {"HTTP_HOST": "h", "HTTP_X_LOWER": "v"}),
    ("underscore header dropped (would alias a dashed one)", b"GET / HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: evil\r\nX-Forwarded-For: good\r\n\r\n",
     {"HTTP_X_FORWARDED_FOR": "good"}),
    ("content headers without HTTP_ prefix", b"POST /f HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
     {"CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "5", "HTTP_CONTENT_TYPE": None, "HTTP_CONTENT_LENGTH": None, "body": "hello"}),
    ("zero content-length", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", {"body": ""}),
    ("chunked body", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
     {"body": "hello world", "CONTENT_LENGTH": "11"}),
    ("chunked with extensions, hex case and trailers",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\na;name=value\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\nX-Trailer: t\r\n\r\n",
     {"body": "0123456789abcdefghij"}),
    ("obs-text in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\r\n\r\n", {"HTTP_X_NAME": "caf\u00e9"}),
    ("other methods", b"PATCH /r HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}", {"REQUEST_METHOD": "PATCH", "body": "{}"}),
    ("OPTIONS", b"OPTIONS /r HTTP/1.1\r\nHost: h\r\n\r\n", {"REQUEST_METHOD": "OPTIONS"}),
    ("empty header value", b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n", {"HTTP_X_EMPTY": ""}),
]

# (name, raw request, expected status)
INVALID = [
    ("garbage", b"GARBAGE\r\n\r\n", 400),
    ("no version (HTTP/0.9)", b"GET /\r\n\r\n", 400),
    ("bare LF line endings (llhttp is strict: no smuggling by line ending)", b"GET /lf HTTP/1.1\nHost: h\n\n", 400),
    ("unknown version", b"GET / HTTP/9.9\r\n\r\n", 400),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n", 400),
    ("space before the colon", b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: h\r\nX-Long: a\r\n  continued\r\n\r\n", 400),
    ("non-numeric content-length", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n", 400),
    ("negative content-length", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400),
    ("two different content-lengths", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("content-length with transfer-encoding (smuggling)",
     b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("transfer-encoding not ending in chunked", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    ("chunk without its CRLF", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("head over buffer-size", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 431),
    ("header over buffer-size", b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("body over limit-post", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000, 413),
    ("chunked body over limit-post",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"y" * 4096 + b"\r\n") * 5 + b"0\r\n\r\n", 413),
]
