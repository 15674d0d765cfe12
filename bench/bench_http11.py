"""Parsing speed of dockpart.http11 against httptools, the figure that chose the proxy's parser
(dockpart/http_parser.py): a typical request head and a small response, fed one per call.

    .venv/bin/python bench/bench_http11.py        # CPython: http11 and httptools
    .venv-pypy/bin/python bench/bench_http11.py   # PyPy: http11
    # and httptools on PyPy, through cpyext: a PyPy virtualenv with Debian's pypy3-dev
    # installed and `pip install httptools` (it builds against PyPy's headers)

Each parser first parses 200,000 messages untimed (PyPy's JIT compiles the loop), then
500,000 timed by the CPU time they take.  One core, no I/O.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dockpart import http11  # noqa: E402

REQUEST = (b"GET /index.html?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\nConnection: keep-alive\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 6\r\nConnection: keep-alive\r\n\r\nhello\n")


class Callbacks:
    """Every callback the proxy has, doing nothing."""

    def on_message_begin(self): pass
    def on_url(self, url): pass
    def on_status(self, reason): pass
    def on_header(self, name, value): pass
    def on_headers_complete(self): pass
    def on_body(self, body): pass
    def on_message_complete(self): pass


def main() -> None:
    modules = [http11]
    try:
        import httptools
        modules.append(httptools)
    except ImportError:
        pass
    for module in modules:
        for kind, data, make in (("request", REQUEST, module.HttpRequestParser),
                                 ("response", RESPONSE, module.HttpResponseParser)):
            parser = make(Callbacks())
            for _ in range(200_000):
                parser.feed_data(data)
            n = 500_000
            started = time.process_time()  # CPU time: a busy machine moves it less
            for _ in range(n):
                parser.feed_data(data)
            took = time.process_time() - started
            print(f"{sys.implementation.name:8} {module.__name__:16} {kind:8} "
                  f"{n / took / 1000:6.0f}k messages/s  {took / n * 1e6:5.2f} us each")


if __name__ == "__main__":
    main()
