"""No request runs twice because of the proxy (dockpart.proxy_retry), but for routes declared
safe: a real twistd proxy with the shipped --try-timeout and --retry-safe, a real redis-server,
and two recording backends."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import helpers
from helpers import Daemon, RedisProcess, wait_for
from proxykit import RawBackend, exchange
from tierkit import SHIPPED_RETRY_SAFE

KEY = "retry:servers"


@pytest.fixture(scope="module")
def tier():
    redis = RedisProcess().start()
    backends = [RawBackend(), RawBackend()]
    redis.client().rpush(KEY, *[b.url for b in backends])
    proxy = start_proxy(redis)
    try:
        yield proxy, backends
    finally:
        proxy.stop()
        for b in backends:
            b.close()
        redis.stop()


def start_proxy(redis: RedisProcess) -> Daemon:
    proxy = helpers.start_proxy(redis.url, "--servers-key", KEY, "--try-timeout", "1",
                                "--retry-safe", SHIPPED_RETRY_SAFE, "--backend-timeout", "6")
    proxy.redis = redis
    return proxy


def urls(backend) -> list[bytes]:
    with backend.lock:
        return [r.url for r in backend.requests]


def test_a_request_slower_than_a_try_is_run_once_and_answered(tier):
    """The issue's /meow behind a Redis stall: the backend is alive (it answers other
    requests) but this one takes 2.5 s.  It is neither re-sent after the try nor cut."""
    proxy, backends = tier
    for b in backends:
        b.reset(answer=lambda r: (lambda conn: (time.sleep(2.5), conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow"))) if r.url == b"/meow"
            else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    started = time.monotonic()
    reply = exchange(proxy.port, b"GET /meow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                     timeout=8)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"slow<closed>"), reply
    assert 2.4 < time.monotonic() - started < 4
    assert sorted(urls(backends[0]) + urls(backends[1])).count(b"/meow") == 1


def test_a_request_to_a_silent_backend_gets_504_after_a_try_and_a_half_never_resent(tier):
    """A backend that reads requests but never answers (as a frozen one): the request that
    met it gets 504 within ~1.5 s and is not run elsewhere (its route is not declared safe);
    the next requests avoid it."""
    proxy, backends = tier
    release = threading.Event()
    silent, other = backends
    silent.reset(answer=lambda r: lambda conn: release.wait(10))  # the probe's too
    other.reset(answer=RawBackend().answer)
    try:
        met = None
        for i in range(4):  # the rotation sends one of the first two to the silent one
            started = time.monotonic()
            reply = exchange(proxy.port, b"GET /r%d HTTP/1.1\r\nHost: x\r\nConnection: close"
                                         b"\r\n\r\n" % i, timeout=8)
            waited = time.monotonic() - started
            if reply.startswith(b"HTTP/1.1 504"):
                assert met is None and waited < 2.5, (reply, waited)
                met = b"/r%d" % i
            else:
                assert reply.startswith(b"HTTP/1.1 200") and waited < 1, (reply, waited)
        assert met is not None and met not in urls(other)
        assert [u for u in urls(silent) if u != b"/"] == [met]  # "/": the probe
    finally:
        release.set()


def test_a_declared_route_that_met_a_silent_backend_is_sent_once_to_another_and_answered(tier):
    """A route of the shipped --retry-safe (GET /get/...) that met a backend which reads and
    never answers goes, after the 1 s try, to the other backend, once, and is answered; the
    silent one is left out.  A proxy of its own: the first has left that backend out."""
    _, backends = tier
    silent, other = backends
    release = threading.Event()
    silent.reset(answer=lambda r: lambda conn: release.wait(10))
    other.reset(answer=RawBackend().answer)
    proxy = start_proxy(tier[0].redis)
    try:
        resent = None
        for i in range(4):  # the rotation sends one of the first two to the silent one
            path = b"/get/k%d" % i
            started = time.monotonic()
            reply = exchange(proxy.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close"
                                         b"\r\n\r\n" % path, timeout=8)
            waited = time.monotonic() - started
            assert reply.startswith(b"HTTP/1.1 200") and path in reply, (reply, waited)
            if path in urls(silent):
                assert resent is None and 0.9 < waited < 2, waited
                resent = path
            else:
                assert waited < 1, waited
        assert resent is not None and urls(other).count(resent) == 1
        assert [u for u in urls(silent) if u != b"/"] == [resent]  # "/": the probe
    finally:
        release.set()
        proxy.stop()
