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
     {"body": "hello world", "CONTENT_LENGTH": "11", "HTTP_TRANSFER_ENCODING": None}),
    ("chunked with extensions, hex case and trailers",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\na;name=value\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\nX-Trailer: t\r\n\r\n",
     {"body": "0123456789abcdefghij"}),
    ("obs-text in a header value", b"GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xe9\r\n\r\n", {"HTTP_X_NAME": "caf\u00e9"}),
    ("other methods", b"PATCH /r HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}", {"REQUEST_METHOD": "PATCH", "body": "{}"}),
    ("OPTIONS", b"OPTIONS /r HTTP/1.1\r\nHost: h\r\n\r\n", {"REQUEST_METHOD": "OPTIONS"}),
    ("empty header value", b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n", {"HTTP_X_EMPTY": ""}),
    # RFC 9112 / PEP 3333 (the app-server issue):
    ("trailers never become headers",
     b"POST /t HTTP/1.1\r\nHost: example.com\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\n{}\r\n0\r\nX-Checksum: abc\r\nX-Note: n\r\n\r\n",
     {"HTTP_HOST": "example.com", "CONTENT_TYPE": "application/json", "HTTP_X_CHECKSUM": None, "HTTP_X_NOTE": None, "body": "{}"}),
    ("underscore Content_Length never overrides the real one",
     b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent_Length: 0\r\n\r\nhello",
     {"CONTENT_LENGTH": "5", "body": "hello"}),
    ("underscore Content_Type is dropped",
     b"POST / HTTP/1.1\r\nHost: h\r\nContent_Type: text/x-evil\r\nContent-Length: 2\r\n\r\nab",
     {"CONTENT_TYPE": None, "HTTP_CONTENT_TYPE": None, "body": "ab"}),
    ("chunk extensions with whitespace (BWS)",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 ; a=b\r\nhello\r\n3;x = \"q;\"\r\nabc\r\n0\r\n\r\n",
     {"body": "helloabc"}),
    ("any token method reaches the app", b"BREW /pot HTTP/1.1\r\nHost: h\r\n\r\n", {"REQUEST_METHOD": "BREW", "PATH_INFO": "/pot"}),
    ("another token method", b"FOO / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nz", {"REQUEST_METHOD": "FOO", "body": "z"}),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", {"REQUEST_METHOD": "OPTIONS", "REQUEST_URI": "*"}),
    ("absolute-form authority replaces Host", b"GET http://example.org:8080/x HTTP/1.1\r\nHost: other.example\r\n\r\n",
     {"HTTP_HOST": "example.org:8080", "PATH_INFO": "/x"}),
    ("an empty line before the request line is ignored", b"\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n", {"PATH_INFO": "/after"}),
    ("query string present even when empty", b"GET /nq HTTP/1.1\r\nHost: h\r\n\r\n", {"QUERY_STRING": "", "SCRIPT_NAME": ""}),
    ("HTTP/1.1 minor versions above 1 are served as 1.1", b"GET / HTTP/1.7\r\nHost: h\r\n\r\n", {"SERVER_PROTOCOL": "HTTP/1.1"}),
]

# (name, raw request, expected status)
INVALID = [
    ("garbage", b"GARBAGE\r\n\r\n", 400),
    ("no version (HTTP/0.9)", b"GET /\r\n\r\n", 400),
    ("bare LF line endings (llhttp is strict: no smuggling by line ending)", b"GET /lf HTTP/1.1\nHost: h\n\n", 400),
    ("unknown major version", b"GET / HTTP/9.9\r\nHost: h\r\n\r\n", 505),
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
    ("a transfer coding before chunked is not implemented",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("chunked twice", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400),
    ("chunk without its CRLF", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("request line over limit-request-line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
    ("header over limit-request-field-size", b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("head over buffer-size", b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 500) for i in range(20)) + b"\r\n", 431),
    ("more fields than limit-request-fields", b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("trailer X-Forwarded-For refused (it would pass every front end's filter)",
     b"POST /t HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n", 400),
    ("trailer Host refused", b"POST /t HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHost: evil.example.com\r\n\r\n", 400),
    ("trailer Content-Type refused",
     b"POST /t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nContent-Type: text/x-evil\r\n\r\n", 400),
    ("two Host fields", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400),
    ("two Content-Type fields", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Type: a/b\r\nContent-Type: c/d\r\nContent-Length: 0\r\n\r\n", 400),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("an invalid Host", b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
    ("CONNECT is not served", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("a malformed absolute-form target", b"PUT s://]ufd/: HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", 400),
    ("an authority-form target outside CONNECT", b"GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("the asterisk form outside OPTIONS", b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("chunked framing on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
    ("HTTP/0.9 request line alone", b"GET /\r\n", 400),
    ("a signed chunk size", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n", 400),
    ("a bare CR in a header", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    ("obfuscated transfer-encoding", b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("an empty Transfer-Encoding with Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("an empty Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n", 400),
    ("userinfo in an absolute-form target", b"GET http://u@evil.example/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("a scheme other than http(s)", b"GET foo://evil.example/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    ("body over limit-post", b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000, 413),
    ("chunked body over limit-post",
     b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"1000\r\n" + b"y" * 4096 + b"\r\n") * 5 + b"0\r\n\r\n", 413),
]
