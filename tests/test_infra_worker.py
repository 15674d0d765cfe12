"""The infra's worker in this process, on a real Redis, with a driver that records and can fail.

Fast checks of the order of things that the daemon tests can only see from outside.
"""

import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from dockpart import infra_worker, keys
from dockpart.drivers import Instance, Status, Unavailable
from dockpart.redisconn import RedisAddress, RedisService, RedisUnavailable

URL = "http://127.0.0.1:4001"


class FakeDriver:
    """Instances are port numbers in sets (running, exited, frozen: runs but does not answer);
    the next ``down`` calls fail as if the engine left."""

    name = "fake"

    def __init__(self, redis: RedisService):
        self.redis = redis
        self.running: set[int] = set()
        self.exited: set[int] = set()
        self.frozen: set[int] = set()
        self.started = []
        self.down = 0
        self.calls = 0
        self.removed = []  # (time, servers at that time)

    def describe(self, port):
        return f"fake instance {port}"

    def _call(self):
        self.calls += 1
        if self.down:
            self.down -= 1
            raise Unavailable("the fake engine is away")

    async def instances(self):
        self._call()
        return {**{p: Instance(p, Status.EXITED) for p in self.exited},
                **{p: Instance(p, Status.RUNNING) for p in self.running}}

    async def start(self, port):
        self._call()
        self.started.append(port)
        self.exited.discard(port)
        self.running.add(port)

    async def remove(self, port):
        self._call()
        self.removed.append((reactor.seconds(), await self.redis.call("LRANGE", keys.SERVERS, 0, -1)))
        self.running.discard(port)
        self.exited.discard(port)


async def until(predicate, timeout=5.0):
    deadline = reactor.seconds() + timeout
    while True:
        try:
            if await predicate():
                return
        except RedisUnavailable:
            pass  # still connecting
        assert reactor.seconds() < deadline, "timed out"
        await deferLater(reactor, 0.02, lambda: None)


class Setup:
    """A worker on ``redis_url`` with the fake driver (or ``driver``) and a probe that knows
    which instances answer (or ``probe``); ``kw`` are the worker's options."""

    def __init__(self, redis_url: str, driver=None, probe=None,
                 rules=infra_worker.EntryRules("127.0.0.1", 4001, 4999, 4000), **kw):
        self.redis = RedisService(RedisAddress.parse(redis_url), 2.0, reactor)
        self.driver = driver or FakeDriver(self.redis)
        probe = probe or (lambda _reactor, port, _host: defer.succeed(
            port in self.driver.running - self.driver.frozen or port in self.first_answers))
        self.first_answers = set()
        options = dict(interval=0.02, reconcile_interval=60, drain=0.3, retry_max=0.05,
                       lease=1.0, probe=probe, reactor=reactor)
        self.worker = infra_worker.Worker(self.redis, self.driver, rules, **{**options, **kw})
        self.logs = []

    async def __aenter__(self):
        globalLogPublisher.addObserver(self._observe)
        self.redis.startService()
        self.worker.startService()
        return self

    async def __aexit__(self, *exc):
        await self.worker.stopService()
        await self.redis.stopService()
        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event):
        if event.get("log_namespace", "").startswith("dockpart.infra"):
            self.logs.append(formatEvent(event))

    async def servers(self):
        return await self.redis.call("LRANGE", keys.SERVERS, 0, -1)

    async def leased(self):
        await until(lambda: defer.succeed(self.worker._leased))


@pytest_twisted.ensureDeferred
async def test_destroy_unregisters_first_and_removes_after_the_drain(redis_db, redis_server):
    async with Setup(redis_server.url) as s:
        s.driver.running.add(4001)
        redis_db.rpush(keys.SERVERS, URL)
        asked = reactor.seconds()
        redis_db.lpush(keys.DESTROY_QUEUE, URL)
        await until(lambda: defer.succeed(s.driver.removed))
        [(removed_at, servers_then)] = s.driver.removed
        assert servers_then == [] and removed_at - asked >= 0.3
        await until(lambda: defer.succeed(redis_db.llen(keys.DESTROYING) == 0))


@pytest_twisted.ensureDeferred
async def test_an_engine_outage_keeps_the_spawn_and_is_reported_once(redis_db, redis_server):
    async with Setup(redis_server.url) as s:
        for outage in s.worker.outages.values():
            outage.quiet_until = 0  # no start-up grace: the outage begins at once here
        s.driver.down = 6
        redis_db.lpush(keys.SPAWN_QUEUE, URL)

        async def registered():
            return URL in await s.servers()
        await until(registered)
        assert s.driver.calls > 6 and redis_db.llen(keys.SPAWNING) == 0
        assert sum("engine is unreachable" in line for line in s.logs) == 1
        assert sum("engine is reachable again" in line for line in s.logs) == 1


@pytest_twisted.ensureDeferred
async def test_what_was_in_processing_is_finished_before_anything_new(redis_db, redis_server):
    redis_db.lpush(keys.SPAWNING, URL)
    redis_db.lpush(keys.SPAWN_QUEUE, "http://127.0.0.1:4002")
    gate = defer.Deferred()

    async def slow_probe(_reactor, port, _host):
        if port == 4001:
            await gate
        return True
    async with Setup(redis_server.url, probe=slow_probe) as s:
        looks = []
        take = s.worker._take

        async def counted_take():
            await take()
            looks.append(redis_db.lrange(keys.SPAWN_QUEUE, 0, -1))
        s.worker._take = counted_take
        await until(lambda: defer.succeed(4001 in s.driver.running and len(looks) >= 10))
        assert looks[-10:] == [["http://127.0.0.1:4002"]] * 10  # ten looks, nothing taken
        gate.callback(None)

        async def both():
            return set(await s.servers()) == {URL, "http://127.0.0.1:4002"}
        await until(both)
        assert any("finishing 1 request(s)" in line for line in s.logs)


@pytest_twisted.ensureDeferred
async def test_a_request_that_cannot_even_be_dead_lettered_is_logged_and_kept(redis_db, redis_server):
    redis_db.set(keys.DEAD_LETTERS, "not a list")  # every dead letter fails with WRONGTYPE
    redis_db.lpush(keys.SPAWN_QUEUE, "not a url")
    async with Setup(redis_server.url) as s:
        await until(lambda: defer.succeed(any("left in processing" in line for line in s.logs)))
        assert redis_db.lrange(keys.SPAWNING, 0, -1) == ["not a url"]


class GatedProbe:
    """A probe that says yes once ``gate`` fires; ``probing``: the ports it was asked about."""

    def __init__(self):
        self.gate = defer.Deferred()
        self.probing = []

    async def __call__(self, _reactor, port, _host):
        self.probing.append(port)
        await self.gate
        return True


def probing_an_unlisted_instance(redis_url: str) -> tuple[Setup, GatedProbe]:
    """A worker whose first reconcile pass (the lease held) waits on the probe of 4001."""
    probe = GatedProbe()
    setup = Setup(redis_url, probe=probe)
    setup.driver.running.add(4001)
    return setup, probe


@pytest_twisted.ensureDeferred
async def test_a_reconcile_that_overlaps_a_destroy_does_not_put_the_url_back(redis_db, redis_server):
    s, probe = probing_an_unlisted_instance(redis_server.url)
    gate = probe.gate
    async with s:
        await until(lambda: defer.succeed(probe.probing == [4001]))
        redis_db.lpush(keys.DESTROY_QUEUE, URL)
        await until(lambda: defer.succeed(redis_db.llen(keys.DESTROYING) == 1))
        gate.callback(None)  # the probe answers while the destroy drains
        await until(lambda: defer.succeed(s.driver.removed and not redis_db.llen(keys.DESTROYING)))
        assert await s.servers() == [] and 4001 not in s.driver.running


FIRST = "http://127.0.0.1:4000"


@pytest_twisted.ensureDeferred
async def test_an_instance_that_stops_answering_leaves_servers_and_is_back_once_it_answers(
        redis_db, redis_server):
    async with Setup(redis_server.url) as s:
        await s.leased()
        s.driver.running.update({4001, 4002})
        redis_db.rpush(keys.SERVERS, FIRST, URL, "http://127.0.0.1:4002")
        s.first_answers.add(4000)
        s.driver.frozen.add(4001)
        await s.worker.reconcile()
        assert await s.servers() == [FIRST, "http://127.0.0.1:4002"]
        assert s.driver.removed == [] and 4001 in s.driver.running  # unlisted, not destroyed
        await s.worker.reconcile()
        assert await s.servers() == [FIRST, "http://127.0.0.1:4002"]
        s.driver.frozen.discard(4001)
        await s.worker.reconcile()
        assert await s.servers() == [FIRST, "http://127.0.0.1:4002", URL]
        assert any("4001 did not answer within 1 s" in line for line in s.logs)
        assert any("added http://127.0.0.1:4001 back" in line for line in s.logs)


@pytest_twisted.ensureDeferred
async def test_the_first_instance_is_unlisted_when_it_does_not_answer_and_not_added_back(
        redis_db, redis_server):
    """It puts itself back (dockpart-web re-registers); reconcile never lists it."""
    async with Setup(redis_server.url) as s:
        await s.leased()
        redis_db.rpush(keys.SERVERS, FIRST)
        await s.worker.reconcile()
        assert await s.servers() == []
        assert any("the first instance did not answer" in line for line in s.logs)
        s.first_answers.add(4000)
        await s.worker.reconcile()
        assert await s.servers() == []


@pytest_twisted.ensureDeferred
async def test_an_instance_that_exited_is_removed_and_respawned_on_its_port(redis_db, redis_server):
    async with Setup(redis_server.url) as s:
        await s.leased()
        s.driver.exited.add(4001)
        redis_db.rpush(keys.SERVERS, URL)
        await s.worker.reconcile()
        assert len(s.driver.removed) == 1 and s.driver.removed[0][1] == []  # unlisted first

        async def back():
            return await s.servers() == [URL]
        await until(back)
        assert s.driver.started == [4001] and 4001 in s.driver.running
        assert any("fake instance 4001 exited; removed it and queued a spawn" in line
                   for line in s.logs)


@pytest_twisted.ensureDeferred
async def test_an_instance_that_exited_is_only_removed_when_someone_else_owns_the_count(
        redis_db, redis_server):
    async with Setup(redis_server.url, keep_count=False) as s:
        await s.leased()
        s.driver.exited.add(4001)
        redis_db.rpush(keys.SERVERS, URL)
        await s.worker.reconcile()
        assert len(s.driver.removed) == 1 and not s.driver.exited
        assert await s.servers() == [] and redis_db.llen(keys.SPAWN_QUEUE) == 0
        assert s.driver.started == []


@pytest_twisted.ensureDeferred
async def test_a_spawn_that_never_answers_is_removed_and_dead_lettered(redis_db, redis_server):
    async with Setup(redis_server.url, spawn_timeout=0.3) as s:
        s.driver.frozen.add(4001)  # it starts, runs, and never answers
        redis_db.lpush(keys.SPAWN_QUEUE, URL)
        await until(lambda: defer.succeed(redis_db.llen(keys.DEAD_LETTERS) == 1))
        letter = json.loads(redis_db.lindex(keys.DEAD_LETTERS, 0))
        assert letter["entry"] == URL
        assert letter["reason"] == ("fake instance 4001 did not answer HTTP within 0.3 s; "
                                    "removed it")
        assert s.driver.started == [4001] and len(s.driver.removed) == 1
        assert await s.servers() == [] and redis_db.llen(keys.SPAWNING) == 0


class ExitsAtStart(FakeDriver):
    """Its instances exit at once (an app that cannot start)."""

    async def start(self, port):
        await super().start(port)
        self.running.discard(port)
        self.exited.add(port)


@pytest_twisted.ensureDeferred
async def test_a_spawn_that_exited_fails_at_once_not_after_the_spawn_timeout(redis_db,
                                                                            redis_server):
    async with Setup(redis_server.url, spawn_timeout=30) as s:
        s.driver = s.worker.driver = ExitsAtStart(s.redis)
        began = reactor.seconds()
        redis_db.lpush(keys.SPAWN_QUEUE, URL)
        await until(lambda: defer.succeed(redis_db.llen(keys.DEAD_LETTERS) == 1), 10)
        assert reactor.seconds() - began < 2 * infra_worker.EXIT_LOOK + 1
        letter = json.loads(redis_db.lindex(keys.DEAD_LETTERS, 0))
        assert letter["reason"] == "fake instance 4001 exited before it answered HTTP; removed it"
        assert len(s.driver.removed) == 1 and await s.servers() == []


@pytest_twisted.ensureDeferred
async def test_a_request_taken_while_the_worker_stops_is_left_for_the_next_start(
        redis_db, redis_server):
    """The queue's LMOVE answers after stopService: nothing is begun (stopService could no
    longer cancel it), the entry waits in processing, and the next start finishes it."""
    redis_db.lpush(keys.SPAWN_QUEUE, URL)
    s = Setup(redis_server.url)
    call = s.redis.call
    taken = defer.Deferred()

    def stop_during_the_take(command, *args):
        d = call(command, *args)
        if command != "LMOVE" or taken.called:
            return d
        s.worker.stopService()  # while the LMOVE is on its way
        handed = defer.Deferred()

        def arrived(entry):
            handed.callback(entry)  # the worker goes on from here, before the test does
            taken.callback(entry)
        d.addCallbacks(arrived, handed.errback)
        return handed
    s.redis.call = stop_during_the_take
    async with s:
        assert await taken == URL
        assert not s.worker._tasks and s.driver.started == []  # nothing in hand
    assert redis_db.lrange(keys.SPAWNING, 0, -1) == [URL]
    async with Setup(redis_server.url) as again:
        async def registered():
            return URL in await again.servers()
        await until(registered)
        assert again.driver.started == [4001]


@pytest_twisted.ensureDeferred
async def test_a_reconcile_pass_under_way_ends_with_the_stop(redis_db, redis_server):
    """Its probe answers after stopService: a stopped infra lists nothing."""
    s, probe = probing_an_unlisted_instance(redis_server.url)
    gate = probe.gate
    async with s:
        await until(lambda: defer.succeed(probe.probing == [4001]))
        await s.worker.stopService()
        if not gate.called:  # the stop cancelled the probe
            gate.callback(None)
        assert await s.servers() == []
        assert not any("reconciling" in line for line in s.logs), s.logs  # a stop is no failure


@pytest_twisted.ensureDeferred
async def test_a_queue_that_cannot_be_read_is_logged_once_not_every_tick(redis_db, redis_server):
    redis_db.set(keys.SPAWN_QUEUE, "not a list")  # every LMOVE fails with WRONGTYPE
    s = Setup(redis_server.url)
    call = s.redis.call
    moves = []

    def counted(command, *args):
        if command == "LMOVE":
            moves.append(args[0])
        return call(command, *args)
    s.redis.call = counted
    async with s:
        await until(lambda: defer.succeed(moves.count(keys.SPAWN_QUEUE) >= 20))
        assert sum("taking requests" in line for line in s.logs) == 1
        redis_db.delete(keys.SPAWN_QUEUE)
        redis_db.lpush(keys.SPAWN_QUEUE, URL)

        async def registered():
            return URL in await s.servers()
        await until(registered)
    assert sum("taking requests works again" in line for line in s.logs) == 1
