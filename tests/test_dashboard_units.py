"""The dashboard's pieces in memory: instance states, the history and its marks, the page."""

from types import SimpleNamespace

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from dockpart import keys, load
from dockpart.records import BackendLoad, LoadReport
from dockpart.redisconn import RedisAddress, RedisService, RedisUnavailable
from dockpart.dashboard_page import live_html
from dockpart.dashboard_state import TierWatch, figures, instance_state

EMPTY = {"servers": [], "spawn_queue": [], "spawning": [], "destroy_queue": [], "destroying": []}
A, B = "http://127.0.0.1:3001", "http://127.0.0.1:3002"


def lists(**kw):
    return {**EMPTY, **kw}


@pytest.mark.parametrize("where, seen, driver_known, state", [
    (lists(servers=[A], destroying=[A]), {"running": True}, True, "draining"),
    (lists(destroy_queue=[A], servers=[A]), {"running": True}, True, "draining"),
    (lists(spawning=[A]), {"running": True}, True, "starting"),
    (lists(spawn_queue=[A]), None, True, "queued"),
    (lists(servers=[A]), {"running": True}, True, "running"),
    (lists(servers=[A]), None, True, "external"),
    (lists(servers=[A]), {"running": False, "state": "exited"}, True, "exited"),
    (lists(), {"running": True}, True, "unlisted"),
    (lists(servers=[A]), None, False, "listed"),
])
def test_an_instance_state_says_where_it_is_in_its_life(where, seen, driver_known, state):
    assert instance_state(A, where, seen, driver_known) == state


def test_figures_are_rates_and_quantiles_in_milliseconds():
    buckets = load.empty_buckets()
    buckets[load.bucket_of(0.004)] = 90
    buckets[load.bucket_of(0.08)] = 10
    merged = load.merge([LoadReport({A: BackendLoad(requests=100, errors=4, inflight=2,
                                                    latency_buckets=buckets, healthy=True)})])[A]
    assert figures(merged, 2.0) == {"rps": 50.0, "errors": 2.0, "p50_ms": 5.0, "p95_ms": 100.0,
                                    "inflight": 2}


def watch(clock, history=10.0):
    worker = SimpleNamespace(driver=SimpleNamespace(name="process"), id="me",
                             rules=SimpleNamespace(host="127.0.0.1", first_port=3000))
    return TierWatch(None, worker, interval=1.0, history=history, reactor=clock)


def look(time, servers):
    """A snapshot as TierWatch makes it, reduced to what the history records."""
    return {"time": time, "queues": lists(servers=servers), "tier": {"rps": 0.0, "p95_ms": None},
            "instances": [{"url": u, "rps": None} for u in servers]}


def test_the_history_marks_each_spawn_and_destroy_once():
    w = watch(Clock())
    w._record(look(1.0, [A]))
    w._record(look(2.0, [A, B]))
    w._record(look(3.0, [A, B]))
    w._record(look(4.0, [B]))
    history = w.history()
    assert history["time"] == [1.0, 2.0, 3.0, 4.0]
    assert history["instances"] == [1, 2, 2, 1]
    assert history["events"] == [{"time": 2.0, "kind": "spawn", "url": B},
                                 {"time": 4.0, "kind": "destroy", "url": A}]
    later = w.history(since=3.0)
    assert later["time"] == [4.0] and later["events"] == [{"time": 4.0, "kind": "destroy",
                                                           "url": A}]


def test_the_history_keeps_only_its_window_and_per_instance_columns_line_up():
    w = watch(Clock(), history=3.0)
    for t in range(1, 6):
        w._record({**look(float(t), [A]), "instances": [{"url": A, "rps": float(t)}]})
    w._record({**look(6.0, [A, B]), "instances": [{"url": A, "rps": 6.0}, {"url": B, "rps": 1.0}]})
    history = w.history()
    assert history["time"] == [4.0, 5.0, 6.0]
    assert history["per_instance"] == {A: [4.0, 5.0, 6.0], B: [None, None, 1.0]}


def test_looking_happens_every_interval_and_stops_with_the_service():
    clock = Clock()
    w = watch(clock)
    calls = []

    async def refresh(record=False):
        calls.append(record)
        return {}
    w.refresh = refresh
    w.startService()
    clock.advance(1.0)
    clock.advance(1.0)
    assert calls == [True, True, True]
    w.stopService()
    clock.advance(5.0)
    assert calls == [True, True, True]


def test_a_standby_page_has_no_buttons_and_names_the_lease_holder():
    snapshot = {"time": 1.0, "error": None, "role": "standby",
                "infra": {"id": "standby-id", "driver": "process", "driver_error": None},
                "lease_holder": "holder-id",
                "tier": {"instances": 1, "proxies": 0, "rps": 0.0, "errors": 0.0,
                         "p50_ms": None, "p95_ms": None, "inflight": 0},
                "instances": [{"url": A, "state": "listed", "id": None, "in_servers": True,
                               "first": False, "health": "no figures", "rps": None,
                               "errors": None, "p50_ms": None, "p95_ms": None,
                               "inflight": None}],
                "queues": lists(servers=[A]), "dead_letters": [],
                "autoscale": {"decisions": [], "desired": None, "limits": {}},
                "deploy": {"live": []}}
    html = live_html(snapshot, "csrf")
    assert "<b>standby</b>" in html and "holder-id" in html
    assert "<form" not in html
    active = live_html({**snapshot, "role": "active"}, "csrf")
    assert active.count("<form") == 3  # spawn, destroy A, limits


class _Away:
    """A Redis handle whose every call fails as RedisService's do while Redis is down."""

    def call(self, *args):
        return defer.fail(RedisUnavailable("no connection to redis://127.0.0.1:1/0"))

    eval = call


def test_while_redis_is_away_the_last_figures_stay_and_the_page_says_so():
    w = watch(Clock())
    w.snapshot = {"time": 5.0, "error": None, "instances": [{"url": A}]}
    w.redis = _Away()
    looked = []
    defer.ensureDeferred(w.refresh(record=True)).addCallback(looked.append)
    assert looked[0]["time"] == 5.0 and looked[0]["instances"] == [{"url": A}]
    assert looked[0]["error"].startswith("Redis is unreachable")
    assert w.history()["time"] == []  # nothing made up for the charts


def test_an_older_look_that_ends_last_does_not_replace_a_newer_one():
    """A button's look (after a spawn) and the periodic one overlap."""
    clock = Clock()
    w = watch(clock)
    slow = defer.Deferred()

    async def look(now):
        if now == 1.0:
            await slow
        return {"time": now, "error": None, "instances": []}
    w._look = look
    clock.advance(1.0)
    older = defer.ensureDeferred(w.refresh())
    clock.advance(1.0)
    defer.ensureDeferred(w.refresh())
    assert w.snapshot["time"] == 2.0
    slow.callback(None)
    assert older.result["time"] == 1.0 and w.snapshot["time"] == 2.0


@pytest_twisted.ensureDeferred
async def test_an_instance_moving_into_servers_mid_look_is_seen_exactly_once(redis_db,
                                                                              redis_server):
    """The worker registers a spawned instance (spawning -> servers) while the dashboard looks:
    read list by list, the tier looked an instance short; the view is one moment."""
    redis = RedisService(RedisAddress.parse(redis_server.url), 2.0, reactor)
    redis.startService()
    moving = "http://127.0.0.1:3001"
    redis_db.rpush(keys.SPAWNING, moving)
    send, sent = redis.call, []

    def call(*args):  # after the dashboard's first command, the instance moves
        if len(sent) == 1:
            redis_db.lmove(keys.SPAWNING, keys.SERVERS, "LEFT", "RIGHT")
        sent.append(args[0])
        return send(*args)
    redis.call = call
    try:
        w = watch(reactor)
        w.redis = redis
        snapshot = await w.refresh()
    finally:
        await redis.stopService()
    assert snapshot["error"] is None
    places = [name for name, urls in snapshot["queues"].items() if moving in urls]
    assert places == ["spawning"]
    assert [row["url"] for row in snapshot["instances"]] == [moving]


def _dashboard(clock, token="t0ken"):
    from dockpart.dashboard import Dashboard
    worker = SimpleNamespace(driver=SimpleNamespace(name="process"), id="me",
                             rules=SimpleNamespace(host="127.0.0.1", first_port=3000))
    watch = SimpleNamespace(redis=None, worker=worker,
                            snapshot={"time": None, "error": "not looked yet", "instances": []})
    return Dashboard(watch, token, session_seconds=60, clock=clock)


@pytest_twisted.ensureDeferred
async def test_a_session_expires_after_its_time_and_then_opens_nothing():
    """In memory (StubTreq, Clock): a login's cookie works for session_seconds, then never."""
    clock = Clock()
    dashboard = _dashboard(clock)
    client = StubTreq(dashboard)
    login = await client.post("http://localhost/login", data={"token": "t0ken"},
                              allow_redirects=False)
    assert login.code == 303
    cookie = login.headers.getRawHeaders("set-cookie")[0].split(";")[0]
    assert "Max-Age=60" in login.headers.getRawHeaders("set-cookie")[0]

    async def live():
        reply = await client.get("http://localhost/live", headers={"Cookie": cookie})
        return reply.code
    clock.advance(59)
    assert await live() == 200
    clock.advance(1)
    assert await live() == 401
    assert dashboard.sessions == {}


@pytest_twisted.ensureDeferred
async def test_a_login_with_two_tokens_is_a_400_whichever_matches():
    client = StubTreq(_dashboard(Clock()))
    for url, form in (("http://localhost/login?token=wrong", {"token": "t0ken"}),
                      ("http://localhost/login", [("token", "wrong"), ("token", "t0ken")])):
        reply = await client.post(url, data=form, allow_redirects=False)
        assert reply.code == 400, url
        assert not reply.headers.hasHeader("set-cookie")


def apps_snapshot(app: dict) -> dict:
    """An active infra's snapshot of an empty seed tier and one app."""
    return {"time": 1.0, "error": None, "role": "active",
            "infra": {"id": "me", "driver": "process", "driver_error": None},
            "lease_holder": "me",
            "tier": {"instances": 0, "proxies": 0, "rps": 0.0, "errors": 0.0,
                     "p50_ms": None, "p95_ms": None, "inflight": 0},
            "instances": [], "queues": lists(), "dead_letters": [],
            "autoscale": {"decisions": [], "desired": None, "limits": {}},
            "deploy": {"live": []}, "apps": [app]}


def test_each_app_shows_its_scale_its_instances_their_figures_and_a_scale_button():
    from dockpart.apps import App
    from dockpart.dashboard_state import app_view
    report = LoadReport({"http://127.0.0.1:20000": BackendLoad(
        requests=10, errors=0, inflight=1, latency_buckets=tuple(load.empty_buckets()),
        healthy=True)}, interval=1.0, app="shop")
    shop = app_view(App("shop", command="x", desired=2, domains=("shop.example.org",),
                        instances=("http://127.0.0.1:20000",)), [report])
    assert shop["rps"] == 10.0 and shop["instances"][0]["health"] == "healthy"
    snapshot = apps_snapshot(shop)
    html = live_html(snapshot, "csrf")
    assert 'data-app="shop"' in html and "1 / 2" in html and "shop.example.org" in html
    assert 'action="api/apps/scale"' in html and 'name="count"' in html
    assert 'action="api/apps/scale"' not in live_html({**snapshot, "role": "standby"}, "csrf")


def test_each_app_shows_its_live_release_the_one_it_rolls_over_to_and_its_history():
    from dockpart.apps import App
    from dockpart.dashboard_state import app_view
    from dockpart.releases import Release
    history = [Release("v3", "c" * 40, 30.0, note="push ccccccc <b>", dir="/r/v3"),
               Release("v2", "b" * 40, 20.0, note="config A=", dir="/r/v1"),
               Release("v1", "a" * 40, 10.0, note="push aaaaaaa", dir="/r/v1")]
    shop = app_view(App("shop", command="x", release="v2", rollover="v3"), [], history)
    assert [(r["id"], r["commit"], r["live"]) for r in shop["releases"]] == [
        ("v3", "ccccccc", False), ("v2", "bbbbbbb", True), ("v1", "aaaaaaa", False)]
    snapshot = apps_snapshot(shop)
    html = live_html(snapshot, "csrf")
    assert "<summary>v2 → <b>v3</b></summary>" in html
    assert "<li class=live>v2 bbbbbbb" in html and "config A=" in html
    assert "push ccccccc &lt;b&gt;" in html  # a note is text, never markup
    plain = app_view(App("blog", command="x"), [])
    assert plain["releases"] == []


def test_an_app_at_zero_shows_so_with_its_held_requests_and_activation_times():
    from dockpart.apps import App
    from dockpart.dashboard_state import app_view
    from dockpart.records import HoldFigures, LoadReport
    reports = [LoadReport(app="nap", hold=HoldFigures(3, activation_recent=(0.52, 0.41))),
               LoadReport(app="nap", hold=HoldFigures(2, activation_recent=(0.47,)))]
    nap = app_view(App("nap", command="x", desired=0, autoscale=True, min=0, zero_after=60),
                   reports)
    assert nap["held"] == 5 and nap["activations"] == [0.41, 0.47, 0.52]
    html = live_html(apps_snapshot(nap), "csrf")
    assert "to zero after 60 s idle" in html and "at zero" in html and "5 held" in html
    assert "started from zero in 0.41 0.47 0.52 s" in html
