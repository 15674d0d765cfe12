"""A property of dockpart-proxy's framing, tried on generated traffic (Hypothesis): requests,
well formed or mutated the ways smuggling attacks mutate them, pipelined through the real proxy
to a recording backend whose responses are also generated, some of them wrong.

Whatever the input: the backend never receives a request the client did not send as one
well-framed request (and never one hidden in another's body), and each client gets exactly the
responses to its own requests, in order, and nothing that a misbehaving backend slipped in.

And liveness: every request, well formed or not, is answered or its connection closed without
waiting for any of the proxy's timers, and no backend slot is left taken.  Once through the
real proxy (its timeouts far above how long a client waits here), once in memory, where "no
timer" is exact: nothing is answered by advancing the clock.
"""

from __future__ import annotations

import itertools
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from helpers import wait_for
from proxykit import RawTier, RequestParser
from test_proxy_exchange import URLS, Proxy

KEY = "property:servers"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Id: evil\r\n\r\n"
EVIL = b"HTTP/1.1 200 OK\r\nX-Id: evil\r\nContent-Length: 4\r\n\r\nEVIL"
SHAPES = ["length", "chunked", "close", "gzip-close", "gzip-chunked", "204", "continue",
          "204+evil", "head+evil", "after+evil"]
MUTATIONS = ["none", "conn-cl", "conn-te", "conn-host", "two-hosts", "no-host", "bad-host",
             "cl+te", "te-identity", "te-xchunked", "cl-plus", "cl-list", "obs-fold", "bare-lf",
             "http2", "upgrade", "expect", "conn-other", "nul",
             "chunk-overflow", "chunk-bare-lf", "chunk-no-crlf", "trailer-cl", "te-gzip"]
#: Mutations of a chunked body, found only after the head went to the backend.
BODY_BREAKS = {"chunk-overflow", "chunk-bare-lf", "chunk-no-crlf", "trailer-cl", "te-gzip"}
_ids = itertools.count()


def answer(request) -> bytes:
    """The backend's reply, shaped as the request's X-Shape asks; each names the request."""
    rid = request.header(b"X-Id") or b"?"
    shape = (request.header(b"X-Shape") or b"length").decode()
    body = b"id=%s;got=%d" % (rid, len(request.body))
    head = b"HTTP/1.1 200 OK\r\nX-Id: " + rid + b"\r\n"
    if shape == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    if shape in ("close", "gzip-close"):
        coded = b"Transfer-Encoding: gzip\r\n" if shape == "gzip-close" else b""

        def send(conn):
            conn.sendall(head + coded + b"\r\n" + body)
            conn.shutdown(socket.SHUT_RDWR)
        return send
    if shape == "gzip-chunked":
        return head + b"Transfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), body)
    if shape == "204":
        return b"HTTP/1.1 204 No Content\r\nX-Id: " + rid + b"\r\n\r\n"
    if shape == "204+evil":
        return b"HTTP/1.1 204 No Content\r\nX-Id: " + rid + b"\r\n\r\n" + EVIL
    if shape == "head+evil" and request.method == b"HEAD":
        return head + b"Content-Length: %d\r\n\r\n%s" % (len(EVIL), EVIL)
    if shape == "continue":
        return b"HTTP/1.1 100 Continue\r\n\r\n" + head + b"Content-Length: %d\r\n\r\n%s" % (
            len(body), body)
    reply = head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    return reply + EVIL if shape == "after+evil" else reply


@pytest.fixture(scope="module")
def tier():
    # Far above TALK_WAIT: an exchange that needs one of these timers to end fails the test.
    t = RawTier(KEY, answer, "--backend-timeout", "10", "--header-timeout", "10",
                "--idle-timeout", "10")
    yield t
    t.close()


@st.composite
def requests_(draw):
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]))
    framing = draw(st.sampled_from(["none", "length", "chunked"]) if method in (b"POST", b"PUT")
                   else st.just("none"))
    body = draw(st.binary(max_size=40)) if framing != "none" else b""
    return {"method": method, "framing": framing, "body": body,
            "shape": draw(st.sampled_from(SHAPES)),
            "mutation": draw(st.sampled_from(MUTATIONS)),
            "version": draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])),
            "chunks": draw(st.integers(1, 3))}


#: Mutations after which the request is still one well-framed request, with the same meaning.
HARMLESS = {"none", "expect", "conn-other", "upgrade"}


def encode(r: dict, rid: bytes, last: bool) -> bytes:
    """The request as bytes, mutated as ``r["mutation"]`` says; sets ``r["mutated"]`` when
    the mutation applied (some need a body of a certain framing) and is not harmless."""
    mutation = r["mutation"]
    r["mutated"] = mutation not in HARMLESS and (
        mutation not in ("te-identity", "te-xchunked") or r["framing"] == "chunked") and (
        mutation not in ("cl-plus", "cl-list") or r["framing"] == "length") and (
        mutation != "no-host" or r["version"] == b"HTTP/1.1")  # HTTP/1.0 needs no Host
    version = b"HTTP/2.0" if mutation == "http2" else r["version"]
    headers = [(b"Host", b"example.test"), (b"X-Id", rid), (b"X-Shape", r["shape"].encode())]
    body = r["body"]
    framing = r["framing"]
    if mutation in BODY_BREAKS:
        framing, body = "chunked", body or b"x"
    if mutation in ("conn-cl", "conn-te", "cl+te") and framing == "none":
        framing = "chunked" if mutation == "conn-te" else "length"
    if mutation in ("conn-cl", "conn-te", "cl+te"):
        body = body + SMUGGLED  # what a proxy framing by a header it dropped would let through
    if framing == "length":
        length = str(len(body)).encode()
        headers.append((b"Content-Length", {"cl-plus": b"+" + length,
                                            "cl-list": length + b", " + length}.get(mutation,
                                                                                     length)))
        payload = body
    elif framing == "chunked":
        te = {"te-identity": b"chunked, identity", "te-xchunked": b"xchunked",
              "te-gzip": b"gzip"}.get(mutation, b"chunked")
        headers.append((b"Transfer-Encoding", te))
        size = max(1, -(-len(body) // r["chunks"]))
        parts = [body[i:i + size] for i in range(0, len(body), size)]
        chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
        if mutation == "chunk-overflow":
            chunks.insert(-1, b"ffffffffffffffffff1\r\n")
        elif mutation == "chunk-bare-lf":
            chunks[-2] = chunks[-2].replace(b"\r\n", b"\n", 1)
        elif mutation == "chunk-no-crlf":
            chunks[-2] = chunks[-2][:-2] + b"XX"
        elif mutation == "trailer-cl":
            chunks[-1] = b"0\r\nContent-Length: 5\r\n\r\n"
        payload = b"".join(chunks)
    else:
        payload = b""
    if mutation == "cl+te":
        headers.append((b"Transfer-Encoding", b"chunked"))
    extra = {"conn-cl": [(b"Connection", b"Content-Length")],
             "conn-te": [(b"Connection", b"Transfer-Encoding")],
             "conn-host": [(b"Connection", b"Host")],
             "two-hosts": [(b"Host", b"other.test")],
             "bad-host": [],
             "obs-fold": [(b"X-Folded", b"a\r\n b")],
             "upgrade": [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
             "expect": [(b"Expect", b"100-continue")] if framing != "none" else [],
             "conn-other": [(b"Connection", b"X-Other"), (b"X-Other", b"1")],
             "nul": [(b"X-Nul", b"a\x00b")]}.get(mutation, [])
    headers += extra
    if mutation == "no-host":
        headers = [h for h in headers if h[0] != b"Host"]
    if mutation == "bad-host":
        headers = [(b"Host", b"a b/c") if h[0] == b"Host" else h for h in headers]
    if last:
        headers.append((b"Connection", b"close"))
    eol = b"\n" if mutation == "bare-lf" else b"\r\n"
    head = r["method"] + b" /p/" + rid + b" " + version + b"\r\n"
    head += b"".join(name + b": " + value + (eol if i == 0 else b"\r\n")
                     for i, (name, value) in enumerate(headers))
    data = head + b"\r\n" + payload
    if mutation == "upgrade":
        data += SMUGGLED
    return data


def read_responses(data: bytes, methods: list) -> list:
    """Split what the client received into responses (status, headers, body), the way an
    HTTP/1.1 client would, knowing which answers are to HEAD; fails on bytes it cannot frame."""
    responses = []
    pos = 0
    while pos < len(data) and len(responses) < len(methods):
        end = data.index(b"\r\n\r\n", pos)
        lines = data[pos:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if 100 <= status < 200:
            continue
        if methods[len(responses)] == b"HEAD" or status in (204, 304):
            body = b""
        elif b"transfer-encoding" in headers and headers[b"transfer-encoding"].endswith(
                b"chunked"):
            body = b""
            while True:
                line_end = data.index(b"\r\n", pos)
                size = int(data[pos:line_end], 16)
                pos = line_end + 2
                body += data[pos:pos + size]
                pos += size + 2
                if size == 0:
                    break
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            body = data[pos:pos + n]
            pos += n
        else:
            body = data[pos:]
            pos = len(data)
        responses.append((status, headers, body))
    assert pos == len(data), f"bytes no response frames: {data[pos:pos + 200]!r}"
    return responses


#: How long a client waits for each batch: well below the proxy's timeouts.
TALK_WAIT = 4.0


def talk(port: int, data: bytes, splits: list, timeout: float = TALK_WAIT) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        cuts = sorted({min(max(0, c), len(data)) for c in splits}) + [len(data)]
        at = 0
        for cut in cuts:
            try:
                s.sendall(data[at:cut])
            except OSError:
                break  # the proxy refused and closed: what it answered is still readable
            at = cut
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(f"the proxy neither answered nor closed: {got[-300:]!r}")
            if not chunk:
                break
            got += chunk
        return got


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(requests_(), min_size=1, max_size=4), st.lists(st.integers(0, 400), max_size=3))
def test_no_request_is_smuggled_and_no_response_goes_astray(tier, batch, splits):
    conn_id = next(_ids)
    ids = [b"c%d-%d" % (conn_id, i) for i in range(len(batch))]
    data = b"".join(encode(r, rid, i == len(batch) - 1)
                    for i, (r, rid) in enumerate(zip(batch, ids)))
    mine = {rid: r for rid, r in zip(ids, batch)}
    got = talk(tier.port, data, splits)  # answered or closed, with no timer needed
    wait_for(lambda: tier.active() == 0, timeout=3, what="every backend slot back")

    # The backend side: only this client's requests, each whole, in the client's order.
    with tier.backend.lock:
        seen = [q for q in tier.backend.requests
                if (q.header(b"X-Id") or b"").startswith(b"c%d-" % conn_id)
                or q.url == b"/smuggled" or q.header(b"X-Id") == b"evil"]
    order = []
    for q in seen:
        rid = q.header(b"X-Id")
        assert rid in mine and q.url == b"/p/" + rid, f"smuggled: {q.method} {q.url} {rid}"
        r = mine[rid]
        assert q.method == r["method"] and q.body == r["body"], (rid, q.body, r)
        assert not r["mutated"], f"forwarded a request mutated by {r['mutation']}"
        order.append(ids.index(rid))
    assert order == sorted(set(order))

    # The client side: one response per request in order, until the proxy closes.
    methods = [r["method"] for r in batch]
    responses = read_responses(got, methods)
    for i, (status, headers, body) in enumerate(responses):
        assert b"EVIL" not in body and headers.get(b"x-id") != b"evil", (i, status, body)
        if b"x-id" in headers:
            assert headers[b"x-id"] == ids[i], (headers[b"x-id"], ids[i])
        if headers.get(b"connection") == b"close":
            assert i == len(responses) - 1, "answers after Connection: close"


class MemoryBackend:
    """One in-memory backend connection: parses what the proxy wrote on it and answers each
    request as :func:`answer` shapes it (``sendall``/``shutdown`` stand in for the socket)."""

    def __init__(self, conn, wire):
        self.conn, self.wire = conn, wire
        self.parsed = RequestParser()
        self.dead = False

    def pump(self) -> bool:
        """Take what the proxy wrote and answer it; whether anything happened."""
        if self.dead:
            return False
        if self.wire.disconnecting:  # the proxy closed it: the close reaches it
            self.shutdown(None)
            return True
        data = self.wire.value()
        self.wire.clear()
        if not data:
            return False
        if not self.parsed.feed(data):
            self.shutdown(None)
        while self.parsed.done and not self.dead:
            reply = answer(self.parsed.done.pop(0))
            if callable(reply):
                reply(self)
            else:
                self.sendall(reply)
        return True

    def sendall(self, data: bytes) -> None:
        self.conn.dataReceived(data)

    def shutdown(self, how) -> None:
        if not self.dead:
            self.dead = True
            self.conn.connectionLost(Failure(ConnectionDone()))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(requests_(), min_size=1, max_size=4), st.lists(st.integers(0, 400), max_size=3))
def test_every_request_is_answered_or_closed_without_a_timer_and_frees_its_slot(batch, splits):
    """In memory: the traffic of the property above, read by a proxy whose clock never moves.
    Once nothing more happens, the client connection is closed (the last request asks for
    it, or a refusal did) and no backend slot is taken: nothing waits for a timer."""
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    data = b"".join(encode(r, b"m-%d" % i, i == len(batch) - 1) for i, r in enumerate(batch))
    cuts = sorted({min(max(0, c), len(data)) for c in splits} | {len(data)})
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts) if b > a]
    backends: list[MemoryBackend] = []
    moved = True
    while moved:
        moved = False
        if pieces and out.producerState == "producing" and not client.closed:
            client.dataReceived(pieces.pop(0))  # a client sends as fast as it is read
            moved = True
        while proxy._taken < proxy.attempts():
            backends.append(MemoryBackend(*proxy.backend()))
            moved = True
        for backend in backends:
            moved = backend.pump() or moved
    assert out.disconnecting, f"waits for a timer: {out.value()[-300:]!r}"
    assert proxy.backends.ring[0].active == 0
    assert proxy.factory.per_client.inflight == {}
