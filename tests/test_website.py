"""dockpart.website without sockets: a BoundedSite's channel on a StringTransport and a
MemoryReactorClock (what real daemons do with it is in test_web.py, test_fileio.py and
test_dashboard.py)."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from dockpart.website import (ACCESS_LOG_INTERVAL, LINGER, LINGER_TIME, AccessLog, BoundedSite,
                              Phase, Refused, SiteLimits, combined_log_line, form_fields,
                              multipart_fields)


class Recorder(Resource):
    """Answers ``ok`` and keeps every request it was given."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.bodies = []

    def render(self, request):
        self.seen.append(request)
        self.bodies.append(request.content.read())
        return b"ok"


class Transport(StringTransport):
    """A StringTransport that half-closes and aborts as a TCP transport does."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


class Conn:
    def __init__(self, limits: SiteLimits = SiteLimits(), site: BoundedSite | None = None,
                 clock: MemoryReactorClock | None = None):
        self.clock = clock or MemoryReactorClock()
        self.resource = Recorder()
        self.site = site or BoundedSite(self.resource, limits, reactor=self.clock)
        self.channel = self.site.buildProtocol(None)
        self.transport = Transport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> bytes:
        return self.transport.value()


LIMITS = SiteLimits(max_body=100, route_bodies={b"/upload": 1000}, header_timeout=10,
                    send_timeout=30, max_connections=2)


def test_a_content_length_over_the_limit_is_413_before_any_body_byte_and_no_resource_runs():
    c = Conn(LIMITS)
    c.send(b"POST /spawn HTTP/1.1\r\nHost: x\r\nContent-Length: 536870912\r\n\r\n")
    assert c.answer().startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"connection: close" in c.answer() and b"limited to 100 bytes" in c.answer()
    assert c.transport.write_closed and c.channel.phase is Phase.REFUSED
    before = c.answer()
    c.send(b"x" * 100_000)  # what the client still sends is discarded, not stored
    assert c.answer() == before and c.resource.seen == []
    assert not c.transport.aborted
    c.clock.advance(LINGER)  # a client that falls silent without closing is cut off
    assert c.transport.aborted


def test_a_refused_client_still_sending_is_cut_off_after_the_lingering_time():
    c = Conn(LIMITS)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    while c.clock.seconds() < LINGER_TIME - LINGER:
        c.clock.advance(LINGER - 1)
        c.send(b"z" * 65536)
        assert not c.transport.aborted
    c.clock.advance(LINGER_TIME - c.clock.seconds())
    assert c.transport.aborted


@pytest.mark.parametrize("path, length, code", [
    (b"/upload", 1000, b"200"), (b"/upload/?x=1", 1000, b"200"), (b"/upload", 1001, b"413"),
    (b"/", 100, b"200"), (b"/uploads", 101, b"413"),
])
def test_each_route_has_its_own_limit(path, length, code):
    c = Conn(LIMITS)
    c.send(b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, length))
    if code == b"200":
        c.send(b"y" * length)
    assert c.answer().startswith(b"HTTP/1.1 " + code)


def test_a_chunked_body_is_cut_at_the_limit():
    c = Conn(LIMITS)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert c.answer() == b""
    c.send(b"40\r\n" + b"a" * 64 + b"\r\n" + b"0\r\n\r\n")  # 128 bytes > 100
    assert c.answer().startswith(b"HTTP/1.1 413")
    assert c.resource.seen == []


def test_a_body_within_the_limit_reaches_the_resource():
    c = Conn(LIMITS)
    c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\n")
    assert c.answer().startswith(b"HTTP/1.1 200")
    assert c.resource.bodies == [b"abc"]


def test_a_trickled_head_is_cut_by_the_total_deadline_with_408():
    """One byte a second keeps twisted.web's idle timer from firing for ever; the deadline
    counts from the connection, not from the last byte."""
    c = Conn(LIMITS)
    for byte in b"GET / HTTP/1.1\r\nHost: x":
        c.send(bytes([byte]))
        c.clock.advance(0.5)
        if c.answer():
            break
    assert c.answer().startswith(b"HTTP/1.1 408 Request Timeout")
    assert c.clock.seconds() == 10


def test_twisted_webs_own_400_is_not_followed_by_a_408():
    c = Conn(LIMITS)
    c.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    assert c.answer().startswith(b"HTTP/1.1 400") and c.transport.disconnecting
    c.clock.advance(10)  # the deadline went with the close, even while the 400 is unsent
    assert b"408" not in c.answer()


def test_an_idle_connection_is_closed_silently_at_the_deadline():
    c = Conn(LIMITS)
    c.clock.advance(9.9)
    assert not c.transport.disconnecting
    c.clock.advance(0.1)
    assert c.transport.disconnecting and c.answer() == b""


def test_a_keep_alive_connection_gets_the_deadline_again_after_each_answer():
    c = Conn(LIMITS)
    c.clock.advance(9)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.answer().startswith(b"HTTP/1.1 200")
    c.clock.advance(9)  # 18 s after the connection: the new deadline is 10 s after the answer
    assert not c.transport.disconnecting
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.answer().count(b"HTTP/1.1 200") == 2 and not c.transport.disconnecting
    c.clock.advance(10)
    assert c.transport.disconnecting and c.answer().count(b"HTTP/1.1") == 2  # no 408


def test_pipelined_requests_are_each_answered_and_an_http_1_0_one_closes():
    c = Conn(LIMITS)
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\n"
           b"Content-Length: 3\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n")
    assert c.answer().count(b" 200 OK\r\n") == 3
    assert [r.path for r in c.resource.seen] == [b"/a", b"/b", b"/c"]
    assert c.resource.bodies == [b"", b"abc", b""]
    assert c.transport.disconnecting


def test_a_slow_request_is_not_cut_by_the_header_deadline():
    """The deadline covers the head only: a resource may take its time."""
    class Slow(Resource):
        isLeaf = True

        def render(self, request):
            clock.callLater(30, lambda: (request.write(b"late"), request.finish()))
            return 1  # NOT_DONE_YET

    clock = MemoryReactorClock()
    c = Conn(site=BoundedSite(Slow(), LIMITS, reactor=clock), clock=clock)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(30)
    assert c.answer().startswith(b"HTTP/1.1 200") and c.answer().endswith(b"late\r\n0\r\n\r\n")
    assert not c.transport.disconnecting


def test_an_answer_left_unread_is_dropped_after_the_send_timeout():
    clock = MemoryReactorClock()
    site = BoundedSite(Recorder(), SiteLimits(header_timeout=1000, send_timeout=30),
                       reactor=clock, timeout=None)  # twisted.web's idle timer out of the way
    c = Conn(site=site, clock=clock)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.channel.pauseProducing()  # what the transport does when its buffer is full
    c.clock.advance(29)
    c.channel.resumeProducing()  # the client took it: the timer stops
    c.clock.advance(100)
    assert not c.transport.aborted
    c.channel.pauseProducing()
    c.clock.advance(30)
    assert c.transport.aborted


def test_connections_past_the_cap_are_aborted_and_a_closed_one_frees_its_slot():
    clock = MemoryReactorClock()
    site = BoundedSite(Recorder(), LIMITS, reactor=clock)
    first, second = Conn(site=site, clock=clock), Conn(site=site, clock=clock)
    assert site.connections.active == 2
    third = Conn(site=site, clock=clock)
    assert third.transport.aborted and site.connections.active == 2
    first.channel.connectionLost(None)
    assert site.connections.active == 1
    assert not second.transport.aborted


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
                    % (boundary.encode(), name.encode(), value) for name, value in parts)
    return b"preamble\r\n" + body + b"--%s--\r\nepilogue" % boundary.encode()


def test_multipart_fields_are_the_raw_bytes_of_each_named_part():
    body = multipart([("image", b"\x89PNG\r\n\r\n--not-the-boundary\r\n"), ("a", b""),
                      ("a", b"2")])
    assert multipart_fields(body, b"b0undary") == {
        b"image": [b"\x89PNG\r\n\r\n--not-the-boundary\r\n"], b"a": [b"", b"2"]}


@pytest.mark.parametrize("body, why", [
    (b"--b0undary\r\nContent-Disposition: form-data; name=a\r\n\r\nno end", "no closing"),
    (b"--b0undaryX\r\n\r\n--b0undary--", "no line break"),
    (b"--b0undary\r\nContent-Disposition: form-data; name=a\r\n--b0undary--", "end of headers"),
    (b"--b0undary\r\nX: " + b"y" * 9000 + b"\r\n\r\nv\r\n--b0undary--", "headers are limited"),
])
def test_a_malformed_form_is_400(body, why):
    with pytest.raises(Refused, match=why) as refused:
        multipart_fields(body, b"b0undary")
    assert refused.value.code == 400


def test_a_form_of_more_than_1000_parts_is_413_and_refused_in_milliseconds():
    """The issue's 5 MB of ~100k tiny parts blocked a web instance 2.2 s in the email parser."""
    body = multipart([("f", b"x")] * 100_000)
    started = time.perf_counter()
    with pytest.raises(Refused, match="1000 parts") as refused:
        form_fields(body, b"multipart/form-data; boundary=b0undary")
    assert refused.value.code == 413
    assert time.perf_counter() - started < 0.5  # about 0.03 s here; twisted.web took 2.2 s
    assert len(form_fields(multipart([("f", b"x")] * 1000),
                           b"multipart/form-data; boundary=b0undary")[b"f"]) == 1000


def test_the_largest_upload_of_1000_parts_parses_in_well_under_a_second():
    body = multipart([("f", b"z\n" * 2600)] * 1000)  # 5 MB of short lines
    started = time.perf_counter()
    assert len(form_fields(body, b'multipart/form-data; boundary="b0undary"')[b"f"]) == 1000
    assert time.perf_counter() - started < 1  # about 0.07 s here (the headers of 1000 parts)


def test_a_urlencoded_form_is_bounded_in_fields_too():
    assert form_fields(b"a=1&b=2;c=3", b"application/x-www-form-urlencoded") == {
        b"a": [b"1"], b"b": [b"2"], b"c": [b"3"]}
    with pytest.raises(Refused, match="1000 fields"):
        form_fields(b"&".join([b"a=1"] * 1001), b"application/x-www-form-urlencoded")


def test_a_form_posted_through_the_site_reaches_request_args_and_a_huge_one_gets_413():
    c = Conn(SiteLimits(max_body=10 ** 7))
    body = multipart([("image", b"data")])
    c.send(b"POST /upload?q=1 HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
           b"boundary=b0undary\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    [request] = c.resource.seen
    assert request.args == {b"q": [b"1"], b"image": [b"data"]}
    assert c.resource.bodies == [body]
    c = Conn(SiteLimits(max_body=10 ** 7))
    body = multipart([("f", b"x")] * 1001)
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
           b"boundary=b0undary\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert c.answer().startswith(b"HTTP/1.1 413") and c.resource.seen == []


@pytest.mark.parametrize("module, args, message", [
    ("web", ["--header-timeout", "0"], "--header-timeout must be a positive"),
    ("fileweb", ["--send-timeout", "-1"], "--send-timeout must be a positive"),
    ("fileweb", ["--max-connections", "0"], "--max-connections must be at least 1"),
    ("infra", ["--dashboard-max-connections", "0"], "--dashboard-max-connections must be"),
    ("socatlike", ["--timeout", "0"], "--timeout must be a positive"),
])
def test_bad_site_options_are_usage_errors(module, args, message):
    import importlib

    from twisted.python import usage
    options = importlib.import_module(f"dockpart.{module}").Options()
    with pytest.raises(usage.UsageError, match=message):
        options.parseOptions(args)


def test_the_web_apps_upload_route_takes_max_upload_and_the_rest_the_default():
    from dockpart import web
    options = web.Options()
    options.parseOptions(["--max-upload", "1MiB", "--max-connections", "7"])
    limits = options["site"]
    assert limits.body_limit(b"/upload?x") == 1024 * 1024
    assert limits.body_limit(b"/set") == limits.max_body == 64 * 1024
    assert limits.max_connections == 7


@pytest.mark.parametrize("soft, expected", [(1024, 256), (20000, 1024), (40, 16)])
def test_the_default_connection_cap_follows_the_descriptor_limit(monkeypatch, soft, expected):
    """HAProxy derives maxconn from ulimit -n; with 1024 descriptors a daemon keeps 768."""
    import resource

    from dockpart import website
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    assert website.default_max_connections() == expected


# -- the access log


def _request(method=b"GET", uri=b"/", proto=b"HTTP/1.1", code=200, sent=12,
             referrer=None, agent=None, client=IPv4Address("TCP", "10.1.2.3", 4567)):
    request = http.Request(DummyChannel())
    request.method, request.uri, request.clientproto = method, uri, proto
    request.code, request.sentLength, request.client = code, sent, client
    for name, value in ((b"referer", referrer), (b"user-agent", agent)):
        if value is not None:
            request.requestHeaders.setRawHeaders(name, value)
    return request


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=8), st.binary(max_size=40), st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
       st.integers(100, 599), st.integers(0, 10**6),
       st.none() | st.lists(st.binary(max_size=30), min_size=1, max_size=2),
       st.none() | st.lists(st.binary(max_size=30), min_size=1, max_size=2),
       st.sampled_from([IPv4Address("TCP", "10.1.2.3", 4567), IPv6Address("TCP", "::1", 80),
                        UNIXAddress(b"/run/web.sock")]))
def test_the_access_log_line_is_twisteds_combined_format(method, uri, proto, code, sent,
                                                         referrer, agent, client):
    """Quotes, backslashes, control and non-ASCII bytes, repeated headers, a UNIX peer: the
    line is the one twisted.web's combinedLogFormatter writes."""
    request = _request(method, uri, proto, code, sent, referrer, agent, client)
    stamp = "[06/Dec/2026:03:04:05 +0000]"
    assert combined_log_line(stamp, request) == http.combinedLogFormatter(stamp, request)


class Events(list):
    """The log events published while it is used as a context manager."""

    def __enter__(self):
        globalLogPublisher.addObserver(self.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.append)

    def access_lines(self) -> list[list[str]]:
        """The access log's events, each as its lines."""
        return [formatEvent(e).split("\n") for e in self if e.get("log_namespace")
                == "dockpart.access"]


def test_access_log_lines_are_written_together_each_second_and_at_stop():
    clock = MemoryReactorClock()
    site = BoundedSite(Recorder(), reactor=clock)
    site.startFactory()
    conn = Conn(site=site, clock=clock)
    with Events() as events:
        conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert events.access_lines() == []
        clock.advance(ACCESS_LOG_INTERVAL)
        [lines] = events.access_lines()
        assert [line.split('"')[3] for line in lines] == ["GET /a HTTP/1.1", "GET /b HTTP/1.1"]
        clock.advance(ACCESS_LOG_INTERVAL)  # nothing new: no event
        conn.send(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        site.stopFactory()
        assert [len(e) for e in events.access_lines()] == [2, 1]
        assert "GET /c HTTP/1.1" in events.access_lines()[-1][0]


def test_the_access_log_is_written_at_once_when_a_batch_is_full():
    clock = MemoryReactorClock()
    site = BoundedSite(Recorder(), reactor=clock)
    site.startFactory()
    site.logFile = AccessLog(clock, batch=3)
    conn = Conn(site=site, clock=clock)
    with Events() as events:
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        assert [len(e) for e in events.access_lines()] == [3]
    site.stopFactory()
