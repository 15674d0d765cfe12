"""What one client may hold of the proxy (dockpart.proxy_limits): requests in flight, time to
send a body, its share of the load the autoscaler sees.  In memory (MemoryReactorClock and
StringTransports) and through a real twistd proxy, redis-server and recording backend."""

import json
import socket
import threading
import time

import pytest

from dockpart import keys
from helpers import wait_for
from proxykit import RawTier, exchange
from test_proxy_exchange import OK, URLS, Proxy, sent

GET = b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n"


# In memory.

def test_a_client_past_its_requests_in_flight_gets_429_and_others_are_served():
    proxy = Proxy(urls=URLS[:1], max_inflight_per_client=2)
    busy = [proxy.client() for _ in range(2)]
    for client, _ in busy:
        client.dataReceived(GET)
    third, out = proxy.client()
    third.dataReceived(GET)
    assert out.value().startswith(b"HTTP/1.1 429") and proxy.attempts() == 2
    assert not out.disconnecting  # the request was read whole: the connection stays
    other, other_out = proxy.client(ip="10.0.0.2")
    other.dataReceived(GET)
    assert proxy.attempts() == 3
    # One answered: that client has a place again.
    conn, _ = proxy.backend()
    conn.dataReceived(OK % (2, b"ok"))
    sent(out)
    third.dataReceived(GET)
    assert proxy.attempts() == 3 and conn.exchange is not None  # the pooled connection
    assert not out.value().startswith(b"HTTP/1.1 429")


def test_places_come_back_when_a_client_goes_away_mid_request():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    proxy = Proxy(urls=URLS[:1], max_inflight_per_client=1)
    client, _ = proxy.client()
    client.dataReceived(GET)
    client.connectionLost(Failure(ConnectionDone()))
    again, out = proxy.client()
    again.dataReceived(GET)
    assert out.value() == b"" and proxy.attempts() == 2
    assert proxy.factory.per_client.inflight == {b"127.0.0.1": 1}


def test_a_trickled_body_is_cut_408_at_its_deadline_and_its_backend_slot_freed():
    proxy = Proxy(urls=URLS[:1], body_timeout=20.0, body_min_rate=500.0)
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
    conn, wire = proxy.backend()
    for _ in range(4):  # a byte every 5 s: each pause is far below the idle timeout
        proxy.later(5)
        client.dataReceived(b"x")
    assert out.value() == b""
    proxy.later(1)  # 21 s for 5 bytes: past 20 s + 5/500 s
    assert out.value().startswith(b"HTTP/1.1 408") and out.disconnecting
    assert wire.disconnecting and conn.backend.active == 0
    assert proxy.factory.per_client.inflight == {}


def test_a_body_that_keeps_its_rate_is_not_cut():
    proxy = Proxy(urls=URLS[:1], body_timeout=20.0, body_min_rate=500.0)
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n")
    conn, wire = proxy.backend()
    for _ in range(30):  # 1000 bytes a second for 30 s: slow, but above the rate
        proxy.later(1)
        client.dataReceived(b"x" * 1000)
    assert out.value() == b"" and len(sent(wire)) > 30000
    conn.dataReceived(OK % (2, b"ok"))
    assert out.value().startswith(b"HTTP/1.1 200")


def test_the_load_counts_complete_requests_and_a_few_of_each_client():
    proxy = Proxy(urls=URLS[:1], load_per_client=3)
    for _ in range(6):  # one client, six long requests
        proxy.client()[0].dataReceived(GET)
    for _ in range(2):  # and bodies trickling in
        proxy.client()[0].dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 9"
                                       b"\r\n\r\nx")
    proxy.client(ip="10.0.0.2")[0].dataReceived(GET)
    assert proxy.backends.ring[0].active == 9
    assert proxy.factory.fair_inflight() == {URLS[0]: 3 + 1}


# Through a real proxy.

@pytest.fixture(scope="module")
def tier():
    release = threading.Event()

    def answer(request):
        if request.url == b"/slow":
            return lambda conn: (release.wait(5), conn.sendall(OK % (4, b"slow")))
        return OK % (2, b"ok")
    t = RawTier("limits:servers", answer, "--max-inflight-per-client", "2",
                "--body-timeout", "1", "--body-min-rate", "100", "--load-per-client", "1")
    t.release = release
    yield t
    release.set()
    t.close()


def test_one_client_cannot_hold_more_than_its_share(tier):
    """Two slow requests in flight from this address: a third is 429 at once; the load the
    autoscaler reads counts one of them."""
    tier.release.clear()
    replies = []
    slow = [threading.Thread(target=lambda: replies.append(exchange(
        tier.port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=8)))
        for _ in range(2)]
    try:
        for t in slow:
            t.start()
        wait_for(lambda: tier.active() == 2, timeout=5, what="two requests in flight")
        started = time.monotonic()
        reply = exchange(tier.port, b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n",
                         read_until=b"address\n")
        assert reply.startswith(b"HTTP/1.1 429") and time.monotonic() - started < 1, reply
        redis = tier.redis.client()

        def reported():
            ids = redis.zrange(keys.LOAD_PROXIES, 0, -1)
            reports = [json.loads(redis.get(keys.proxy_load(i)) or "{}") for i in ids]
            return [f["inflight"] for r in reports for f in r.get("backends", {}).values()]
        wait_for(lambda: reported() == [1], timeout=5, what="a load report counting one")
    finally:
        tier.release.set()
        for t in slow:
            t.join(10)
    assert all(r.startswith(b"HTTP/1.1 200") for r in replies), replies


def test_a_trickled_body_gets_408_and_both_connections_close(tier):
    with socket.create_connection(("127.0.0.1", tier.port), timeout=6) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
        started = time.monotonic()
        got = b""
        s.settimeout(0.3)
        while time.monotonic() - started < 5:
            try:
                s.sendall(b"x")  # a byte every 0.3 s: 1 s + 1/100 s per byte is soon past
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 408"), got
    assert time.monotonic() - started < 3
    wait_for(lambda: tier.backend.closed_after(b"POST /up"), timeout=3,
             what="the backend connection to close")
    wait_for(lambda: tier.active() == 0, timeout=3, what="the backend's slot back")
