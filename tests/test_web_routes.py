"""dockpart-web's routes in memory: treq's StubTreq against the WebApp resource, with the
session's real redis-server behind it; no daemon, no socket for HTTP.  Uploads (which need the
daemon's own request class) and the listener are in test_web.py."""

import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from dockpart import keys, web
from dockpart.redisconn import RedisAddress, RedisService
from helpers import free_port

FIRST = "http://127.0.0.1:3000"
BASE = "http://127.0.0.1:3000/"
TOKEN = "sc4le-token"


def start_app(address: RedisAddress, timeout: float = 2.0, **kwargs) -> web.WebApp:
    redis = RedisService(address, timeout, reactor)
    redis.startService()
    app = web.WebApp(redis, "127.0.0.1", 3000, kwargs.pop("max_instances", 10),
                     1024 * 1024, reactor=reactor, **kwargs)
    app.url = FIRST
    return app


@pytest.fixture
def app_for(redis_server, redis_db):
    """Makes WebApps on the session's (emptied) Redis; stops their Redis clients after."""
    made = []

    def make(**kwargs):
        made.append(start_app(RedisAddress("127.0.0.1", redis_server.port, 0), **kwargs))
        return made[-1]

    yield make
    for app in made:
        pytest_twisted.blockon(app.redis.stopService())


@pytest.fixture
def app(app_for):
    return app_for()


async def _pumped(client: StubTreq, d):
    """``d``'s result, moving the in-memory HTTP bytes while the handler waits on Redis."""
    results: list = []
    d.addBoth(results.append)
    for _ in range(500):  # at most 5 s
        client.flush()
        if results:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert results, "no answer within 5 s"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


async def fetch(resource, path, method="GET", **kwargs):
    """(response, body text) of one request."""
    client = StubTreq(resource)
    response = await _pumped(client, client.request(method, BASE + path, **kwargs))
    body = await _pumped(client, client.content(response))
    return response, body.decode("utf-8")


@pytest_twisted.ensureDeferred
async def test_index_names_the_instance(app):
    response, body = await fetch(app, "")
    assert response.code == 200 and FIRST in body


@pytest_twisted.ensureDeferred
async def test_set_then_get_shows_the_message_and_an_unset_key_is_404(app, redis_db):
    response, _ = await fetch(app, "set/greeting")
    assert response.code == 200
    assert redis_db.ttl(keys.user_key("greeting")) > 0
    response, body = await fetch(app, "get/greeting")
    assert response.code == 200 and web.MESSAGE in body
    response, body = await fetch(app, "get/other")
    assert response.code == 404 and "expired" in body


@pytest_twisted.ensureDeferred
async def test_a_key_path_deeper_than_one_segment_is_404(app):
    response, _ = await fetch(app, "set/a/b")
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_recent_lists_visits_newest_first_without_a_token(app):
    await fetch(app, "get/one")
    await fetch(app, f"spawn?token={TOKEN}&x=1")
    _, body = await fetch(app, "recent")
    assert body.index("/spawn?x=1") < body.index("/get/one")
    assert TOKEN not in body


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404_and_known_ones_take_only_their_method(app):
    response, _ = await fetch(app, "nothing-here")
    assert response.code == 404
    response, _ = await fetch(app, "spawn", method="POST")
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET"]


@pytest_twisted.ensureDeferred
async def test_head_is_answered_as_get_without_a_body(app):
    response, body = await fetch(app, "", method="HEAD")
    assert response.code == 200 and body == ""


@pytest_twisted.ensureDeferred
async def test_spawn_queues_the_next_port_and_refuses_at_the_ceiling(app_for, redis_db):
    app = app_for(max_instances=2)
    redis_db.rpush(keys.SERVERS, FIRST)
    response, body = await fetch(app, "spawn")
    assert response.code == 202 and "http://127.0.0.1:3001" in body
    assert redis_db.lrange(keys.SPAWN_QUEUE, 0, -1) == ["http://127.0.0.1:3001"]
    response, _ = await fetch(app, "spawn")
    assert response.code == 429
    assert redis_db.llen(keys.SPAWN_QUEUE) == 1


@pytest_twisted.ensureDeferred
async def test_destroy_never_takes_the_first_instance(app, redis_db):
    redis_db.rpush(keys.SERVERS, FIRST)
    response, _ = await fetch(app, "destroy")
    assert response.code == 409
    redis_db.rpush(keys.SERVERS, "http://127.0.0.1:3001")
    response, body = await fetch(app, "destroy")
    assert response.code == 202 and "http://127.0.0.1:3001" in body
    assert redis_db.lrange(keys.DESTROY_QUEUE, 0, -1) == ["http://127.0.0.1:3001"]


@pytest_twisted.ensureDeferred
async def test_with_a_scale_token_spawn_and_destroy_need_it(app_for, redis_db):
    app = app_for(scale_token=TOKEN)
    redis_db.rpush(keys.SERVERS, FIRST)
    for path in ("spawn", "destroy", f"spawn?token=wrong"):
        response, _ = await fetch(app, path)
        assert response.code == 403, path
    assert redis_db.llen(keys.SPAWN_QUEUE) == 0
    response, _ = await fetch(app, "spawn", headers={"Authorization": [f"Bearer {TOKEN}"]})
    assert response.code == 202
    response, _ = await fetch(app, f"spawn?token={TOKEN}")
    assert response.code == 202
    assert redis_db.llen(keys.SPAWN_QUEUE) == 2


@pytest_twisted.ensureDeferred
async def test_listservers_in_json_names_every_list_and_the_autoscaler(app, redis_db):
    redis_db.rpush(keys.SERVERS, FIRST)
    redis_db.rpush(keys.SPAWN_QUEUE, "http://127.0.0.1:3001")
    redis_db.set(keys.AUTOSCALE_DESIRED, "2")
    redis_db.lpush(keys.AUTOSCALE_DECISIONS, json.dumps({"action": "up", "reason": "load"}),
                   "not json")
    response, body = await fetch(app, "listservers", headers={"Accept": ["application/json"]})
    assert response.code == 200
    assert json.loads(body) == {
        "servers": [FIRST], "spawning": ["http://127.0.0.1:3001"], "destroying": [],
        "autoscale": {"desired": 2, "decisions": [{"action": "up", "reason": "load"}]}}
    response, body = await fetch(app, "listservers")
    assert "<h2>Autoscaler</h2>" in body and "http://127.0.0.1:3001" in body


@pytest_twisted.ensureDeferred
async def test_work_rejects_what_is_not_a_whole_number_of_ms_in_range(app):
    for ms in ("-1", "abc", str(web.MAX_WORK_MS + 1)):
        response, _ = await fetch(app, f"work?ms={ms}")
        assert response.code == 400, ms
    response, body = await fetch(app, "work?ms=0")
    assert response.code == 200 and body == "worked 0 ms\n"


@pytest_twisted.ensureDeferred
async def test_without_redis_only_the_index_answers_and_errors_name_no_address():
    port = free_port()
    app = start_app(RedisAddress("127.0.0.1", port, 0), timeout=0.2)
    try:
        response, _ = await fetch(app, "")
        assert response.code == 200
        response, body = await fetch(app, "set")
        assert response.code == 503
        assert str(port) not in body and "dockpart:" not in body
    finally:
        await app.redis.stopService()
