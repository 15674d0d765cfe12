"""Autoscaling with real parts: Redis, twistd proxies publishing load, dockpart-web instances
spawned by a real dockpart-infra (process driver), and load through the proxy on /work?ms=N.
"""

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from dockpart import keys, load
from dockpart.records import read_load_reports as read_reports
from helpers import (Daemon, SyncRedis, entries, free_port, kill_instances, port_block,
                     start_web, wait_for)
from proxykit import Backend


def reports(client) -> list[dict]:
    return asyncio.run(read_reports(SyncRedis(client), time.time()))


def inflight(client, url: str) -> int:
    return load.merge(reports(client)).get(url, {}).get("inflight", 0)


def start_proxy(redis_url: str, *args: str) -> Daemon:
    port = free_port()
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, *args, ready="dockpart-proxy listening on").start()
    daemon.base = f"http://127.0.0.1:{port}"
    return daemon


class LoadGenerator:
    """``clients`` threads, each sending GET ``path`` one after another; counts failures."""

    def __init__(self, base: str, path: str, clients: int):
        self.base, self.path = base, path
        self.stopping = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self):
        with requests.Session() as session:
            while not self.stopping.is_set():
                try:
                    reply = session.get(self.base + self.path, timeout=30)
                    good = reply.status_code == 200
                    what = f"{reply.status_code} {reply.text[:80]!r}"
                except requests.RequestException as e:
                    good, what = False, repr(e)
                with self.lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failures.append(what)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(40)


def test_two_proxies_figures_add_up_and_a_stopped_proxy_no_longer_counts(redis_db, redis_server):
    backend = Backend(free_port(), "slow").start()
    proxies = []
    generators = []
    try:
        redis_db.rpush(keys.SERVERS, backend.url)
        admin = free_port()
        proxies = [start_proxy(redis_server.url, "--admin", f"tcp:{admin}:interface=127.0.0.1"),
                   start_proxy(redis_server.url)]
        generators = [LoadGenerator(proxies[0].base, "/slow?s=20", 3),
                      LoadGenerator(proxies[1].base, "/slow?s=20", 2)]
        wait_for(lambda: inflight(redis_db, backend.url) == 5, 10, what="5 in flight in all")
        assert len(reports(redis_db)) == 2
        shown = requests.get(f"http://127.0.0.1:{admin}/status", timeout=5).json()["load"]
        assert shown["backends"][backend.url]["inflight"] == 3  # what it published
        assert shown["proxy"].endswith(f":{proxies[0].proc.pid}")
        proxies[1].stop(signal.SIGKILL)
        wait_for(lambda: inflight(redis_db, backend.url) == 3, load.REPORT_TTL + 3,
                 what="the stopped proxy's figures to expire")
        assert len(reports(redis_db)) == 1
    finally:
        for proxy in proxies:
            proxy.stop(signal.SIGKILL)
        for generator in generators:
            generator.stopping.set()
        backend.stop()


def test_work_answers_after_n_ms_without_blocking_and_refuses_bad_n(redis_db, redis_server):
    web = start_web(redis_server.url)
    try:
        for bad in ("-1", "abc", "10001", "1.5", ""):
            assert requests.get(f"{web.base}/work?ms={bad}", timeout=5).status_code == 400, bad
        done = {}
        slow = threading.Thread(target=lambda: done.setdefault(
            "reply", requests.get(f"{web.base}/work?ms=3000", timeout=10)))
        slow.start()
        wait_for(lambda: requests.get(f"{web.base}/work?ms=0", timeout=5).status_code == 200,
                 5, what="a quick answer while a long /work is pending")
        assert "reply" not in done  # the reactor answered others during the long one
        slow.join(10)
        assert done["reply"].status_code == 200 and done["reply"].text == "worked 3000 ms\n"
        # From sending the request to its answer's head, so never less than the work.
        assert done["reply"].elapsed.total_seconds() >= 3
    finally:
        web.stop()


def start_infra(redis_url: str, state_dir: Path, first: int, *args: str) -> Daemon:
    return Daemon("dockpart-infra", "--driver", "process", "--redis", redis_url,
                  "--state-dir", str(state_dir), "--first-port", str(first),
                  "--port-range", f"{first + 1}-{first + 9}", "--interval", "0.05",
                  "--drain", "1", "--reconcile-interval", "1", "--spawn-timeout", "20",
                  "--lease", "2", "--autoscale", "--evaluate-interval", "0.5",
                  "--target-inflight", "2", "--scale-up-cooldown", "1", *args,
                  ready="dockpart-infra started").start()


@pytest.fixture
def tier(redis_db, redis_server, tmp_path):
    """The first web instance, a proxy, and what a test's infra spawns (killed at the end)."""
    first = port_block(10)
    web = start_web(redis_server.url, "--first-port", str(first), port=first)
    wait_for(lambda: redis_db.lrange(keys.SERVERS, 0, -1) == [f"http://127.0.0.1:{first}"], 10,
             what="the first instance to register")
    proxy = start_proxy(redis_server.url)
    daemons = []
    try:
        yield first, proxy, daemons, tmp_path
    finally:
        for daemon in daemons:
            daemon.stop()
        proxy.stop()
        web.stop()
        kill_instances(tmp_path)


def test_load_scales_up_to_max_then_back_to_min_with_no_failed_request(redis_db, redis_server,
                                                                       tier):
    first, proxy, daemons, state_dir = tier
    daemons.append(start_infra(redis_server.url, state_dir, first, "--max-instances", "3",
                               "--scale-down-window", "4"))
    most = []
    heavy = LoadGenerator(proxy.base, "/work?ms=200", 12)  # 12 in flight, target 2 each: wants 6
    try:
        wait_for(lambda: redis_db.llen(keys.SERVERS) == 3, 40, what="3 instances in servers")
        end = time.monotonic() + 3  # held: the max is not passed
        while time.monotonic() < end:
            most.append(entries(redis_db, keys.SERVERS, keys.SPAWN_QUEUE, keys.SPAWNING))
            time.sleep(0.1)
        assert max(most) == 3
    finally:
        heavy.stop()
    light = LoadGenerator(proxy.base, "/work?ms=20", 1)  # goes on through every drain
    try:
        wait_for(lambda: redis_db.lrange(keys.SERVERS, 0, -1) == [f"http://127.0.0.1:{first}"]
                 and not redis_db.llen(keys.DESTROYING), 4 + 2 + 15,
                 what="back to the first instance alone, destroys drained")
    finally:
        light.stop()
    assert heavy.ok > 50 and light.ok > 10
    assert heavy.failures == [] and light.failures == []
    assert redis_db.llen(keys.DEAD_LETTERS) == 0
    listing = requests.get(f"http://127.0.0.1:{first}/listservers",
                           headers={"accept": "application/json"}, timeout=5).json()
    actions = [d["action"] for d in listing["autoscale"]["decisions"]]
    assert "up" in actions and "down" in actions
    assert listing["autoscale"]["desired"] == 1
    up = next(d for d in listing["autoscale"]["decisions"] if d["action"] == "up")
    assert "in flight each (target 2) -> " in up["reason"]
    html = requests.get(f"http://127.0.0.1:{first}/listservers", timeout=5).text
    assert "Desired size: <b>1</b>" in html and up["reason"].split(" -> ")[0] in html
    assert "autoscale up: " in daemons[0].output()


def test_infra_killed_mid_spawn_and_restarted_neither_loses_nor_repeats_it(redis_db,
                                                                         redis_server, tier):
    first, proxy, daemons, state_dir = tier
    # 8 in flight at 4 each wants 2 instances; the max (4) would allow a repeated spawn.
    args = ("--max-instances", "4", "--target-inflight", "4", "--scale-down-window", "600")
    daemons.append(start_infra(redis_server.url, state_dir, first, *args))
    heavy = LoadGenerator(proxy.base, "/work?ms=200", 8)
    try:
        wait_for(lambda: entries(redis_db, keys.SPAWN_QUEUE, keys.SPAWNING), 20,
                 interval=0.01, what="a spawn requested by the autoscaler")
        daemons[0].stop(signal.SIGKILL)  # before the instance answers and joins servers
        assert redis_db.llen(keys.SERVERS) == 1
        daemons.append(start_infra(redis_server.url, state_dir, first, *args))
        second = f"http://127.0.0.1:{first + 1}"
        wait_for(lambda: redis_db.lrange(keys.SERVERS, 0, -1)
                 == [f"http://127.0.0.1:{first}", second], 40, what="the spawn finished")
        # The restarted infra goes on deciding under the same load, and holds.
        wait_for(lambda: "autoscale hold" in daemons[1].output(), 20, what="a decision to hold")
    finally:
        heavy.stop()
    assert redis_db.llen(keys.SPAWN_QUEUE) + redis_db.llen(keys.SPAWNING) == 0
    assert redis_db.llen(keys.DEAD_LETTERS) == 0
    logs = daemons[0].output() + daemons[1].output()
    assert {line.split("starting ")[1].split(" for ")[1] for line in logs.splitlines()
            if "starting " in line and " for http" in line} == {second}
    assert len(list(state_dir.glob("dockpart-web-*.log"))) == 1


def forge_report(client, name: str, body: dict | str, at: float) -> None:
    """A load report as anyone with the Redis password can write one."""
    client.set(keys.proxy_load(name), body if isinstance(body, str) else json.dumps(body))
    client.zadd(keys.LOAD_PROXIES, {name: at})


def first_decision(daemon: Daemon) -> str:
    wait_for(lambda: "autoscale up" in daemon.output() or "autoscale hold" in daemon.output(),
             20, what="the autoscaler's first decision")
    return next(line for line in daemon.output().splitlines()
                if "autoscale up" in line or "autoscale hold" in line)


def test_a_load_report_dated_in_the_future_moves_nothing(redis_db, redis_server, tier):
    """1000 in flight dated 11 days ahead once drove the tier to its max and held it there."""
    first, proxy, daemons, state_dir = tier
    ahead = time.time() + 11 * 86400
    forge_report(redis_db, "forged:1", {"proxy": "forged:1", "time": ahead, "interval": 1.0,
                                        "list": keys.SERVERS, "backends": {
                                            f"http://127.0.0.1:{first}": {"inflight": 1000}}},
                 ahead)
    daemons.append(start_infra(redis_server.url, state_dir, first, "--max-instances", "3"))
    assert "autoscale hold" in first_decision(daemons[0])
    assert entries(redis_db, keys.SPAWN_QUEUE, keys.SPAWNING) == 0
    assert "skipping a bad load report" in daemons[0].output()
    assert "in the future" in daemons[0].output()


def test_a_malformed_load_report_is_skipped_and_the_others_still_count(redis_db, redis_server,
                                                                       tier):
    """Before, one such row (kept fresh by whoever writes it) made every evaluation fail."""
    first, proxy, daemons, state_dir = tier
    stop = threading.Event()

    def keep_writing():
        while not stop.is_set():
            forge_report(redis_db, "forged:2", {"proxy": "forged:2", "time": time.time(),
                                                "backends": {"http://127.0.0.1:1": {
                                                    "inflight": "many"}}}, time.time())
            stop.wait(0.2)
    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    heavy = LoadGenerator(proxy.base, "/work?ms=300", 6)  # the real proxy's figures: 6 in flight
    try:
        daemons.append(start_infra(redis_server.url, state_dir, first, "--max-instances", "3"))
        wait_for(lambda: "autoscale up" in daemons[0].output(), 20, what="a scale-up")
    finally:
        heavy.stop()
        stop.set()
        writer.join(5)
    assert "skipping a bad load report" in daemons[0].output()
