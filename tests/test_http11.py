"""dockpart.http11, the pure-Python parser the proxy uses on PyPy, against httptools (llhttp)
on CPython: on a corpus of hand-picked messages (the framing tests' and the probes that
fixed its rules) and on generated ones (Hypothesis), both accept, refuse or switch protocols
alike, report the same callbacks, and so frame every message the same way."""

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockpart import http11


class Recorder:
    """Every callback as an event; pieces of a URL, status or body merged."""

    def __init__(self):
        self.events = []

    def _piece(self, kind, data):
        if self.events and self.events[-1][0] == kind:
            self.events[-1] = (kind, self.events[-1][1] + data)
        else:
            self.events.append((kind, bytes(data)))

    def on_message_begin(self):
        self.events.append(("begin",))

    def on_url(self, url):
        self._piece("url", url)

    def on_status(self, reason):
        self._piece("status", reason)

    def on_header(self, name, value):
        self.events.append(("header", bytes(name), bytes(value)))

    def on_headers_complete(self):
        parser = self.parser
        self.events.append(("headers", parser.get_http_version(), parser.should_upgrade(),
                            parser.get_status_code() if self.response else parser.get_method()))

    def on_body(self, body):
        self._piece("body", body)

    def on_message_complete(self):
        self.events.append(("complete", self.parser.should_keep_alive()))


def run(module, response: bool, pieces: list) -> tuple:
    """What a parser from ``module`` makes of ``pieces`` fed one by one."""
    rec = Recorder()
    parser = (module.HttpResponseParser if response else module.HttpRequestParser)(rec)
    rec.parser, rec.response = parser, response
    fed = 0
    for piece in pieces:
        try:
            parser.feed_data(piece)
        except module.HttpParserUpgrade as e:
            return ("upgrade", fed + e.args[0], parser.should_upgrade()), rec.events
        except module.HttpParserError:
            # llhttp reports a URL, status or header piece by piece, before it sees the
            # error in it: what came before a refusal may differ there, never in what was
            # framed (heads complete, bodies, ends).
            return ("error",), [e for e in rec.events if e[0] in ("headers", "body", "complete")]
        fed += len(piece)
    events = rec.events
    while events and events[-1][0] == "header":
        events.pop()  # httptools reports a header once the next line begins
    return ("ok",), events


def same(data: bytes, response: bool = False, cuts=()) -> tuple:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    ours = run(http11, response, pieces)
    theirs = run(httptools, response, pieces)
    assert ours == theirs, (data, pieces)
    return ours


REQ = b"POST / HTTP/1.1\r\nHost: x\r\n"
TE = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
CORPUS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nA: b  \r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\nA: b\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\n\r\n", b"GET / HTTP/1.1\r\n\n",
    b"GET / HTTP/1.2\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n",
    b"GET / HTTP/3.0\r\n\r\n", b"GET / HTTP/1.1 \r\n\r\n", b"GET / \r\n\r\n", b"GET /\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n", b"GET /  HTTP/1.1\r\n\r\n", b"GET  HTTP/1.1\r\n\r\n",
    b"get / HTTP/1.1\r\n\r\n", b"FOO / HTTP/1.1\r\n\r\n", b"PLAY / HTTP/1.1\r\n\r\n",
    b"M-SEARCH * HTTP/1.1\r\n\r\n", b"OPTIONS * HTTP/1.1\r\n\r\n",
    b"GET /a\"<>{}|\\^` HTTP/1.1\r\n\r\n", b"GET /a\x80 HTTP/1.1\r\n\r\n",
    b"GET /a\x7f HTTP/1.1\r\n\r\n", b"GET /a\tb HTTP/1.1\r\n\r\n", b"GET a HTTP/1.1\r\n\r\n",
    b"GET http://a:80/x?y#z HTTP/1.1\r\n\r\n", b"GET http://a#x HTTP/1.1\r\n\r\n",
    b"GET http:/x HTTP/1.1\r\n\r\n", b"GET //x HTTP/1.1\r\n\r\n", b"GET ?x HTTP/1.1\r\n\r\n",
    b"GET http://u@h:1/p HTTP/1.1\r\n\r\n", b"GET http://[::1]:1/p HTTP/1.1\r\n\r\n",
    b"GET h:80 HTTP/1.1\r\n\r\n", b"CONNECT a:80 HTTP/1.1\r\n\r\nbytes",
    b"GET / HTTP/1.1\r\nA : b\r\n\r\n", b"GET / HTTP/1.1\r\n: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nA:\tb\t\r\n\r\n", b"GET / HTTP/1.1\r\nA:b\x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nA:b\x7f\r\n\r\n", b"GET / HTTP/1.1\r\nA:b\xff\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
    b"GET / HTTP/1.1\r\nA:\r\n\r\n", b"GET / HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n",
    REQ + b"Content-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
    REQ + b"Content-Length:  5 \r\n\r\nhello", REQ + b"Content-Length: \r\n\r\n",
    REQ + b"Content-Length: +1\r\n\r\nx", REQ + b"Content-Length: 1,1\r\n\r\nx",
    REQ + b"Content-Length: 1 1\r\n\r\nx", REQ + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    REQ + b"Content-Length: 99999999999999999999\r\n\r\n",
    REQ + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: gzip\r\n\r\nabc", REQ + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", REQ + b"Transfer-Encoding: \r\n\r\n",
    REQ + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
    REQ + b"Transfer-Encoding:  Chunked \r\n\r\n0\r\n\r\n",
    TE + b"3;a=b;c=\"d\"\r\nabc\r\n0\r\n\r\n", TE + b"3 \r\nabc\r\n0\r\n\r\n",
    TE + b"3 ;a\r\nabc\r\n0\r\n\r\n", TE + b"11111111111111111\r\nabc\r\n0\r\n\r\n",
    TE + b"0000000000000000003\r\nabc\r\n0\r\n\r\n", TE + b"3\r\nabcX\r\n0\r\n\r\n",
    TE + b"1;\r\nx\r\n0\r\n\r\n", TE + b"1;a=\r\nx\r\n0\r\n\r\n", TE + b"1;a;b\r\nx\r\n0\r\n\r\n",
    TE + b"1;a =b\r\nx\r\n0\r\n\r\n", TE + b"1;a=\"\\\"\"\r\nx\r\n0\r\n\r\n", TE + b"\r\nx\r\n",
    TE + b"x\r\n0\r\n\r\n", TE + b"-1\r\nx\r\n0\r\n\r\n", TE + b"0x1\r\nx\r\n0\r\n\r\n",
    TE + b"0\r\nX-T: 1\r\n\r\n", TE + b"0\r\nContent-Length: 5\r\n\r\n",
    TE + b"0\r\nTransfer-Encoding: chunked\r\n\r\n", TE + b"0\r\nConnection: close\r\n\r\nGET", TE + b"0\r\nA:b\r\n c\r\n\r\n", TE + b"1\nx\r\n0\r\n\r\n",
    TE + b"1\r\nx\n0\r\n\r\n", TE + b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: Upgrade, close\r\nUpgrade: a\r\n\r\nafter",
    b"GET / HTTP/1.1\r\nConnection: xupgrade\r\nUpgrade: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: a,close\r\n\r\nGET",
    b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\nGET",
    b"GET / HTTP/1.1\r\nProxy-Connection: close\r\n\r\nGET",
    b"GET / HTTP/1.1\r\nUpgrade:\r\nConnection: upgrade\r\n\r\nGET",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Content-Length: 5\r\n\r\nhello",
    b"GET / HTTP/1.1\r\nUpgrade: x\r\nConnection: upgrade\r\nTransfer-Encoding: chunked\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 204 No\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\naHTTP",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n", b"HTTP/1.1 1000 OK\r\n\r\n", b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200  OK \x01\r\n\r\n", b"HTTP/1.1 200\r\n\r\nabc", b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 204 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 304 OK\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nGZIPD\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 101 S\r\n\r\nabc", b"HTTP/1.1 101 OK\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nUpgrade: x\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 103 Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nTransfer-Encoding: x\r\n\r\n",
]


@pytest.mark.parametrize("data", CORPUS)
def test_requests_of_the_corpus_are_framed_as_httptools_frames_them(data):
    same(data)
    same(data, cuts=range(1, len(data), 7))
    same(data, cuts=range(1, len(data)))


@pytest.mark.parametrize("data", RESPONSES)
def test_responses_of_the_corpus_are_framed_as_httptools_frames_them(data):
    same(data, response=True)
    same(data, response=True, cuts=range(1, len(data)))


def test_a_callback_error_carries_the_callbacks_exception_and_stays():
    class Failing(Recorder):
        def on_header(self, name, value):
            raise KeyError("mine")
    for module in (http11, httptools):
        parser = module.HttpRequestParser(Failing())
        with pytest.raises(module.HttpParserCallbackError) as e:
            parser.feed_data(b"GET / HTTP/1.1\r\nA: b\r\n\r\n")
        assert isinstance(e.value.__context__, KeyError)
        with pytest.raises(module.HttpParserCallbackError):
            parser.feed_data(b"GET / HTTP/1.1\r\n\r\n")


@pytest.mark.parametrize("url", [b"http://a:80/x?y#z", b"https://h/", b"http://u@h:1/p",
                                 b"http://[::1]:8/p", b"http://h:99999/", b"http://h:x/",
                                 b"h:80", b"http://a b/", b"/p?q", b"http://h?q"])
def test_parse_url_finds_the_parts_httptools_finds(url):
    def parts(module):
        try:
            u = module.parse_url(url)
        except module.HttpParserInvalidURLError:
            return "invalid"
        return (u.schema, u.host, u.port, u.path, u.query, u.fragment, u.userinfo)
    assert parts(http11) == parts(httptools)


# Generated messages: pieces of valid heads and bodies, and the mutations smuggling uses.

NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade",
         b"Proxy-Connection", b"X-A", b"A b", b"", b"X:Y", b"\xff", b"content-length"]
VALUES = [b"x", b"0", b"5", b"05", b" 5 ", b"+5", b"5,5", b"chunked", b"gzip, chunked",
          b"chunked, gzip", b"Chunked", b"close", b"keep-alive", b"upgrade", b"Upgrade, close",
          b"websocket", b"", b"a\x00b", b"a\r\n b", b"a\tb", b"\xe9t\xe9", b"a\rb", b"a\nb"]
EOLS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"]
CHUNK_SIZES = [b"0", b"3", b"1;a=b", b"2;x=\"q\"", b"3 ", b"g", b"", b"ffffffffffffffffff",
               b"00003", b"1;", b"+1"]


@st.composite
def message(draw, response: bool) -> bytes:
    if response:
        first = draw(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No",
                                      b"HTTP/1.1 304 Same", b"HTTP/1.1 100 Continue",
                                      b"HTTP/1.1 101 Switching", b"HTTP/1.1 200",
                                      b"HTTP/1.1 2000 X", b"HTTP/1.2 200 OK"]))
    else:
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"get",
                                       b"BREW", b"OPTIONS"]))
        target = draw(st.sampled_from([b"/", b"/a?b#c", b"*", b"http://h:1/p", b"h:1", b"",
                                       b"/\xe9", b"/a b", b"//x"]))
        version = draw(st.sampled_from([b" HTTP/1.1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0",
                                        b" HTTP/1.2", b"", b" HTTP/1.1 ", b"  HTTP/1.1"]))
        first = method + b" " + target + version
    head = first + draw(st.sampled_from(EOLS))
    for _ in range(draw(st.integers(0, 4))):
        head += draw(st.sampled_from(NAMES)) + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) \
            + draw(st.sampled_from(VALUES)) + draw(st.sampled_from(EOLS))
    head += draw(st.sampled_from(EOLS))
    body = draw(st.sampled_from([b"", b"hello", b"0\r\n\r\n"]))
    for _ in range(draw(st.integers(0, 3))):
        size = draw(st.sampled_from(CHUNK_SIZES))
        body += size + draw(st.sampled_from(EOLS)) + draw(st.binary(max_size=4)) \
            + draw(st.sampled_from(EOLS))
    if draw(st.booleans()):
        body += b"0\r\n" + draw(st.sampled_from([b"", b"T: 1\r\n", b"T : 1\r\n",
                                                 b"Content-Length: 1\r\n",
                                                 b"Transfer-Encoding: chunked\r\n",
                                                 b"Connection: close\r\n"])) + b"\r\n"
    return head + body


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.lists(message(False), min_size=1, max_size=3), st.lists(st.integers(1, 200),
                                                                   max_size=4))
def test_generated_requests_are_framed_as_httptools_frames_them(messages, cuts):
    same(b"".join(messages), cuts=cuts)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.lists(message(True), min_size=1, max_size=3), st.lists(st.integers(1, 200),
                                                                  max_size=4))
def test_generated_responses_are_framed_as_httptools_frames_them(messages, cuts):
    same(b"".join(messages), response=True, cuts=cuts)
