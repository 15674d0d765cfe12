"""dockpart-infra's AppsRunner on a real Redis, with stand-ins for the drivers and workers
and a Clock: each step is run by hand, so "nothing happened" is shown after time passed."""

import json

import pytest_twisted
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.task import Clock

from dockpart import apps, keys
from dockpart.drivers import Instance, Status
from dockpart.deploy.front import Scripts
from dockpart.infra_apps import AppsRunner
from dockpart.redisconn import RedisAddress, RedisService

LOW, HIGH = 20000, 20009


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


class Driver:
    def __init__(self, app):
        self.app = app
        self.running: dict[int, bool] = {}
        self.removed: list[int] = []

    async def instances(self):
        return {p: Instance(p, Status.RUNNING if up else Status.EXITED)
                for p, up in self.running.items()}

    async def remove(self, port):
        self.removed.append(port)
        self.running.pop(port, None)


class Worker(Service):
    leased = True
    taken = 0

    def take_now(self):
        self.taken += 1


class Runner:
    def __init__(self, redis_url: str):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.redis = RedisService(RedisAddress.parse(redis_url), 2.0, reactor)
        self.redis.startService()
        self.runner = AppsRunner(self.redis, Driver, lambda app, driver: Worker(),
                                 host="127.0.0.1", ports=(LOW, HIGH), clock=self.clock)

    def step(self):
        return self.runner.step()

    def stop(self):
        return self.redis.stopService()


@pytest_twisted.async_yield_fixture
async def r(redis_server):
    """A Runner on the test's Redis, its connection closed after the test."""
    runner = Runner(redis_server.url)
    yield runner
    await runner.stop()


def report(client, clock, app: str, inflight: dict[str, int], name: str = "p:1",
           requests: int = 1, **more):
    """A proxy's load report on ``app``'s instances (or the seed's, for app None)."""
    body = {"proxy": name, "time": clock.seconds(), "interval": 1.0,
            "list": keys.app_tier(app).servers if app else keys.SERVERS, **more,
            "backends": {u: {"requests": requests, "errors": 0, "latency_sum": 0.0,
                             "latency_buckets": [0] * 14, "inflight": n, "healthy": True}
                         for u, n in inflight.items()}}
    if app:
        body["app"] = app
    client.set(keys.proxy_load(name), json.dumps(body))
    client.zadd(keys.LOAD_PROXIES, {name: clock.seconds()})


@pytest_twisted.ensureDeferred
async def test_each_app_gets_its_count_on_ports_no_other_app_holds(redis_db, r):
    with_client = Scripts(redis_db)
    apps.create(with_client, apps.App("a", command="x", desired=2))
    apps.create(with_client, apps.App("b", command="y", desired=1))
    await r.step()
    assert redis_db.lrange(keys.app_tier("a").spawn_queue, 0, -1) == [url(LOW + 1), url(LOW)]
    assert redis_db.lrange(keys.app_tier("b").spawn_queue, 0, -1) == [url(LOW + 2)]
    await r.step()  # what is asked for counts: nothing more
    assert redis_db.llen(keys.app_tier("a").spawn_queue) == 2
    assert redis_db.hgetall(keys.APP_PORTS) == {str(LOW): "a", str(LOW + 1): "a",
                                                str(LOW + 2): "b"}


@pytest_twisted.ensureDeferred
async def test_a_lower_count_queues_destroys_and_unused_ports_are_given_back(redis_db, r):
    apps.create(Scripts(redis_db), apps.App("a", command="x", desired=1))
    t = keys.app_tier("a")
    redis_db.rpush(t.servers, url(LOW), url(LOW + 1), url(LOW + 2))
    redis_db.hset(keys.APP_PORTS, mapping={LOW: "a", LOW + 1: "a", LOW + 2: "a",
                                           LOW + 5: "a"})
    await r.step()
    assert redis_db.llen(t.destroy_queue) == 2
    assert str(LOW + 5) not in redis_db.hgetall(keys.APP_PORTS)  # in no list, not running


@pytest_twisted.ensureDeferred
async def test_the_autoscaler_sizes_each_app_on_its_own_load(redis_db, r):
    client = Scripts(redis_db)
    for name in ("a", "b"):
        apps.create(client, apps.App(name, command="x", desired=1))
        apps.autoscale(client, name, 1, 4, 2.0, 1)
    redis_db.rpush(keys.app_tier("a").servers, url(LOW))
    redis_db.rpush(keys.app_tier("b").servers, url(LOW + 1))
    redis_db.hset(keys.APP_PORTS, mapping={LOW: "a", LOW + 1: "b"})
    report(redis_db, r.clock, "a", {url(LOW): 8})  # 8 in flight on a's one instance
    report(redis_db, r.clock, "b", {url(LOW + 1): 2}, name="p:2")  # b at its target
    report(redis_db, r.clock, None, {url(3001): 50}, name="p:3")  # the seed's load
    await r.step()
    assert redis_db.hget(keys.app_record("a"), "desired") == "4"
    assert redis_db.llen(keys.app_tier("a").spawn_queue) == 3
    assert redis_db.hget(keys.app_record("b"), "desired") == "1"
    assert redis_db.llen(keys.app_tier("b").spawn_queue) == 0


@pytest_twisted.ensureDeferred
async def test_a_failed_spawn_holds_the_next_one_for_a_while(redis_db, r):
    apps.create(Scripts(redis_db), apps.App("a", command="x", desired=1))
    await r.step()
    redis_db.delete(keys.app_tier("a").spawn_queue)  # dead-lettered, as a worker does
    await r.step()
    assert redis_db.llen(keys.app_tier("a").spawn_queue) == 0
    r.clock.advance(1.01)
    await r.step()
    # On another port: something else may listen on the one that failed.
    assert redis_db.lrange(keys.app_tier("a").spawn_queue, 0, -1) == [url(LOW + 1)]


@pytest_twisted.ensureDeferred
async def test_a_record_redis_lost_is_written_back_and_a_destroyed_app_forgotten(redis_db, r):
    apps.create(Scripts(redis_db), apps.App("a", command="x", desired=1, domains=("a.test",)))
    await r.step()
    redis_db.flushall()  # a Redis restarted without its data
    await r.step()
    assert redis_db.smembers(keys.APPS) == {"a"}
    assert redis_db.hget(keys.app_record("a"), "domains") == "a.test"
    driver = r.runner.tiers["a"].driver
    driver.running = {LOW: True}  # running, in no list: it stopped answering
    apps.destroy(Scripts(redis_db), "a")
    redis_db.delete(keys.app_tier("a").spawn_queue)
    await r.step()
    assert driver.removed == [LOW]
    await r.step()
    assert "a" not in r.runner.tiers
    assert redis_db.keys("dockpart:app*") == []


@pytest_twisted.ensureDeferred
async def test_an_autoscaled_app_with_nothing_to_run_asks_for_no_spawn(redis_db, r):
    """The autoscaler's floor does not start what cannot run (each spawn would fail)."""
    apps.create(Scripts(redis_db), apps.App("new"))
    apps.autoscale(Scripts(redis_db), "new", 1, 4, 2.0, 1)
    await r.step()
    assert redis_db.llen(keys.app_tier("new").spawn_queue) == 0


def zero_app(redis_db, name: str = "z", zero_after: float = 0.0, desired: int = 0):
    client = Scripts(redis_db)
    apps.create(client, apps.App(name, command="x", desired=desired))
    apps.autoscale(client, name, 0, 4, 2.0, desired, zero_after)
    return client


@pytest_twisted.ensureDeferred
async def test_an_app_with_min_0_goes_to_zero_after_its_idle_window_not_before(redis_db, r):
    zero_app(redis_db, zero_after=10.0, desired=1)
    t = keys.app_tier("z")
    redis_db.rpush(t.servers, url(LOW))
    redis_db.hset(keys.APP_PORTS, LOW, "z")
    report(redis_db, r.clock, "z", {url(LOW): 0}, requests=3)  # answered some: busy
    await r.step()
    r.clock.advance(9.0)
    report(redis_db, r.clock, "z", {url(LOW): 0}, requests=0)
    await r.step()
    assert redis_db.hget(keys.app_record("z"), "desired") == "1"  # 9 s idle: not yet
    r.clock.advance(2.0)
    report(redis_db, r.clock, "z", {url(LOW): 0}, requests=0)
    await r.step()
    assert redis_db.hget(keys.app_record("z"), "desired") == "0"
    assert redis_db.lrange(t.destroy_queue, 0, -1) == [url(LOW)]


@pytest_twisted.ensureDeferred
async def test_load_never_takes_an_app_to_zero_without_its_idle_rule(redis_db, r):
    """min 0 without --scale-to-zero-after: the policy's floor stays one instance."""
    zero_app(redis_db, desired=1)
    redis_db.rpush(keys.app_tier("z").servers, url(LOW))
    redis_db.hset(keys.APP_PORTS, LOW, "z")
    for _ in range(40):  # past the policy's 60 s stabilisation, no load at all
        report(redis_db, r.clock, "z", {url(LOW): 0}, requests=0)
        await r.step()
        r.clock.advance(2.0)
    assert redis_db.hget(keys.app_record("z"), "desired") == "1"


@pytest_twisted.ensureDeferred
async def test_an_activation_asks_for_the_held_load_once_and_ends_when_one_serves(redis_db, r):
    client = zero_app(redis_db)
    t = keys.app_tier("z")
    # Proxies ask: the first creates the activation, a larger count is told, the same
    # count again changes nothing.
    assert apps.activate(client, "z", "p:1", 1) == 1
    assert apps.activate(client, "z", "p:1", 1) == 0
    assert apps.activate(client, "z", "p:2", 2) == 2
    await r.step()
    assert redis_db.hget(keys.app_record("z"), "desired") == "2"  # 3 held at 2 each
    assert redis_db.llen(t.spawn_queue) == 2
    r.clock.advance(0)
    assert r.runner.tiers["z"].worker.taken == 1  # the worker looked at once
    await r.step()  # a restarted infra or the next step: counted, not asked again
    assert redis_db.llen(t.spawn_queue) == 2
    assert apps.activate(client, "z", "p:1", 5) == 2  # more held while none serves
    await r.step()
    assert redis_db.hget(keys.app_record("z"), "desired") == "4"  # 7 held, at most 4
    await r.step()
    assert redis_db.llen(t.spawn_queue) == 4
    assert redis_db.exists(keys.app_activation("z"))  # until an instance serves
    redis_db.rpush(t.servers, redis_db.rpop(t.spawn_queue))
    await r.step()
    assert not redis_db.exists(keys.app_activation("z"))


@pytest_twisted.ensureDeferred
async def test_a_failed_activation_goes_back_to_zero_tells_the_proxies_and_waits(redis_db, r):
    notices = redis_db.pubsub(ignore_subscribe_messages=True)
    notices.subscribe(keys.APPS_ACTIVATION)
    notices.get_message(timeout=2)  # the subscription is in place
    try:
        client = zero_app(redis_db)
        t = keys.app_tier("z")
        apps.activate(client, "z", "p:1", 1)
        await r.step()
        assert redis_db.lrange(t.spawn_queue, 0, -1) == [url(LOW)]
        redis_db.delete(t.spawn_queue)  # the worker dead-lettered it
        await r.step()
        assert redis_db.hget(keys.app_record("z"), "desired") == "0"
        assert not redis_db.exists(keys.app_activation("z"))
        said = [m["data"] for m in (notices.get_message(timeout=2) for _ in range(2)) if m]
        assert said == ["activate z", "failed z 1"]
        # The next request asks again: nothing before the backoff, then a spawn.
        apps.activate(client, "z", "p:1", 1)
        await r.step()
        assert redis_db.llen(t.spawn_queue) == 0
        r.clock.advance(1.0)
        await r.step()
        assert redis_db.llen(t.spawn_queue) == 1
    finally:
        notices.close()
