"""Fast checks of dockpart-proxy's rotation, passive health and metrics, on a Clock."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from dockpart.proxy_backends import BackendSet
from dockpart.proxy_dispatch import ProxyFactory
from dockpart.proxy_framing import OWN_HEADERS, end_to_end
from dockpart.proxy_admin import metrics, status
from dockpart.proxy_sync import RedisList

URLS = ["http://127.0.0.1:3001", "http://127.0.0.1:3002", "http://127.0.0.1:3003"]


class NoRedis:
    """Rotation and health never call Redis; status only asks whether it is connected."""

    connected = False


def backends(urls=URLS, balance="local"):
    clock = Clock()
    clock.advance(1000)
    pool = BackendSet("servers", balance, clock, down_time=10)
    pool.update(list(urls))
    return pool, clock


def urls_of(pool, n, tried=()):
    return [pool.pick(tried).url for _ in range(n)]


def test_local_rotation_goes_round_in_list_order():
    pool, _ = backends()
    assert urls_of(pool, 6) == URLS + URLS


def test_a_failed_backend_is_left_out_for_down_time_then_tried_again():
    pool, clock = backends()
    pool.failed(pool.by_url[URLS[1]])
    assert URLS[1] not in urls_of(pool, 6)
    clock.advance(10.1)
    assert URLS[1] in urls_of(pool, 3)


def test_when_every_backend_is_down_the_one_down_longest_is_tried():
    pool, clock = backends()
    for url in (URLS[2], URLS[0], URLS[1]):
        pool.failed(pool.by_url[url])
        clock.advance(1)
    assert pool.pick().url == URLS[2]


def test_retries_skip_backends_already_tried_and_end_with_none():
    pool, _ = backends()
    tried = [pool.by_url[URLS[0]], pool.by_url[URLS[1]]]
    assert pool.pick(tried).url == URLS[2]
    assert pool.pick(tried + [pool.by_url[URLS[2]]]) is None


def test_updates_keep_figures_and_ignore_entries_that_are_not_backend_urls():
    pool, _ = backends()
    pool.by_url[URLS[0]].requests = 7
    pool.update([URLS[0], "redis://nope", "http://127.0.0.1:3009/with/path"])
    assert [b.url for b in pool.ring] == [URLS[0]]
    assert pool.ring[0].requests == 7
    assert URLS[1] not in pool.by_url


def test_empty_list_picks_nothing():
    pool, _ = backends(urls=[])
    assert pool.known and pool.pick() is None


def test_shared_choice_maps_lmove_answers():
    pool, _ = backends(balance="shared")
    assert pool.shared_choice(None) is None  # empty list: 503
    assert pool.shared_choice(URLS[2]).url == URLS[2]
    assert pool.shared_choice("http://127.0.0.1:3999").url == "http://127.0.0.1:3999"
    # An error answer (or Redis away) falls back to the local rotation.
    assert pool.shared_choice(RuntimeError("WRONGTYPE")).url in URLS
    pool.failed(pool.by_url[URLS[2]])
    assert pool.shared_choice(URLS[2]).url != URLS[2]


def test_status_and_metrics_describe_each_backend():
    pool, clock = backends()
    factory = ProxyFactory(pool, clock)
    pool.failed(pool.by_url[URLS[1]])
    factory.stats.responses[200] = 5
    text = metrics(factory)
    assert f'dockpart_proxy_backend_up{{backend="{URLS[0]}"}} 1' in text
    assert f'dockpart_proxy_backend_up{{backend="{URLS[1]}"}} 0' in text
    assert 'dockpart_proxy_responses_total{code="200"} 5' in text
    report = status(factory)
    assert [b["healthy"] for b in report["backends"]] == [True, False, True]
    assert report["backends"][1]["errors"] == 1 and report["balance"] == "local"


class ListRedis:
    """Answers LRANGE from a Python list, counting the calls; a Deferred per call."""

    connected = True

    def __init__(self, urls):
        self.urls = urls
        self.calls = []

    def call(self, command, *args):
        d = defer.Deferred()
        self.calls.append(d)
        return d

    def answer_all(self):
        for d in self.calls:
            if not d.called:
                d.callback(list(self.urls))


def test_concurrent_rereads_share_one_read_and_see_the_new_list():
    redis = ListRedis([URLS[0]])
    clock = Clock()
    pool = BackendSet("servers", "local", clock)
    lists = RedisList(redis, pool)
    pool.update([])
    seen = []
    for _ in range(3):
        lists.reread().addCallback(lambda _: seen.append(pool.pick()))
    assert len(redis.calls) == 1 and seen == []
    redis.answer_all()
    assert [b.url for b in seen] == [URLS[0]] * 3


def test_end_to_end_drops_hop_by_hop_and_connection_named_headers():
    out = [b"GET / HTTP/1.1"]
    seen = end_to_end([(b"Host", b"a"), (b"Connection", b"keep-alive, X-Mine"), (b"X-Mine", b"1"),
                       (b"Keep-Alive", b"5"), (b"TE", b"trailers"), (b"Proxy-Authorization", b"x"),
                       (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-For", b"5.6.7.8"),
                       (b"Accept", b"*/*")], out, OWN_HEADERS)
    assert out == [b"GET / HTTP/1.1", b"Host: a", b"Accept: */*"]
    assert seen[b"x-forwarded-for"] == b"1.2.3.4, 5.6.7.8" and seen[b"host"] == b"a"


def test_end_to_end_keeps_upgrade_for_a_websocket_handshake():
    out = []
    end_to_end([(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], out, upgrade=True)
    assert out == [b"Upgrade: websocket", b"Connection: Upgrade"]


def test_an_empty_read_after_redis_was_away_keeps_the_list_until_a_notice():
    redis = ListRedis([])
    pool = BackendSet("servers", "local", Clock())
    lists = RedisList(redis, pool)
    pool.update(URLS)
    lists.distrust_empty()  # what a failed read or a lost notice connection does
    lists.refresh()
    redis.answer_all()
    assert [b.url for b in pool.ring] == URLS
    # A non-empty read, then an empty one: the list was there, so empty is now the truth.
    redis.urls = [URLS[0]]
    lists.refresh()
    redis.answer_all()
    redis.urls = []
    lists.refresh()
    redis.answer_all()
    assert pool.ring == []
    # Or a change notice does it.
    pool.update(URLS)
    lists.distrust_empty()
    lists.trust_empty()
    lists.refresh()
    redis.answer_all()
    assert pool.ring == []


def test_notices_are_read_as_resp_even_split_across_reads():
    from twisted.internet.testing import StringTransport

    from dockpart.proxy_sync import Subscriber

    class Owner:
        class redis:
            class address:
                password = None

        def __init__(self):
            self.notices = []

        def subscriptions(self):
            return [b"SUBSCRIBE"]

        def notices_connected(self):
            pass

        def notice(self, reply):
            self.notices.append(reply)

    owner = Owner()
    notices = Subscriber()
    notices.factory = type("F", (), {"owner": owner})()
    transport = StringTransport()
    notices.makeConnection(transport)
    assert transport.value() == b"SUBSCRIBE"
    stream = (b"*3\r\n$9\r\nsubscribe\r\n$24\r\ndockpart:servers:changed\r\n:1\r\n"
              b"*3\r\n$7\r\nmessage\r\n$24\r\ndockpart:servers:changed\r\n$7\r\nmessage\r\n"
              b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$4\r\nchan\r\n$3\r\nadd\r\n")
    for i in range(len(stream)):
        notices.dataReceived(stream[i:i + 1])
    # Two notices (one whose payload is the word "message"); the confirmation is none.
    assert owner.notices == [["message", "dockpart:servers:changed", "message"],
                             ["pmessage", "*", "chan", "add"]]


def test_direct_writer_finds_the_twisted_internals_it_reads():
    """proxy_exchange.direct_writer reads private tcp.Connection attributes (for speed): if a
    Twisted release renames them, this fails, rather than the proxy corrupting streams."""
    import socket

    from twisted.internet import protocol, tcp
    from twisted.internet.testing import MemoryReactor

    from dockpart.proxy_exchange import direct_writer

    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        conn = tcp.Connection(a, protocol.Protocol(), MemoryReactor())
        conn.connected = True
        for name in ("_tempDataLen", "dataBuffer", "_writeDisconnected", "disconnecting",
                     "connected", "socket"):
            assert hasattr(conn, name), f"Twisted's tcp.Connection has no {name} any more"
        send = direct_writer(conn)
        assert send is not conn.write
        send(b"straight")  # nothing queued: it goes to the socket at once
        assert b.recv(100) == b"straight"
        conn.dataBuffer = b"queued"  # something queued: the ordinary write keeps the order
        send(b"after")
        assert conn._tempDataBuffer == [b"after"] or b"after" in bytes(conn.dataBuffer)
    finally:
        a.close()
        b.close()


def test_the_proxys_own_redis_connections_log_in_as_the_url_says():
    """An ACL user in --redis (user name and percent-encoded password) reaches AUTH whole."""
    from dockpart.redisconn import RedisAddress, auth
    assert auth(RedisAddress.parse("redis://bob:p%40ss@127.0.0.1:6379/0")) == \
        b"*3\r\n$4\r\nAUTH\r\n$3\r\nbob\r\n$4\r\np@ss\r\n"
    assert auth(RedisAddress.parse("redis://:secret@127.0.0.1:6379/0")) == \
        b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n"


def test_latency_is_exported_as_a_prometheus_histogram():
    """_bucket{le=...} counts are cumulative, the last is +Inf and equals _count (Traefik's
    and Prometheus's naming), so histogram_quantile() works on them."""
    pool, clock = backends(urls=URLS[:1])
    factory = ProxyFactory(pool, clock)
    backend = pool.ring[0]
    for seconds in (0.0005, 0.003, 0.003, 0.5, 60.0):
        backend.timed(seconds)
    text = metrics(factory)
    url = URLS[0]
    assert "# TYPE dockpart_proxy_backend_latency_seconds histogram" in text
    assert f'dockpart_proxy_backend_latency_seconds_bucket{{backend="{url}",le="0.001"}} 1' in text
    assert f'dockpart_proxy_backend_latency_seconds_bucket{{backend="{url}",le="0.005"}} 3' in text
    assert f'dockpart_proxy_backend_latency_seconds_bucket{{backend="{url}",le="0.5"}} 4' in text
    assert f'dockpart_proxy_backend_latency_seconds_bucket{{backend="{url}",le="10.0"}} 4' in text
    assert f'dockpart_proxy_backend_latency_seconds_bucket{{backend="{url}",le="+Inf"}} 5' in text
    assert f'dockpart_proxy_backend_latency_seconds_count{{backend="{url}"}} 5' in text
    assert f'dockpart_proxy_backend_latency_seconds_sum{{backend="{url}"}} 60.5065' in text
    buckets = [line for line in text.splitlines() if "_bucket{" in line]
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts) and len(buckets) == 14


def test_an_empty_lmove_answer_right_after_redis_was_away_is_served_by_the_local_rotation():
    """The rotation model says "empty list, no backend"; whether to believe Redis's empty
    answer is the Redis reader's call (proxy_sync), not the model's."""
    pool, _ = backends(balance="shared")
    lists = RedisList(ListRedis([]), pool)
    assert lists.choice(None) is None and lists.choice(URLS[1]).url == URLS[1]
    lists.distrust_empty()  # Redis was away: it may have come back without its data
    assert lists.choice(None).url in URLS
    lists.trust_empty()  # a change notice: empty is the truth now
    assert lists.choice(None) is None
    assert not hasattr(pool, "redis") and not hasattr(pool, "refresh")


def test_only_a_reset_before_any_answer_to_a_bodiless_request_proves_it_unread():
    from twisted.internet import error
    from twisted.python.failure import Failure

    from dockpart.proxy_retry import never_read
    reset, closed = Failure(error.ConnectionLost()), Failure(error.ConnectionDone())
    assert never_read(False, False, reset)
    assert not never_read(False, False, closed)  # it may have run it, then closed
    assert not never_read(True, False, reset)  # the head may have been read, the body not
    assert not never_read(False, True, reset)  # it began to answer
    assert not never_read(False, False, Failure(error.ConnectionAborted()))  # our own abort


def test_retry_safe_takes_plain_paths_exact_or_prefix_and_needs_a_try_timeout():
    import pytest
    from twisted.python import usage

    from dockpart.proxy import Options

    def parse(*args):
        options = Options()
        options.parseOptions(["--try-timeout", "1", *args])
        return options["retry-safe"]
    assert parse() == ()  # none by default: every timed-out try gets 504
    assert parse("--retry-safe", "/, /get*", "--retry-safe", "/work") == (b"/", b"/get*", b"/work")
    for bad in ("meow", "/a*b", "/a?x=1", "/a#b", "/a/../b", "/%6deow", "/a b", "/\u00e9", ""):
        with pytest.raises(usage.UsageError, match="--retry-safe"):
            parse("--retry-safe", bad)
    with pytest.raises(usage.UsageError, match="needs --try-timeout"):
        Options().parseOptions(["--retry-safe", "/"])


def test_the_proxys_state_enums_hash_without_a_python_call():
    """Phase, Mode and Reply are looked up in their tables of moves several times per
    request: their members hash by identity (C), not through Enum's Python ``__hash__``."""
    from dockpart.proxy_client import MODE_MOVES, Mode
    from dockpart.proxy_exchange import REPLY_MOVES, Reply
    from dockpart.proxy_upstream import MOVES, Phase

    for states, moves in ((Phase, MOVES), (Mode, MODE_MOVES), (Reply, REPLY_MOVES)):
        assert states.__hash__ is object.__hash__
        assert set(moves) == set(states)  # the tables still find every member
        assert states(next(iter(states)).value) in moves
