"""dockpart-infra with the process driver: real Redis, real twistd dockpart-web instances."""

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from twisted.python import usage

from dockpart import infra, infra_worker, keys
from helpers import (Daemon, RedisProcess, entries, free_port, instance_pids, kill_instances,
                     port_open, start_web, wait_for)

#: The module infra's first port: nothing listens there (a test that needs a first instance
#: runs an infra of its own).
FIRST = free_port()


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def start_infra(redis_url: str, state_dir: Path, *args: str) -> Daemon:
    return Daemon("dockpart-infra", "--driver", "process", "--redis", redis_url,
                  "--state-dir", str(state_dir), "--port-range", "1024-65535",
                  "--first-port", str(FIRST), "--interval", "0.05", "--drain", "1",
                  "--reconcile-interval", "1", "--probe-timeout", "0.5", "--spawn-timeout", "20",
                  "--lease", "2", *args,
                  ready="dockpart-infra started").start()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("infra-state")


@pytest.fixture(scope="module")
def infra_daemon(redis_server, state_dir):
    daemon = start_infra(redis_server.url, state_dir)
    yield daemon
    daemon.stop()
    kill_instances(state_dir)


@pytest.fixture
def infra_d(infra_daemon, redis_db, state_dir):
    """The module's infra on an emptied Redis; the test's instances are stopped afterwards."""
    yield infra_daemon
    kill_instances(state_dir)
    redis_db.flushall()


def servers(redis_db) -> list[str]:
    return redis_db.lrange(keys.SERVERS, 0, -1)


def spawn(redis_db, *ports: int) -> list[str]:
    urls = [url_of(p) for p in ports]
    redis_db.lpush(keys.SPAWN_QUEUE, *urls)
    return urls


def wait_registered(redis_db, urls, timeout=20.0):
    wait_for(lambda: set(urls) <= set(servers(redis_db)), timeout,
             what=f"{urls} in servers")


# -- options and rules, no processes


@pytest.mark.parametrize("args, message", [
    (["--driver", "kubernetes"], "docker or process"),
    (["--port-range", "5000-4000"], "LOW <= HIGH"),
    (["--port-range", "abc"], "LOW-HIGH"),
    (["--driver", "process", "--rebuild"], "--rebuild only applies"),
    (["--interval", "0"], "--interval must be positive"),
    (["--probe-timeout", "-1"], "--probe-timeout must be positive"),
    (["--redis", "rediss://h"], "TLS"),
    (["--build-arg", "NOEQUALS"], "KEY=VALUE"),
    (["--first-port", "0"], "--first-port 0: need 1 to 65535"),
    (["--first-port", "70000"], "--first-port 70000: need 1 to 65535"),
])
def test_bad_options_are_refused_with_a_reason(args, message):
    with pytest.raises(usage.UsageError, match=message):
        infra.Options().parseOptions(args)


def test_options_defaults_and_build_args():
    config = infra.Options()
    config.parseOptions(["--build-arg", "BASE_IMAGE=dockpart-base:bookworm", "--drain", "0.5"])
    assert config["driver"] == "docker" and config["interval"] < 1
    assert config["port-range"] == (3001, 65535)
    assert config["build-args"] == {"BASE_IMAGE": "dockpart-base:bookworm"}
    config = infra.Options()
    config.parseOptions(["--first-port", "4000"])
    assert config["port-range"] == (4001, 65535)


def test_policy_names_the_reason_for_each_bad_entry():
    policy = infra_worker.EntryRules("127.0.0.1", 3001, 3100, 3000)
    assert policy.check(infra_worker.SPAWN, "http://127.0.0.1:3050") == 3050
    for queue, entry, reason in [
        (infra_worker.SPAWN, "nonsense", "not a valid instance URL"),
        (infra_worker.SPAWN, "http://127.0.0.1:3050/x", "not a valid instance URL"),
        (infra_worker.SPAWN, "http://127.0.0.1:4000", "outside the allowed range 3001-3100"),
        (infra_worker.SPAWN, "http://10.0.0.1:3050", "not this infra's host"),
        (infra_worker.DESTROY, "http://127.0.0.1:3000", "never destroyed"),
    ]:
        with pytest.raises(infra_worker.BadEntry, match=reason):
            policy.check(queue, entry)


def test_retries_wait_longer_each_time_up_to_retry_max():
    delay = infra_worker.retry_policy(3)
    assert [delay(attempt) for attempt in range(6)] == [0.2, 0.4, 0.8, 1.6, 3, 3]


# -- the daemon


def test_spawn_becomes_reachable_then_registered_and_announced(infra_d, redis_db):
    pubsub = redis_db.pubsub()
    pubsub.subscribe(keys.SERVERS_CHANNEL)
    port = free_port()
    [url] = spawn(redis_db, port)
    wait_registered(redis_db, [url])
    r = requests.get(url + "/", timeout=5)
    assert r.status_code == 200 and url in r.text
    assert redis_db.llen(keys.SPAWNING) == 0 and redis_db.llen(keys.SPAWN_QUEUE) == 0
    messages = [m["data"] for m in iter(lambda: pubsub.get_message(timeout=1), None)
                if m["type"] == "message"]
    assert messages == [f"add {url}"]
    pubsub.close()
    assert len(instance_pids(port)) == 1
    listen = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert listen[3] == f"127.0.0.1:{port}" and listen[2] == "1024"  # loopback, real backlog


def test_ten_concurrent_spawns_give_ten_instances(infra_d, redis_db):
    ports = [free_port() for _ in range(10)]
    urls = spawn(redis_db, *ports)
    wait_registered(redis_db, urls, timeout=90)  # ten interpreters starting at once on two cores
    assert sorted(servers(redis_db)) == sorted(urls)
    for port, url in zip(ports, urls):
        assert requests.get(url, timeout=5).status_code == 200
        assert len(instance_pids(port)) == 1


@pytest.fixture(scope="module")
def proxy(redis_server):
    port = free_port()
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_server.url, ready="dockpart-proxy listening on").start()
    daemon.url = url_of(port)
    yield daemon
    daemon.stop()


def request_loop(next_url, failures: list, served: dict, stop: threading.Event) -> threading.Thread:
    """GET next_url() until stopped (30 s at most); count what each instance served."""
    def loop():
        session = requests.Session()
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            url = next_url()
            try:
                r = session.get(url + "/", timeout=5)
                if r.status_code != 200:
                    failures.append((url, r.status_code))
                for instance in served:
                    served[instance] += instance in r.text
            except requests.RequestException as e:
                failures.append((url, repr(e)))
        session.close()
    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def test_destroy_under_request_loops_fails_no_request(infra_d, redis_db, proxy):
    """One loop through dockpart-proxy, one straight to an instance in servers at each moment."""
    keep, leave = free_port(), free_port()
    urls = spawn(redis_db, keep, leave)
    wait_registered(redis_db, urls)
    turn = itertools.count()

    def next_live():
        live = servers(redis_db)
        return live[next(turn) % len(live)]
    failures = []
    direct, proxied = dict.fromkeys(urls, 0), dict.fromkeys(urls, 0)
    stop = threading.Event()
    loops = [request_loop(next_live, failures, direct, stop),
             request_loop(lambda: proxy.url, failures, proxied, stop)]
    try:
        wait_for(lambda: direct[url_of(leave)] > 20 and proxied[url_of(leave)] > 20, 10,
                 what="requests to the doomed instance, direct and through the proxy")
        redis_db.lpush(keys.DESTROY_QUEUE, url_of(leave))
        wait_for(lambda: entries(redis_db, keys.DESTROY_QUEUE, keys.DESTROYING) == 0,
                 15, what="the destroy request to be done")
        assert not instance_pids(leave) and not port_open(leave)
        after = direct[url_of(keep)], proxied[url_of(keep)]
        wait_for(lambda: direct[url_of(keep)] > after[0] + 20
                 and proxied[url_of(keep)] > after[1] + 20, 10,
                 what="more requests, direct and through the proxy, after the destroy")
    finally:
        stop.set()
        for loop in loops:
            loop.join(10)
    assert failures == [], infra_d.output()
    assert servers(redis_db) == [url_of(keep)]
    assert direct[url_of(keep)] > 20 and proxied[url_of(keep)] > 20
    assert "draining for 1 s" in infra_d.output()


def test_bad_entries_are_dead_lettered_and_change_nothing(infra_d, redis_db, state_dir):
    bad = {
        ("spawn", "not a url"): "not a valid instance URL",
        ("spawn", "http://127.0.0.1:80"): "outside the allowed range",
        ("spawn", "http://example.com:4000"): "not this infra's host",
        ("destroy", url_of(FIRST)): "never destroyed",
        ("destroy", "http://127.0.0.1:99999"): "not a valid instance URL",
    }
    for queue, entry in bad:
        redis_db.lpush(keys.SPAWN_QUEUE if queue == "spawn" else keys.DESTROY_QUEUE, entry)
    wait_for(lambda: redis_db.llen(keys.DEAD_LETTERS) == len(bad), 10, what="dead letters")
    letters = [json.loads(x) for x in redis_db.lrange(keys.DEAD_LETTERS, 0, -1)]
    for letter in letters:
        assert bad[(letter["queue"], letter["entry"])] in letter["reason"]
    assert servers(redis_db) == []
    for key in (keys.SPAWN_QUEUE, keys.SPAWNING, keys.DESTROY_QUEUE, keys.DESTROYING):
        assert redis_db.llen(key) == 0
    assert f"dead-lettered destroy request '{url_of(FIRST)}'" in infra_d.output()


def test_a_port_taken_by_a_stranger_is_dead_lettered(infra_d, redis_db):
    import socket
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        spawn(redis_db, port)
        wait_for(lambda: redis_db.llen(keys.DEAD_LETTERS) == 1, 10, what="a dead letter")
    assert "in use by something dockpart does not manage" in redis_db.lindex(keys.DEAD_LETTERS, 0)
    assert servers(redis_db) == [] and not instance_pids(port)


def test_reconcile_adds_back_live_instances_and_drops_dead_entries(infra_d, redis_db):
    port = free_port()
    [url] = spawn(redis_db, port)
    wait_registered(redis_db, [url])
    ghost = url_of(free_port())
    redis_db.lrem(keys.SERVERS, 0, url)
    redis_db.rpush(keys.SERVERS, "http://example.com:4000", ghost)
    wait_for(lambda: set(servers(redis_db)) == {"http://example.com:4000", url},
             10, what="reconcile to add the instance back and drop the ghost")
    # Its log lines follow Redis's answers: the list can be whole a moment before they are.
    wait_for(lambda: f"added {url} back" in infra_d.output()
             and f"removed {ghost} from servers" in infra_d.output(), 10,
             what="reconcile's log lines")
    output = infra_d.output()
    assert f"added {url} back" in output and f"removed {ghost} from servers" in output


def running_instance(redis_db) -> tuple[int, str, int]:
    """An instance spawned and in servers: its port, URL and pid."""
    port = free_port()
    [url] = spawn(redis_db, port)
    wait_registered(redis_db, [url])
    [pid] = instance_pids(port)
    return port, url, pid


def test_a_frozen_instance_leaves_servers_and_is_back_once_it_answers(infra_d, redis_db):
    port, url, pid = running_instance(redis_db)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: url not in servers(redis_db), 10,
                 what="the frozen instance to leave servers")
        assert instance_pids(port) == [pid]  # unlisted, not destroyed
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_registered(redis_db, [url], 10)
    assert instance_pids(port) == [pid]
    assert requests.get(url, timeout=5).status_code == 200
    output = infra_d.output()
    assert f"process dockpart-web-{port} did not answer within 0.5 s; removed {url}" in output
    assert f"added {url} back to servers" in output


def test_a_killed_instance_is_replaced_on_its_port(infra_d, redis_db):
    port, url, pid = running_instance(redis_db)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: instance_pids(port) not in ([], [pid]) and url in servers(redis_db), 30,
             what="a new instance on the port, in servers")
    assert len(instance_pids(port)) == 1 and servers(redis_db) == [url]
    assert requests.get(url, timeout=5).status_code == 200
    assert (f"process dockpart-web-{port} exited; removed it and queued a spawn of {url} "
            f"in its place") in infra_d.output()


def test_a_frozen_first_instance_leaves_servers_and_puts_itself_back(own_redis, tmp_path):
    client = own_redis.client()
    first = free_port()
    web = start_web(own_redis.url, "--first-port", str(first), port=first)
    infra_daemon = start_infra(own_redis.url, tmp_path / "state", "--first-port", str(first))
    try:
        wait_for(lambda: servers(client) == [url_of(first)], 10, what="the first instance")
        os.kill(web.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: servers(client) == [], 10, what="the frozen first instance to leave")
        finally:
            os.kill(web.proc.pid, signal.SIGCONT)
        wait_for(lambda: servers(client) == [url_of(first)], 10, what="the first instance back")
        assert "the first instance did not answer within 0.5 s" in infra_daemon.output()
        assert "was missing from; added it back to servers" in web.output()
    finally:
        infra_daemon.stop()
        web.stop()


def test_infra_killed_mid_spawn_restarts_and_finishes_with_exactly_one_instance(
        own_redis, tmp_path):
    redis_db, redis_server = own_redis.client(), own_redis
    state = tmp_path / "state"
    port = free_port()
    url = url_of(port)
    daemon = start_infra(redis_server.url, state)
    try:
        spawn(redis_db, port)
        wait_for(lambda: f"started dockpart-web-{port}" in daemon.output(), 10,
                 what="the instance to be started")
        daemon.stop(signal.SIGKILL)
        assert redis_db.lrange(keys.SPAWNING, 0, -1) == [url]
        assert url not in servers(redis_db)
        daemon = start_infra(redis_server.url, state)
        wait_registered(redis_db, [url])
        assert "finishing 1 request(s) left in processing" in daemon.output()
        assert servers(redis_db) == [url]
        assert redis_db.llen(keys.SPAWNING) == 0
        assert len(instance_pids(port)) == 1
        assert requests.get(url, timeout=5).status_code == 200
    finally:
        daemon.stop()
        kill_instances(state)


def test_instances_outlive_a_stopped_infra_and_a_new_one_adopts_them(own_redis, tmp_path):
    redis_db, redis_server = own_redis.client(), own_redis
    state = tmp_path / "state"
    port = free_port()
    daemon = start_infra(redis_server.url, state)
    try:
        [url] = spawn(redis_db, port)
        wait_registered(redis_db, [url])
        [pid] = instance_pids(port)
        daemon.stop()
        assert requests.get(url, timeout=5).status_code == 200
        daemon = start_infra(redis_server.url, state)
        redis_db.lpush(keys.DESTROY_QUEUE, url)
        wait_for(lambda: entries(redis_db, keys.DESTROY_QUEUE, keys.DESTROYING) == 0,
                 15, what="the destroy request to be done")
        assert servers(redis_db) == [] and not instance_pids(port)
        assert f"destroyed process dockpart-web-{port}" in daemon.output()
    finally:
        daemon.stop()
        kill_instances(state)


def test_one_infra_per_redis_a_second_waits_for_the_lease_then_takes_over(own_redis, tmp_path):
    client = own_redis.client()
    first = start_infra(own_redis.url, tmp_path / "a")
    second = start_infra(own_redis.url, tmp_path / "b")
    try:
        wait_for(lambda: "another dockpart-infra" in second.output(), 10,
                 what="the second infra to wait")
        [url] = spawn(client, free_port())
        wait_registered(client, [url])
        assert "starting process dockpart-web-" in first.output()
        assert "starting process" not in second.output()
        first.stop()  # releases the lease: no need to wait for it to expire
        wait_for(lambda: "holding the lease" in second.output(), 5, what="the takeover")
        [url2] = spawn(client, free_port())
        wait_registered(client, [url2])
        assert url2.rsplit(":", 1)[1] in second.output()
    finally:
        first.stop()
        second.stop()
        kill_instances(tmp_path / "a")
        kill_instances(tmp_path / "b")


def test_requests_wait_for_redis_and_are_done_once_it_answers(tmp_path):
    redis = RedisProcess()
    state = tmp_path / "state"
    daemon = start_infra(redis.url, state, "--retry-max", "0.5")
    try:
        wait_for(lambda: "Redis is unreachable" in daemon.output(), 10, what="the outage log")
        redis.start()
        client = redis.client()
        port = free_port()
        [url] = spawn(client, port)
        wait_registered(client, [url])
        assert "Redis is reachable again" in daemon.output()
        assert daemon.output().count("Redis is unreachable") == 1
    finally:
        daemon.stop()
        kill_instances(state)
        redis.stop()


def test_an_outage_is_logged_once_and_not_while_connections_are_first_made():
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent, globalLogPublisher
    clock = Clock()
    outage = infra_worker.Outage("Redis", clock)
    outage.quiet_until = 1.0
    texts = []

    def observe(event):
        if event.get("log_namespace", "").startswith("dockpart.infra"):
            texts.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    try:
        outage.failed(Exception("connecting"))
        clock.advance(2)
        for _ in range(3):
            outage.failed(Exception("refused"))
        outage.ok()
        outage.ok()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(texts) == 2, texts
    assert "unreachable (refused)" in texts[0] and "reachable again" in texts[1]
