"""Hello-world WSGI app used by the examples, tests and benchmarks."""

import os


def application(environ, start_response):
    name = os.environ.get("HELLO_NAME", "world")
    body = f"Hello, {name}! (pid {os.getpid()})\n".encode()
    if environ.get("PATH_INFO") == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
    elif environ.get("PATH_INFO") == "/error":
        raise RuntimeError("this app fails on purpose")
    elif environ.get("PATH_INFO") == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"chunk {i}\n".encode() for i in range(3))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
