"""dockpart-proxy's HTTP framing against smuggling and desync: a real twistd proxy, a real
redis-server, and a recording raw-socket backend that answers exactly what each test tells it."""

from __future__ import annotations

import socket
import time

import pytest

from helpers import wait_for
from proxykit import RawBackend, RawTier, exchange

KEY = "framing:servers"


@pytest.fixture(scope="module")
def tier():
    t = RawTier(KEY, None, "--backend-timeout", "1")
    yield t
    t.close()


@pytest.fixture
def backend(tier):
    tier.backend.reset(answer=RawBackend().answer)
    return tier.backend


def received(backend) -> bytes:
    with backend.lock:
        return b"".join(bytes(r) for r in backend.received)


# Headers named in Connection that frame or route the message.

@pytest.mark.parametrize("named", [b"Content-Length", b"Transfer-Encoding", b"Host"])
def test_connection_naming_a_framing_header_is_refused_and_nothing_is_forwarded(tier, backend,
                                                                               named):
    body = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    if named == b"Transfer-Encoding":
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        framed = b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    reply = exchange(tier.port, b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: " + named
                     + b"\r\n" + framed)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert reply.endswith(b"<closed>")
    assert b"/smuggled" not in received(backend) and not backend.requests


def test_connection_naming_a_framing_header_in_a_response_gives_502(tier, backend):
    backend.answer = lambda r: (b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n"
                                b"Content-Length: 5\r\n\r\nhello")
    reply = exchange(tier.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 502"), reply
    # The page names no backend address.
    assert str(backend.port).encode() not in reply


def test_connection_naming_an_ordinary_header_drops_it_everywhere(tier, backend):
    reply = exchange(tier.port, b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: X-Forwarded-For\r\n"
                                b"X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    (request,) = backend.requests
    # Named as hop-by-hop, the client's value is neither forwarded nor appended to.
    assert request.header(b"X-Forwarded-For") == b"127.0.0.1"


# Upgrade.

def test_bytes_after_an_upgrade_request_never_reach_a_backend_that_does_not_switch(tier, backend):
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
               b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = exchange(tier.port, upgrade)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 200"), reply
    assert reply.endswith(b"/ws<closed>")
    # The next client gets its own answer, not one queued for the smuggled request.
    reply = exchange(tier.port, b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.endswith(b"\r\n\r\n/next<closed>"), reply
    assert [r.url for r in backend.requests] == [b"/ws", b"/next"]
    assert b"/smuggled" not in received(backend)


def test_bytes_after_an_upgrade_request_reach_the_backend_after_its_101(tier, backend):
    def switch(request):
        def tunnel(conn):
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            got = b""
            while len(got) < 5:
                got += conn.recv(100)
            conn.sendall(got.upper())
        return tunnel
    backend.answer = switch
    reply = exchange(tier.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n"
                                b"Connection: Upgrade\r\n\r\nhello", read_until=b"HELLO")
    assert reply.startswith(b"HTTP/1.1 101") and reply.endswith(b"\r\n\r\nHELLO"), reply


def test_an_upgrade_request_with_a_body_is_refused(tier, backend):
    reply = exchange(tier.port, b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\nContent-Length: 5\r\n\r\nhello")
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert not backend.requests


# Bodies where there should be none.

@pytest.mark.parametrize("first, answer", [
    (b"HEAD /a", b"HTTP/1.1 200 OK\r\nContent-Length: 39\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"),
    (b"GET /a", b"HTTP/1.1 204 No Content\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"),
    (b"GET /a", b"HTTP/1.1 304 Not Modified\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"),
])
def test_a_body_after_head_204_or_304_does_not_become_the_next_response(tier, backend, first,
                                                                        answer):
    backend.answer = lambda r: answer if r.url == b"/a" else (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ngood\n")
    reply = exchange(tier.port, first + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"EVIL" not in reply, reply
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2 and answers[1].endswith(b"\r\n\r\ngood\n<closed>"), reply


# Host and version.

@pytest.mark.parametrize("request_bytes, code", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", b"400"),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"505"),
])
def test_bad_host_or_version_is_refused(tier, backend, request_bytes, code):
    reply = exchange(tier.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + code), reply
    assert not backend.requests


def test_http_1_0_without_host_is_served(tier, backend):
    reply = exchange(tier.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"/old<closed>"), reply
    assert backend.requests[0].header(b"Host") == f"127.0.0.1:{backend.port}".encode()


# Transfer codings of responses.

def test_a_close_delimited_response_with_codings_is_passed_on_as_it_is(tier, backend):
    def gzip_until_close(request):
        def send(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZIPPED-BYTES")
            conn.shutdown(socket.SHUT_WR)
        return send
    backend.answer = gzip_until_close
    reply = exchange(tier.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: gzip" in head, reply
    assert b"chunked" not in head and b"Connection: close" in head
    assert body == b"GZIPPED-BYTES<closed>"


def test_codings_before_chunked_are_kept(tier, backend):
    backend.answer = lambda r: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                b"5\r\nGZIPD\r\n0\r\n\r\n")
    reply = exchange(tier.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: gzip, chunked" in head, reply
    assert body == b"5\r\nGZIPD\r\n0\r\n\r\n<closed>"


def test_request_codings_before_chunked_are_forwarded(tier, backend):
    reply = exchange(tier.port, b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked"
                                b"\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    (request,) = backend.requests
    assert request.header(b"Transfer-Encoding") == b"gzip, chunked" and request.body == b"abc"


# Time limits.

def test_a_backend_stalling_mid_body_is_cut_after_the_backend_timeout(tier, backend):
    def stall(request):
        def send(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
            time.sleep(6)
        return send
    backend.answer = stall
    started = time.monotonic()
    reply = exchange(tier.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=8)
    # The client is told the response is cut (the connection ends) well before the stall does.
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith((b"<closed>", b"<reset>")), reply
    assert time.monotonic() - started < 4


def test_a_refused_request_behind_another_is_answered_in_turn_and_its_body_never_forwarded(tier,
                                                                                          backend):
    slow = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfirst\n"

    def later(request):
        def send(conn):
            time.sleep(0.3)  # the refused request is parsed while this one is in flight
            conn.sendall(slow)
        return send
    backend.answer = later
    hidden = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = exchange(tier.port, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(hidden), hidden))
    first, refused = reply.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and first.endswith(b"first\n"), reply
    assert refused.startswith(b"400") and refused.endswith(b"<closed>"), reply
    assert [r.url for r in backend.requests] == [b"/first"]
    assert b"/smuggled" not in received(backend)


# Request bodies found malformed after their head went to the backend.

CHUNKED_HEAD = (b"POST /broken HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("body, code", [
    (b"5\r\nhello\r\nffffffffffffffffff1\r\n", b"400"),  # chunk size overflows
    (b"5\nhello\r\n", b"400"),  # bare LF after the chunk size
    (b"5\r\nhelloXX0\r\n\r\n", b"400"),  # chunk data without its CRLF
    (b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", b"400"),  # framing in the trailer
    (b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
], ids=["overflow", "bare-lf", "no-crlf", "trailer-cl", "trailer-te"])
def test_a_malformed_chunked_body_is_answered_at_once_and_both_sides_close(tier, backend, body,
                                                                          code):
    with socket.create_connection(("127.0.0.1", tier.port), timeout=5) as s:
        s.sendall(CHUNKED_HEAD)
        wait_for(lambda: b"/broken" in received(backend), timeout=3, what="the head forwarded")
        started = time.monotonic()
        s.sendall(body)
        reply = read_to_close(s)
    assert reply.startswith(b"HTTP/1.1 " + code) and reply.endswith(b"<closed>"), reply
    assert time.monotonic() - started < 2  # not the idle timeout (60 s)
    # The backend connection that had the head is closed too, and its slot is free.
    wait_for(lambda: backend.closed_after(b"/broken"), timeout=3,
             what="the backend connection to close")
    wait_for(lambda: tier.active() == 0, timeout=3, what="the backend's slot back")


def read_to_close(s) -> bytes:
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except socket.timeout:
        return got
    return got + b"<closed>"


def test_an_unknown_coding_alone_is_501_and_never_forwarded(tier, backend):
    reply = exchange(tier.port, b"POST /gz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                                b"\r\nabc", timeout=5)
    assert reply.startswith(b"HTTP/1.1 501") and reply.endswith(b"<closed>"), reply
    assert not backend.requests and b"/gz" not in received(backend)
