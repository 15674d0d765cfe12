"""No request runs twice because of the proxy (dockpart.proxy_retry): a real twistd proxy with
the shipped --try-timeout, a real redis-server, and two recording backends."""

import socket
import threading
import time

import pytest

from helpers import Daemon, RedisProcess, free_port, wait_for
from proxykit import RawBackend, exchange

KEY = "retry:servers"


@pytest.fixture(scope="module")
def tier():
    redis = RedisProcess().start()
    backends = [RawBackend(), RawBackend()]
    redis.client().rpush(KEY, *[b.url for b in backends])
    port = free_port()
    proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--redis", redis.url, "--servers-key", KEY, "--try-timeout", "1",
                   "--backend-timeout", "6", ready="dockpart-proxy listening on").start()
    proxy.port = port
    try:
        yield proxy, backends
    finally:
        proxy.stop()
        for b in backends:
            b.close()
        redis.stop()


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
    met it gets 504 within ~1.5 s and is not run elsewhere; the next requests avoid it."""
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
