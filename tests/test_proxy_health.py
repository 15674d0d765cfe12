"""A hung instance leaves the rotation fast: real twistd proxy, redis-server, and backend
processes, one of them frozen with SIGSTOP (the kernel still accepts its connections)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from helpers import Daemon, RedisProcess, free_port, wait_for
from proxykit import Backend

KEY = "health:servers"


@pytest.fixture
def tier():
    redis = RedisProcess().start()
    backends = [Backend(free_port(), f"b{i}").start() for i in range(3)]
    redis.client().rpush(KEY, *[b.url for b in backends])
    port, admin = free_port(), free_port()
    proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--admin", f"tcp:{admin}:interface=127.0.0.1", "--redis", redis.url,
                   "--servers-key", KEY, "--health-path", "/", "--health-interval", "0.5",
                   "--try-timeout", "1", "--down-time", "30",
                   ready="dockpart-proxy listening on").start()
    proxy.url = f"http://127.0.0.1:{port}"
    proxy.status = lambda: {b["url"]: b for b in requests.get(
        f"http://127.0.0.1:{admin}/", timeout=5).json()["backends"]}
    try:
        yield proxy, backends
    finally:
        proxy.stop()
        for b in backends:
            if b.proc is not None:
                os.killpg(b.proc.pid, signal.SIGCONT)
            b.stop()
        redis.stop()


def test_a_frozen_instance_is_skipped_marked_down_and_back_once_it_answers(tier):
    proxy, backends = tier
    frozen = backends[1]
    with requests.Session() as session:
        assert {session.get(proxy.url + "/", timeout=5).text.split()[0] for _ in range(6)} == \
            {"b0", "b1", "b2"}
        os.killpg(frozen.proc.pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            slowest = 0.0
            names, met = [], []
            # Requests go on while it is frozen: the one that meets it gets 504 after one try
            # and a half (it may be running it: never sent twice), the rest avoid it.
            for i in range(12):
                started = time.monotonic()
                r = session.get(proxy.url + f"/r{i}", timeout=10)
                slowest = max(slowest, time.monotonic() - started)
                if r.status_code == 504:
                    met.append(i)
                else:
                    assert r.status_code == 200
                    names.append(r.text.split()[0])
            assert "b1" not in names and len(met) <= 1 and slowest < 2.5, (names, met, slowest)
            wait_for(lambda: not proxy.status()[frozen.url]["healthy"], timeout=3,
                     what="the frozen instance to be marked down")
            assert time.monotonic() - stopped < 3
        finally:
            os.killpg(frozen.proc.pid, signal.SIGCONT)
        # Down for 30 s by passive health, but the health check sees it answer again.
        wait_for(lambda: proxy.status()[frozen.url]["healthy"], timeout=3,
                 what="the thawed instance to be healthy again")
        wait_for(lambda: "b1" in {session.get(proxy.url + "/", timeout=5).text.split()[0]
                                  for _ in range(3)}, timeout=3, what="b1 back in rotation")

