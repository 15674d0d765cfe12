"""Scale to zero on real parts: an app at zero instances gets its requests held by the proxy
while dockpart-infra (process driver) starts one, within bounds (real Redis, daemons, sockets)."""

import json
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from dashboardkit import managed, stop_managed
from dockpart import keys
from helpers import Daemon, free_port, port_block, wait_for
from test_apps import HELLO, dockpart_apps, serving

APP_PORTS = 12


def slow(name: str, delay: float) -> str:
    """examples/hello, listening only ``delay`` seconds after it was started."""
    return f"sleep {delay}; exec {sys.executable} {HELLO} {name}"


class Tier:
    """An infra (process driver) and proxies on a Redis of the test's own."""

    def __init__(self, redis, tmp_path):
        self.redis = redis
        self.low = port_block(APP_PORTS)
        self.state = tmp_path / "state"
        self.seed_port = free_port()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.daemons: list[Daemon] = []

    def infra(self) -> Daemon:
        d = Daemon("dockpart-infra", "--driver", "process", "--redis", self.redis.url,
                   "--state-dir", str(self.state), "--first-port", str(self.seed_port),
                   "--app-ports", f"{self.low}-{self.low + APP_PORTS - 1}", "--interval", "0.05",
                   "--drain", "0.5", "--reconcile-interval", "1", "--spawn-timeout", "20",
                   "--lease", "2", "--evaluate-interval", "0.5",
                   ready="dockpart-infra started").start()
        self.daemons.append(d)
        return d

    def proxy(self, *args: str) -> Daemon:
        """A proxy on the tier's port (SO_REUSEPORT: another may share it); ``.admin``: the
        port of its admin listener."""
        admin = free_port()
        d = Daemon("dockpart-proxy", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                   "--redis", self.redis.url, "--admin", f"tcp:{admin}:interface=127.0.0.1",
                   *args, ready="dockpart-proxy listening on").start()
        d.admin = admin
        self.daemons.append(d)
        return d

    def get(self, host: str, timeout: float = 30) -> requests.Response:
        return requests.get(self.base + "/", headers={"Host": host}, timeout=timeout)

    def zero_app(self, name: str, run: str, *more: str) -> None:
        """An app autoscaled from zero, once every proxy holds its requests."""
        assert dockpart_apps(self.redis.url, "create", name, "--command", run,
                             "--scale", "0") == 0
        assert dockpart_apps(self.redis.url, "autoscale", name, "--min", "0", "--max", "4",
                             "--target", "2", *more) == 0
        for d in self.daemons:
            if d.argv[4] == "dockpart-proxy" and d.proc.poll() is None:
                wait_for(lambda: (hold_status(d.admin, name) or {}).get("activates"), 10,
                         what=f"the proxy to hold {name}'s requests")

    def running(self, name: str) -> dict:
        return managed(self.state / "apps" / name)

    def close(self):
        for d in reversed(self.daemons):
            d.stop()
        for app_dir in (self.state / "apps").glob("*"):
            stop_managed(app_dir)


@pytest.fixture
def zero(own_redis, tmp_path):
    tier = Tier(own_redis, tmp_path)
    yield tier
    tier.close()


def hold_status(admin_port: int, name: str) -> dict | None:
    status = requests.get(f"http://127.0.0.1:{admin_port}/", timeout=5).json()
    app = status["apps"].get(name)
    return app["hold"] if app else None


def held(admin_port: int, name: str) -> int:
    return (hold_status(admin_port, name) or {}).get("held", 0)


def burst(tier: Tier, host: str, n: int, timeout: float = 30) -> list:
    """``n`` requests at once; each one's status and text, or the exception."""
    def one(_):
        try:
            r = tier.get(host, timeout)
            return r.status_code, r.text, r.headers.get("Retry-After")
        except requests.RequestException as e:
            return 0, repr(e), None
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_burst_at_zero_is_held_all_answered_instances_grow_then_back_to_zero(zero):
    zero.infra()
    zero.proxy()
    zero.zero_app("burst", slow("burst", 1.5), "--scale-to-zero-after", "3")
    assert zero.running("burst") == {}
    counts = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            counts.append(len(serving(zero.redis, "burst")))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    answers = burst(zero, "burst.localhost", 50)
    assert [a for a in answers if a[0] != 200] == []
    assert all(text.startswith("burst on port") for _, text, _ in answers)
    # The held load asked for more than one instance, not one after another.
    wait_for(lambda: max(counts) >= 2, 20, what="instances grow for the held load")
    watching.set()
    watcher.join(5)
    # Idle for --scale-to-zero-after: drained to zero, processes gone.
    wait_for(lambda: serving(zero.redis, "burst") == [] and zero.running("burst") == {}, 90,
             what="back to zero")
    assert zero.redis.client().hget(keys.app_record("burst"), "desired") == "0"
    assert not zero.redis.client().exists(keys.app_activation("burst"))
    # And from zero again.
    assert zero.get("burst.localhost").status_code == 200


def test_the_bounds_overflow_timeout_and_a_client_that_leaves(zero):
    zero.infra()
    admin = zero.proxy("--hold-max", "2", "--hold-timeout", "1.5").admin
    zero.zero_app("late", slow("late", 30))
    # A client that leaves is dropped from the queue.
    raw = socket.create_connection(("127.0.0.1", zero.port))
    raw.sendall(b"GET / HTTP/1.1\r\nHost: late.localhost\r\n\r\n")
    wait_for(lambda: held(admin, "late") == 1, 5, what="one request held")
    raw.close()
    wait_for(lambda: held(admin, "late") == 0, 5, what="the request of a client gone dropped")
    # Three at once with --hold-max 2: one 503 at once, two 503 after --hold-timeout.
    started = time.monotonic()
    answers = sorted(burst(zero, "late.localhost", 3))
    assert [a[0] for a in answers] == [503, 503, 503]
    assert [a[2] for a in answers] == ["1", "1", "1"]  # Retry-After
    texts = sorted(text for _, text, _ in answers)
    assert texts == ["the app did not start in time\n"] * 2 + ["the app has no instance running\n"]
    assert 1.4 < time.monotonic() - started < 10
    metrics = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
    assert 'dockpart_proxy_app_hold_refused_total{app="late",reason="overflow"} 1' in metrics
    assert 'dockpart_proxy_app_hold_refused_total{app="late",reason="timeout"} 2' in metrics
    # The activation asked once, however many requests were held.
    assert zero.redis.client().exists(keys.app_activation("late"))
    assert len(zero.running("late")) == 1


def test_an_app_that_fails_to_start_gets_503_promptly_and_is_tried_again_after_a_backoff(zero):
    zero.infra()
    zero.proxy()
    zero.zero_app("broken", "exit 3")
    client = zero.redis.client()
    started = time.monotonic()
    answer = zero.get("broken.localhost")
    assert answer.status_code == 503 and answer.text == "the app failed to start\n"
    assert time.monotonic() - started < 10
    assert int(answer.headers["Retry-After"]) >= 1
    letters = [json.loads(x) for x in client.lrange(keys.DEAD_LETTERS, 0, -1)]
    assert [x["queue"] for x in letters] == ["spawn"]
    assert client.hget(keys.app_record("broken"), "desired") == "0"
    assert not client.exists(keys.app_activation("broken"))
    # Within the backoff: refused at once, nothing asked.
    again = zero.get("broken.localhost")
    assert again.status_code == 503 and again.text == "the app has no instance running\n"
    assert client.llen(keys.DEAD_LETTERS) == 1
    # After it, the next request asks again (and fails again).
    wait_for(lambda: zero.get("broken.localhost").text == "the app failed to start\n", 20,
             what="a second try after the backoff")
    assert client.llen(keys.DEAD_LETTERS) == 2


def test_infra_killed_during_an_activation_neither_loses_nor_doubles_the_spawn(zero):
    infra = zero.infra()
    zero.proxy()
    zero.zero_app("phoenix", slow("phoenix", 1.5), "--target", "10")  # 3 held ask for one
    client = zero.redis.client()
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(zero.get, "phoenix.localhost") for _ in range(3)]
        wait_for(lambda: zero.running("phoenix"), 10, what="the spawn under way")
        infra.stop(signal.SIGKILL)
        assert client.exists(keys.app_activation("phoenix"))  # not served yet: kept
        zero.infra()
        answers = [f.result() for f in waiting]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert len(set(a.text for a in answers)) == 1  # one instance served them all
    wait_for(lambda: not client.exists(keys.app_activation("phoenix")), 10,
             what="the activation served")
    assert len(serving(zero.redis, "phoenix")) == 1
    assert len(zero.running("phoenix")) == 1
    assert client.hget(keys.app_record("phoenix"), "desired") == "1"


def test_a_proxy_restart_while_requests_are_held_loses_none(zero):
    zero.infra()
    old = zero.proxy()
    admin = old.admin
    zero.zero_app("calm", slow("calm", 2), "--target", "10")
    with ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(zero.get, "calm.localhost") for _ in range(4)]
        wait_for(lambda: held(admin, "calm") == 4, 10, what="4 requests held")
        new = zero.proxy()  # on the same port: it takes the new connections
        old.stop()  # SIGTERM: the old proxy drains, its held requests still go on
        answers = [f.result() for f in waiting]
    assert [a.status_code for a in answers] == [200] * 4
    assert zero.get("calm.localhost").status_code == 200
    assert "activated in" in old.output() and new.proc.poll() is None
    assert len(zero.running("calm")) == 1


def test_two_proxies_holding_requests_at_once_ask_for_one_activation(zero):
    infra = zero.infra()
    first, second = zero.proxy(), zero.proxy()  # one port (SO_REUSEPORT): both take requests
    zero.zero_app("twice", slow("twice", 1), "--target", "100")  # 20 held ask for one
    answers = burst(zero, "twice.localhost", 20)
    assert [a for a in answers if a[0] != 200] == []
    held_by = [hold_status(p.admin, "twice")["activations"] for p in (first, second)]
    assert sorted(held_by) in ([0, 1], [1, 1])  # the kernel may give one proxy them all
    assert infra.output().count("activating twice from zero") == 1
    assert len(zero.running("twice")) == 1
