"""dockpart-infra's roll-over (dockpart.rollover) on a real Redis, with stand-ins for the
driver and workers and a Clock: each AppsRunner step is run by hand, the workers' moves
(a spawn that serves, a destroy that ends, a spawn that fails) are made by the test."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from dockpart import apps, keys, releases
from dockpart.drivers.apps import ReleasePlan
from dockpart.infra_apps import AppsRunner
from dockpart.redisconn import RedisAddress, RedisService
from dockpart.releases import Release
from dockpart.deploy.front import Scripts
from test_infra_apps import LOW, HIGH, Driver, Worker, report, url


class PlanDriver(ReleasePlan, Driver):
    def __init__(self, app):
        super().__init__(app)
        self.releases = {}


@pytest.fixture
def rolling(redis_db, redis_server):
    """App ``a``: 2 instances of v1 serving, v2 recorded; a runner stepped by hand."""
    client = Scripts(redis_db)
    apps.create(client, apps.App("a", desired=2, release="v1"))
    for n in (1, 2):
        releases.keep(client, "a", Release(f"v{n}", command=f"run v{n}", dir="/tmp"))
    t = keys.app_tier("a")
    redis_db.rpush(t.servers, url(LOW), url(LOW + 1))
    redis_db.hset(keys.APP_PORTS, mapping={LOW: "a", LOW + 1: "a"})
    redis_db.hset(keys.app_instance_releases("a"), mapping={url(LOW): "v1", url(LOW + 1): "v1"})
    clock = Clock()
    clock.advance(1_000_000)
    redis = RedisService(RedisAddress.parse(redis_server.url), 2.0, reactor)
    redis.startService()
    runner = AppsRunner(redis, PlanDriver, lambda app, driver: Worker(), host="127.0.0.1",
                        ports=(LOW, HIGH), clock=clock)
    yield redis_db, client, runner, t, clock
    redis.stopService()


def serve(redis_db, t, u):
    """What the worker does once a new instance answers."""
    redis_db.lrem(t.spawn_queue, 0, u)
    redis_db.rpush(t.servers, u)


def finish_destroys(redis_db, t):
    for u in redis_db.lrange(t.destroy_queue, 0, -1):
        redis_db.lrem(t.servers, 0, u)
    redis_db.delete(t.destroy_queue)


def news(redis_db):
    return [json.loads(line) for line in reversed(redis_db.lrange(
        keys.app_rollover_news("a"), 0, -1))]


@pytest_twisted.ensureDeferred
async def test_one_new_instance_at_a_time_joins_before_an_old_one_leaves(rolling):
    """Never fewer serving than the scale, never more than one beyond; the release is live
    once no old instance is in the rotation."""
    redis_db, client, runner, t, clock = rolling
    releases.start_rollover(client, "a", "v2")
    await runner.step()
    [new] = redis_db.lrange(t.spawn_queue, 0, -1)
    assert redis_db.hget(keys.app_instance_releases("a"), new) == "v2"
    driver = runner.tiers["a"].driver
    assert driver.release_for(int(new.rsplit(":", 1)[1])).id == "v2"
    assert driver.release_for(LOW).id == "v1"
    await runner.step()  # the new one is not serving yet: nothing more, nothing leaves
    assert redis_db.llen(t.spawn_queue) == 1 and redis_db.llen(t.destroy_queue) == 0
    serve(redis_db, t, new)
    await runner.step()
    [old] = redis_db.lrange(t.destroy_queue, 0, -1)
    assert old in (url(LOW), url(LOW + 1))
    await runner.step()  # 1 new + 1 old staying = the scale: the second new one
    [second] = redis_db.lrange(t.spawn_queue, 0, -1)
    serve(redis_db, t, second)
    await runner.step()
    assert redis_db.llen(t.destroy_queue) == 2
    assert redis_db.hget(keys.app_record("a"), "release") == "v1"  # old ones still listed
    finish_destroys(redis_db, t)
    await runner.step()
    record = redis_db.hgetall(keys.app_record("a"))
    assert (record["release"], record["rollover"]) == ("v2", "")
    assert sorted(redis_db.lrange(t.servers, 0, -1)) == sorted([new, second])
    assert news(redis_db)[-1]["done"] is True
    await runner.step()  # the count again: 2 serving, 2 wanted, nothing asked
    assert redis_db.llen(t.spawn_queue) == 0 and redis_db.llen(t.destroy_queue) == 0


@pytest_twisted.ensureDeferred
async def test_the_autoscaler_leaves_the_count_alone_during_a_rollover(rolling):
    redis_db, client, runner, t, clock = rolling
    apps.autoscale(client, "a", 1, 6, 1.0, 2)
    releases.start_rollover(client, "a", "v2")
    report(redis_db, clock, "a", {url(LOW): 20, url(LOW + 1): 20})  # wants 6
    await runner.step()
    assert redis_db.hget(keys.app_record("a"), "desired") == "2"
    assert redis_db.llen(t.spawn_queue) == 1  # the roll-over's one, not the autoscaler's 4


@pytest_twisted.ensureDeferred
async def test_a_new_instance_that_never_serves_fails_the_rollover_and_v1_is_kept(rolling):
    """The new release's serving instances are drained; the count comes back on v1."""
    redis_db, client, runner, t, clock = rolling
    releases.start_rollover(client, "a", "v2")
    await runner.step()
    [first] = redis_db.lrange(t.spawn_queue, 0, -1)
    serve(redis_db, t, first)
    await runner.step()  # an old one leaves for it
    finish_destroys(redis_db, t)
    await runner.step()
    [second] = redis_db.lrange(t.spawn_queue, 0, -1)
    # The worker dead-letters it: it never answered.
    redis_db.delete(t.spawn_queue)
    redis_db.lpush(keys.DEAD_LETTERS, json.dumps({
        "queue": "spawn", "entry": second, "list": t.servers, "time": clock.seconds(),
        "reason": "process of app a v2 did not answer HTTP within 4 s; removed it"}))
    await runner.step()
    record = redis_db.hgetall(keys.app_record("a"))
    assert (record["release"], record["rollover"]) == ("v1", "")
    assert news(redis_db)[-1] == {"done": False, "release": "v2", "reason":
                                  "process of app a v2 did not answer HTTP within 4 s; "
                                  "removed it"}
    assert redis_db.lrange(t.destroy_queue, 0, -1) == [first]
    finish_destroys(redis_db, t)
    await runner.step()  # back to the count, on the live release
    [refill] = redis_db.lrange(t.spawn_queue, 0, -1)
    assert redis_db.hget(keys.app_instance_releases("a"), refill) == "v1"
    assert runner.tiers["a"].driver.release_for(int(refill.rsplit(":", 1)[1])).id == "v1"


def test_destroying_an_app_ends_the_wait_of_a_push_rolling_it_over(rolling):
    redis_db, client, runner, t, clock = rolling
    releases.start_rollover(client, "a", "v2")
    apps.destroy(client, "a")
    assert news(redis_db)[-1] == {"done": False, "release": "v2",
                                  "reason": "the app was destroyed"}
    assert redis_db.hget(keys.app_record("a"), "rollover") == ""


@pytest_twisted.ensureDeferred
async def test_an_app_with_nothing_to_run_waits_for_its_first_push(redis_db, redis_server):
    """No command, no image, no release: no spawn is asked for (each would fail)."""
    apps.create(Scripts(redis_db), apps.App("new", desired=2))
    redis = RedisService(RedisAddress.parse(redis_server.url), 2.0, reactor)
    redis.startService()
    try:
        runner = AppsRunner(redis, PlanDriver, lambda app, driver: Worker(), host="127.0.0.1",
                            ports=(LOW, HIGH), clock=Clock())
        await runner.step()
        assert redis_db.llen(keys.app_tier("new").spawn_queue) == 0
        apps.update(Scripts(redis_db), "new", command="run")
        await runner.step()
        assert redis_db.llen(keys.app_tier("new").spawn_queue) == 2
    finally:
        await redis.stopService()


def at_zero(redis_db, client, t, zero_after: float = 30.0) -> None:
    """App ``a`` autoscaled with --min 0 --scale-to-zero-after, drained to zero instances."""
    apps.autoscale(client, "a", 0, 4, 2.0, 0, zero_after)
    redis_db.delete(t.servers, keys.APP_PORTS, keys.app_instance_releases("a"))


@pytest_twisted.ensureDeferred
async def test_a_release_pushed_to_an_app_at_zero_starts_one_instance_that_idles_back(rolling):
    """The push's release is health-gated as in any roll-over (one instance of it must serve),
    then the idle rule takes the app back to zero after its window."""
    redis_db, client, runner, t, clock = rolling
    at_zero(redis_db, client, t)
    releases.start_rollover(client, "a", "v2")
    await runner.step()
    [new] = redis_db.lrange(t.spawn_queue, 0, -1)
    assert redis_db.hget(keys.app_instance_releases("a"), new) == "v2"
    assert redis_db.hget(keys.app_record("a"), "desired") == "1"
    assert "a is at zero: one instance of v2 starts" in news(redis_db)[0]["say"]
    clock.advance(2.0)
    serve(redis_db, t, new)
    await runner.step()
    record = redis_db.hgetall(keys.app_record("a"))
    assert (record["release"], record["rollover"]) == ("v2", "")
    assert news(redis_db)[-1]["done"] is True
    await idles_back_after(redis_db, runner, clock, new, 30.0)
    assert redis_db.lrange(t.destroy_queue, 0, -1) == [new]


async def idles_back_after(redis_db, runner, clock, instance: str, window: float) -> None:
    """App ``a``'s one instance, idle since the roll-over ended, still serves a second before
    ``window`` is over and is drained to zero a second after."""
    for seconds, desired in ((window - 1.0, "1"), (2.0, "0")):
        clock.advance(seconds)
        report(redis_db, clock, "a", {instance: 0}, requests=0)
        await runner.step()
        assert redis_db.hget(keys.app_record("a"), "desired") == desired


@pytest_twisted.ensureDeferred
async def test_the_idle_rule_waits_for_a_rollover_and_its_window_restarts_after(rolling):
    """A roll-over longer than the idle window drains nothing mid-way, and the new release's
    instance gets a whole window once it is live."""
    redis_db, client, runner, t, clock = rolling
    apps.autoscale(client, "a", 0, 4, 2.0, 1, 10.0)
    redis_db.rpush(t.destroy_queue, url(LOW + 1))  # the app had one instance left
    finish_destroys(redis_db, t)
    await runner.step()
    releases.start_rollover(client, "a", "v2")
    for _ in range(3):  # 20 s between steps, no request: twice the window, each time
        clock.advance(20.0)
        report(redis_db, clock, "a", {url(LOW): 0}, requests=0)
        await runner.step()
        assert redis_db.hget(keys.app_record("a"), "desired") == "1"
        if redis_db.llen(t.spawn_queue):
            serve(redis_db, t, redis_db.lindex(t.spawn_queue, 0))
        finish_destroys(redis_db, t)
    assert redis_db.hget(keys.app_record("a"), "release") == "v2"
    [new] = redis_db.lrange(t.servers, 0, -1)
    await idles_back_after(redis_db, runner, clock, new, 10.0)


@pytest_twisted.ensureDeferred
async def test_requests_held_during_a_rollover_at_zero_go_to_the_new_release(rolling):
    """An activation while the app rolls over from zero: the count the held load asks for
    is filled by the roll-over, on the new release, and the activation ends when the first
    of them serves."""
    redis_db, client, runner, t, clock = rolling
    at_zero(redis_db, client, t)
    releases.start_rollover(client, "a", "v2")
    apps.activate(client, "a", "p:1", 3)  # 3 held, 2 in flight each: 2 instances
    await runner.step()
    assert redis_db.hget(keys.app_record("a"), "desired") == "2"
    [first] = redis_db.lrange(t.spawn_queue, 0, -1)  # one at a time, as in any roll-over
    assert redis_db.hget(keys.app_instance_releases("a"), first) == "v2"
    serve(redis_db, t, first)
    await runner.step()
    assert not redis_db.exists(keys.app_activation("a"))  # the held requests go to it
    [second] = redis_db.lrange(t.spawn_queue, 0, -1)
    assert redis_db.hget(keys.app_instance_releases("a"), second) == "v2"
    serve(redis_db, t, second)
    await runner.step()
    record = redis_db.hgetall(keys.app_record("a"))
    assert (record["release"], record["rollover"], record["desired"]) == ("v2", "", "2")

