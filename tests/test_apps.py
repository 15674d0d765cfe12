"""Apps end to end on real parts: ``dockpart apps``, dockpart-infra's process driver running
examples/hello, and dockpart-proxy routing by Host (real Redis, daemons, sockets)."""

import os
import signal
import sys
import threading
import time
from collections import Counter

import pytest
import requests

from dashboardkit import managed, stop_managed
from dockpart import keys
from dockpart.deploy.cli import main
from helpers import ROOT, start_apps_infra, start_proxy, wait_for

HELLO = ROOT / "examples" / "hello" / "app.py"
APP_PORTS = 8  # the apps' port range in these tests


def dockpart_apps(redis_url: str, *args: str) -> int:
    return main(["apps", *args, "--redis", redis_url])


def command(name: str) -> str:
    return f"{sys.executable} {HELLO} {name}"


def apps_tier(redis, tmp_path, drain: str, spawn_timeout: str):
    """An infra (process driver) and a proxy on ``redis``, for a fixture to ``yield from``;
    the apps' instances are stopped at the end."""
    state = tmp_path / "state"
    infra = start_apps_infra(redis.url, "--state-dir", str(state), "--drain", drain,
                             "--reconcile-interval", "1", "--spawn-timeout", spawn_timeout,
                             "--lease", "2", app_ports=APP_PORTS)
    proxy = start_proxy(redis.url)
    yield redis, infra, proxy, state
    proxy.stop()
    infra.stop()
    for app_dir in (state / "apps").glob("*"):
        stop_managed(app_dir)


@pytest.fixture
def tier(own_redis, tmp_path):
    """An infra (process driver) and a proxy on a Redis of the test's own."""
    yield from apps_tier(own_redis, tmp_path, drain="1", spawn_timeout="20")


def get(proxy, host: str, path: str = "/") -> requests.Response:
    return requests.get(proxy.base + path, headers={"Host": host}, timeout=5)


class Loop:
    """Requests to one Host, one after another, until stopped; counts answers and failures."""

    def __init__(self, proxy, host: str):
        self.proxy, self.host = proxy, host
        self.answers: Counter = Counter()
        self.failed: list[str] = []
        self.failed_started: list[float] = []  # when each failed request was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                r = get(self.proxy, self.host)
                if r.status_code == 200:
                    self.answers[r.text.strip()] += 1
                    continue
                self.failed.append(f"{r.status_code} {r.text.strip()}")
            except requests.RequestException as e:
                self.failed.append(repr(e))
            self.failed_started.append(started)

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def serving(redis, name: str) -> list[str]:
    return redis.client().lrange(keys.app_tier(name).servers, 0, -1)


def test_two_apps_side_by_side_routed_by_host_scaled_1_3_1_with_no_failed_request(tier):
    redis, infra, proxy, state = tier
    assert dockpart_apps(redis.url, "create", "shop", "--command", command("shop")) == 0
    assert dockpart_apps(redis.url, "create", "blog", "--command", command("blog"),
                         "--domain", "blog.example.org") == 0
    wait_for(lambda: get(proxy, "shop.localhost").status_code == 200, 30, what="shop serves")
    wait_for(lambda: get(proxy, "blog.example.org:80").status_code == 200, 30,
             what="blog serves")
    shop, blog = Loop(proxy, "shop.localhost"), Loop(proxy, "BLOG.localhost")
    try:
        assert dockpart_apps(redis.url, "scale", "shop", "3") == 0
        wait_for(lambda: len(serving(redis, "shop")) == 3, 30, what="3 shop instances")
        wait_for(lambda: len(shop.answers) == 3, 10, what="answers from 3 shop instances")
        assert dockpart_apps(redis.url, "scale", "shop", "1") == 0
        wait_for(lambda: len(serving(redis, "shop")) == 1, 30, what="1 shop instance")
        wait_for(lambda: len(managed(state / "apps" / "shop")) == 1, 20,
                 what="2 shop processes stopped")
        before = sum(shop.answers.values())
        wait_for(lambda: sum(shop.answers.values()) > before + 10, 10, what="more answers")
    finally:
        shop.stop()
        blog.stop()
    assert shop.failed == [] and blog.failed == []
    assert all(text.startswith("shop on port") for text in shop.answers)
    assert all(text.startswith("blog on port") for text in blog.answers)
    assert len(blog.answers) == 1
    # Ports from one range, never shared, given back when their instance is gone.
    wait_for(lambda: sorted(redis.client().hgetall(keys.APP_PORTS).values()) == ["blog", "shop"],
             5, what="the ports of stopped instances given back")
    # Any other Host is the seed's, as before (here: no seed instance).
    assert get(proxy, "127.0.0.1").status_code == 503


def test_an_app_with_no_instance_answers_503_with_retry_after(tier):
    redis, infra, proxy, state = tier
    assert dockpart_apps(redis.url, "create", "idle", "--command", command("idle"),
                         "--scale", "0") == 0
    # Until the proxy has the app's route, the Host is the seed's: a 503 too, with no seed
    # instance, but without Retry-After; wait for the app's.
    wait_for(lambda: "no instance" in get(proxy, "idle.localhost").text, 10,
             what="the app's 503")
    answer = get(proxy, "idle.localhost")
    assert answer.headers["Retry-After"] == "1"
    assert "no instance" in answer.text
    assert managed(state / "apps" / "idle") == {}


def test_destroy_removes_the_routes_the_instances_and_the_records(tier):
    redis, infra, proxy, state = tier
    assert dockpart_apps(redis.url, "create", "gone", "--command", command("gone"),
                         "--scale", "2") == 0
    wait_for(lambda: len(serving(redis, "gone")) == 2, 30, what="2 instances")
    assert get(proxy, "gone.localhost").text.startswith("gone on port")
    assert dockpart_apps(redis.url, "destroy", "gone") == 0
    # The route goes at once: the Host is the seed's again (no seed instance: 503).
    wait_for(lambda: get(proxy, "gone.localhost").status_code == 503, 5, what="route gone")
    assert "Retry-After" not in get(proxy, "gone.localhost").headers
    wait_for(lambda: managed(state / "apps" / "gone") == {}, 30, what="instances stopped")
    client = redis.client()
    wait_for(lambda: not client.keys("dockpart:app*"), 10, what="records forgotten")


def test_a_killed_instance_costs_at_most_the_request_it_was_answering(tier):
    """SIGKILL can land between an instance's response head and its body: no proxy can finish
    that answer (nginx and HAProxy close the client too).  The loop sends one request at a
    time, so at most one request, sent before the kill, may fail; none sent after it."""
    redis, infra, proxy, state = tier
    assert dockpart_apps(redis.url, "create", "tough", "--command", command("tough"),
                         "--scale", "2") == 0
    wait_for(lambda: len(serving(redis, "tough")) == 2, 30, what="2 instances")
    loop = Loop(proxy, "tough.localhost")
    try:
        wait_for(lambda: len(loop.answers) == 2, 10, what="answers from both")
        port, pids = sorted(managed(state / "apps" / "tough").items())[0]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: f"http://127.0.0.1:{port}" not in serving(redis, "tough"), 20,
                 what="the killed instance unlisted")
        wait_for(lambda: len(serving(redis, "tough")) == 2, 30, what="a replacement serving")
        before = sum(loop.answers.values())
        wait_for(lambda: sum(loop.answers.values()) > before + 10, 10, what="more answers")
    finally:
        loop.stop()
    assert len(loop.failed) <= 1, loop.failed
    assert all(started < killed for started in loop.failed_started), loop.failed


def test_a_redis_that_lost_its_data_gets_the_apps_and_their_lists_back(tier):
    redis, infra, proxy, state = tier
    assert dockpart_apps(redis.url, "create", "kept", "--command", command("kept"),
                         "--domain", "kept.example.org") == 0
    wait_for(lambda: len(serving(redis, "kept")) == 1, 30, what="1 instance")
    running = set(managed(state / "apps" / "kept"))
    redis.client().flushall()
    wait_for(lambda: len(serving(redis, "kept")) == 1, 20, what="its list refilled")
    assert set(managed(state / "apps" / "kept")) == running  # the same instance, not a new one
    # The record comes back with the apps runner's next step (the list may come first).
    wait_for(lambda: redis.client().hget(keys.app_record("kept"), "domains")
             == "kept.example.org", 10, what="the record written back")
    assert get(proxy, "kept.example.org").text.startswith("kept on port")
