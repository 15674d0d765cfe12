"""What one client may hold of the proxy (dockpart.proxy_limits): requests in flight, time to
send a body, its share of the load the autoscaler sees, through a real twistd proxy,
redis-server and recording backend (in memory: test_proxy_exchange.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from dockpart import keys
from helpers import wait_for
from proxykit import RawTier, exchange
from test_proxy_exchange import OK


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
