"""The autoscaler service on a real Redis, fed by the real load publisher; time is a Clock.

Each evaluation is run by hand so "nothing happened" is shown after the windows elapse.
"""

import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from dockpart import keys, load
from dockpart.infra_autoscale import Autoscaler, Policy, Settings
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_load import LoadPublisher
from dockpart.redisconn import RedisAddress, RedisService
from helpers import free_port

FIRST = "http://127.0.0.1:5000"


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


class Lease:
    leased = True


class Tier:
    """A Redis client, a proxy's publisher over fake backends, and an autoscaler; one Clock."""

    def __init__(self, redis_url: str, **settings):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.redis = RedisService(RedisAddress.parse(redis_url), 2.0, reactor)
        self.backends = BackendSet(keys.SERVERS, "local", self.clock)
        self.publisher = LoadPublisher(self.backends, self.redis, self.clock, name="test:1")
        self.slots: dict = {}
        self.lease = Lease()
        self.settings = Settings(**{"min_instances": 1, "max_instances": 4, "target": 2.0,
                                    "cooldown": 0.0, "window": 30.0, **settings})
        self.scaler = self.new_scaler()
        self.slots: dict[str, list] = {}

    def new_scaler(self) -> Autoscaler:
        """What a restarted infra runs: no memory of the previous one's decisions."""
        return Autoscaler(self.redis, self.lease, Policy(self.settings, self.clock),
                          host="127.0.0.1", first_port=5000, clock=self.clock)

    async def __aenter__(self):
        self.redis.startService()
        return self

    async def __aexit__(self, *exc):
        await self.redis.stopService()

    async def load(self, inflight: dict[str, int]) -> None:
        """The proxy sees these requests in flight and publishes its report."""
        self.backends.update(list(inflight))
        for u, n in inflight.items():  # n slots taken on u (Backend.take: the one owner)
            slots = self.slots.setdefault(u, [])
            while len(slots) < n:
                slots.append(self.backends.by_url[u].take())
            while len(slots) > n:
                slots.pop().release()
        await self.publisher.publish()

    async def evaluate(self, seconds: float = 1.0):
        self.clock.advance(seconds)
        return await self.scaler.evaluate()

    async def step(self, inflight: dict[str, int], seconds: float = 1.0):
        """The proxy reports this load, then the autoscaler evaluates ``seconds`` later."""
        await self.load(inflight)
        return await self.evaluate(seconds)


@pytest_twisted.ensureDeferred
async def test_load_above_target_asks_for_spawns_up_to_max_and_no_further(redis_db, redis_server):
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url, max_instances=3) as t:
        d = await t.step({FIRST: 20})
        assert (d.action, d.current, d.desired) == ("up", 1, 3)
        assert redis_db.lrange(keys.SPAWN_QUEUE, 0, -1) == [url(5002), url(5001)]
        d = await t.step({FIRST: 20})  # both still spawning: counted, nothing more asked
        assert (d.action, d.current, d.spawning) == ("hold", 3, 2)
        assert redis_db.llen(keys.SPAWN_QUEUE) == 2
        redis_db.delete(keys.SPAWN_QUEUE)
        redis_db.rpush(keys.SERVERS, url(5001), url(5002))  # the worker spawned them
        d = await t.step({FIRST: 20, url(5001): 20, url(5002): 20})
        assert (d.action, d.desired) == ("hold", 3) and "at most 3 instances" in d.reason
        assert redis_db.llen(keys.SPAWN_QUEUE) == 0
        assert redis_db.get(keys.AUTOSCALE_DESIRED) == "3"
        records = [json.loads(r) for r in redis_db.lrange(keys.AUTOSCALE_DECISIONS, 0, -1)]
        assert [r["action"] for r in records] == ["hold", "up"]  # a hold is said once
        assert records[-1]["reason"] == "1 instance, 20.0 in flight each (target 2) -> 3 " \
                                        "(at most 3 instances)"


@pytest_twisted.ensureDeferred
async def test_a_restarted_infra_neither_repeats_nor_loses_a_spawn(redis_db, redis_server):
    """Decisions are made from what Redis holds: a queued spawn is counted, a missing one asked."""
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url) as t:
        assert (await t.step({FIRST: 6})).desired == 3
        assert redis_db.llen(keys.SPAWN_QUEUE) == 2
        # Killed after the decision; one request was taken by the worker, one not yet made.
        redis_db.lmove(keys.SPAWN_QUEUE, keys.SPAWNING, "RIGHT", "LEFT")
        redis_db.delete(keys.SPAWN_QUEUE)
        t.scaler = t.new_scaler()
        d = await t.step({FIRST: 6})
        assert (d.action, d.current, d.spawning, d.desired) == ("up", 2, 1, 3)
        assert redis_db.lrange(keys.SPAWNING, 0, -1) == [url(5001)]
        assert redis_db.lrange(keys.SPAWN_QUEUE, 0, -1) == [url(5002)]
        t.scaler = t.new_scaler()  # and once more: nothing is asked twice
        d = await t.step({FIRST: 6})
        assert (d.action, d.current) == ("hold", 3)
        assert redis_db.llen(keys.SPAWN_QUEUE) == 1


@pytest_twisted.ensureDeferred
async def test_an_instance_that_joins_servers_while_the_lists_are_read_is_counted(
        redis_db, redis_server):
    """The worker registers a spawned instance (SPAWNING -> servers) just after the autoscaler
    has read servers: it must still count as one of the 2, not make the tier look like 1."""
    redis_db.rpush(keys.SERVERS, FIRST)
    redis_db.rpush(keys.SPAWNING, url(5001))
    async with Tier(redis_server.url) as t:
        call = t.redis.call

        def register_after_servers_is_read(command, *args):
            d = call(command, *args)
            if keys.SERVERS in args and redis_db.llen(keys.SPAWNING):
                d.addCallback(lambda result: (
                    redis_db.lmove(keys.SPAWNING, keys.SERVERS, "LEFT", "RIGHT"), result)[1])
            return d
        t.redis.call = register_after_servers_is_read
        d = await t.step({FIRST: 4})
        assert (d.current, d.per_instance) == (2, 2.0)
        assert redis_db.lrange(keys.SERVERS, 0, -1) == [FIRST, url(5001)]


@pytest_twisted.ensureDeferred
async def test_an_evaluation_under_way_when_infra_stops_asks_for_nothing(redis_db, redis_server):
    """The tier's lists answer after stopService: a stopped infra decides and asks nothing."""
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url) as t:
        await t.load({FIRST: 20})
        call = t.redis.call
        held = []

        def hold_the_lists(command, *args):
            d = call(command, *args)
            if keys.SERVERS not in args or held:
                return d
            answer = defer.Deferred()
            held.append((d, answer))
            return answer
        t.redis.call = hold_the_lists
        t.scaler.startService()
        t.clock.advance(1)
        evaluation = t.scaler.tick()
        for _ in range(500):  # 5 s at most, for the run-time limits to be read first
            if held:
                break
            await deferLater(reactor, 0.01, lambda: None)
        [(lists, answer)] = held
        t.scaler.stopService()
        if not answer.called:  # the stop did not end the evaluation: let it go on
            answer.callback(await lists)
        assert await evaluation is None
        t.redis.call = call
        assert redis_db.llen(keys.SPAWN_QUEUE) == 0 and not redis_db.exists(keys.AUTOSCALE_DESIRED)


@pytest_twisted.ensureDeferred
async def test_load_gone_scales_down_to_min_only_after_the_window(redis_db, redis_server):
    redis_db.rpush(keys.SERVERS, FIRST, url(5001), url(5002))
    async with Tier(redis_server.url, window=30.0) as t:
        idle = {FIRST: 0, url(5001): 0, url(5002): 0}
        for _ in range(30):  # the window starts at the first evaluation with the lease
            d = await t.step(idle)
            assert d.action == "hold", d.reason
        assert redis_db.llen(keys.DESTROY_QUEUE) == 0
        d = await t.step(idle, 1.5)
        assert (d.action, d.desired) == ("down", 1)
        assert sorted(redis_db.lrange(keys.DESTROY_QUEUE, 0, -1)) == [url(5001), url(5002)]
        d = await t.step(idle)  # leaving instances no longer count
        assert (d.action, d.current) == ("hold", 1)
        assert redis_db.llen(keys.DESTROY_QUEUE) == 2


@pytest_twisted.ensureDeferred
async def test_missing_or_stale_figures_never_scale_down(redis_db, redis_server):
    redis_db.rpush(keys.SERVERS, FIRST, url(5001), url(5002))
    async with Tier(redis_server.url, window=5.0) as t:
        for _ in range(10):
            d = await t.evaluate()  # no proxy ever reported
            assert d.action == "none" and "no load figures" in d.reason
        await t.load({FIRST: 0, url(5001): 0, url(5002): 0})
        t.clock.advance(load.REPORT_TTL + 0.5)  # the proxy stopped reporting
        for _ in range(10):
            d = await t.evaluate()
            assert d.action == "none"
        assert redis_db.llen(keys.DESTROY_QUEUE) == 0
        records = [json.loads(r) for r in redis_db.lrange(keys.AUTOSCALE_DECISIONS, 0, -1)]
        assert len(records) == 1 and records[0]["action"] == "none"  # said once, not each time
        assert redis_db.get(keys.AUTOSCALE_DESIRED) == "3"


@pytest_twisted.ensureDeferred
async def test_a_dead_lettered_spawn_holds_scale_ups_longer_each_time_in_a_row(
        redis_db, redis_server):
    """Asking again after every cooldown would fail the same way: 10 s, then 20 s, and a
    spawn that goes through makes the next failure hold 10 s again."""
    events = []
    observer = lambda event: events.append(formatEvent(event))  # noqa: E731
    redis_db.rpush(keys.SERVERS, FIRST)
    globalLogPublisher.addObserver(observer)
    try:
        async with Tier(redis_server.url, max_instances=2) as t:

            def spawn_dead_lettered():
                """What the worker does with a spawn it cannot carry out, a while later."""
                t.clock.advance(0.5)
                [entry] = redis_db.lrange(keys.SPAWN_QUEUE, 0, -1)
                redis_db.delete(keys.SPAWN_QUEUE)
                redis_db.lpush(keys.DEAD_LETTERS, json.dumps({
                    "queue": "spawn", "entry": entry, "reason": "did not answer HTTP",
                    "time": t.clock.seconds()}))

            async def held_for(seconds: int) -> None:
                for _ in range(seconds):
                    d = await t.step({FIRST: 20})
                    assert d.action == "hold" and "a spawn was dead-lettered (did not answer " \
                        "HTTP)" in d.reason, d.reason
                    assert redis_db.llen(keys.SPAWN_QUEUE) == 0

            assert (await t.step({FIRST: 20})).action == "up"
            for hold in (10, 20):
                spawn_dead_lettered()
                await held_for(hold)
                assert (await t.step({FIRST: 20})).action == "up"
            redis_db.delete(keys.SPAWN_QUEUE)
            redis_db.rpush(keys.SERVERS, url(5001))  # this time the spawn went through
            assert (await t.step({FIRST: 10, url(5001): 10})).action == "hold"
            redis_db.lrem(keys.SERVERS, 0, url(5001))  # it exited and was removed
            assert (await t.step({FIRST: 20})).action == "up"
            spawn_dead_lettered()
            await held_for(10)
            assert (await t.step({FIRST: 20})).action == "up"
    finally:
        globalLogPublisher.removeObserver(observer)
    said = [e for e in events if "was dead-lettered (did not answer HTTP); no scale-up" in e]
    assert [e.split("no scale-up for ")[1].split(" s")[0] for e in said] == ["10", "20", "10"]
    assert sum("spawns succeed again" in e for e in events) == 1


@pytest_twisted.ensureDeferred
async def test_runtime_limits_override_the_options_when_valid(redis_db, redis_server):
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url, max_instances=4) as t:
        redis_db.hset(keys.AUTOSCALE_LIMITS, mapping={"min": 1, "max": 2})
        assert (await t.step({FIRST: 20})).desired == 2
        redis_db.delete(keys.SPAWN_QUEUE)
        redis_db.hset(keys.AUTOSCALE_LIMITS, mapping={"min": 1, "max": 9})  # above --max
        assert (await t.step({FIRST: 20})).desired == 4


@pytest_twisted.ensureDeferred
async def test_only_the_lease_holder_decides(redis_db, redis_server):
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url) as t:
        t.lease.leased = False
        assert await t.step({FIRST: 20}) is None
        assert redis_db.llen(keys.SPAWN_QUEUE) == 0 and not redis_db.exists(keys.AUTOSCALE_DESIRED)


@pytest_twisted.ensureDeferred
async def test_the_published_report_counts_since_the_last_one(redis_db, redis_server):
    async with Tier(redis_server.url) as t:
        t.backends.update([FIRST])
        backend = t.backends.by_url[FIRST]
        for seconds in (0.003, 0.003, 0.3):
            backend.answered()
            backend.timed(seconds)
        for _ in range(2):  # two requests in flight
            backend.take()
        await t.publisher.publish()
        first = json.loads(redis_db.get(keys.proxy_load("test:1")))["backends"][FIRST]
        assert (first["requests"], first["inflight"], round(first["latency_sum"], 3)) == \
            (3, 2, 0.306)
        assert load.quantile(first["latency_buckets"], 0.5) == 0.005
        assert load.quantile(first["latency_buckets"], 0.95) == 0.5
        t.clock.advance(1)
        await t.publisher.publish()
        second = json.loads(redis_db.get(keys.proxy_load("test:1")))["backends"][FIRST]
        assert (second["requests"], second["latency_sum"], sum(second["latency_buckets"])) == \
            (0, 0, 0)
        assert 0 < redis_db.pttl(keys.proxy_load("test:1")) <= load.REPORT_TTL * 1000
        assert redis_db.zrange(keys.LOAD_PROXIES, 0, -1) == ["test:1"]


@pytest_twisted.ensureDeferred
async def test_redis_away_means_no_decision_said_once_and_the_loop_goes_on():
    events = []
    observer = lambda event: events.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        async with Tier(f"redis://127.0.0.1:{free_port()}/0") as t:
            t.redis.timeout = 0.2
            for _ in range(3):
                t.clock.advance(1)
                await t.scaler.tick()  # never raises: a LoopingCall must not stop
    finally:
        globalLogPublisher.removeObserver(observer)
    assert sum("Redis is away" in e and "no decision" in e for e in events) == 1


@pytest_twisted.ensureDeferred
async def test_an_apps_dead_lettered_spawn_does_not_hold_the_seeds_scale_ups(redis_db,
                                                                             redis_server):
    redis_db.rpush(keys.SERVERS, FIRST)
    async with Tier(redis_server.url, max_instances=3) as t:
        assert (await t.step({FIRST: 20})).action == "up"
        redis_db.delete(keys.SPAWN_QUEUE)
        t.clock.advance(0.5)
        redis_db.lpush(keys.DEAD_LETTERS, json.dumps({
            "queue": "spawn", "entry": "http://127.0.0.1:20000", "reason": "app failed",
            "time": t.clock.seconds(), "list": keys.app_tier("shop").servers}))
        assert (await t.step({FIRST: 20})).action == "up"
