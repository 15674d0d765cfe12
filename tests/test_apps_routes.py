"""Routing by Host, in memory: the proxy's factory with Routes over BackendSets on a
MemoryReactorClock and StringTransports (as test_proxy_exchange), and AppsSync's reading of
the app records without Redis."""

from twisted.internet.testing import MemoryReactorClock

from dockpart.apps import App
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_routes import AppsSync, Routes, host_name
from dockpart.redisconn import RedisAddress
from test_proxy_exchange import OK, Proxy, sent

SEED = ["http://127.0.0.1:3001"]
SHOP = ["http://127.0.0.1:20001", "http://127.0.0.1:20002"]


def routed(proxy: Proxy, shop_urls=SHOP) -> BackendSet:
    shop = BackendSet("dockpart:app:shop:servers", "local", proxy.reactor)
    shop.update(list(shop_urls))
    routes = Routes(proxy.backends, "apps.test")
    routes.set_apps({"shop": (App("shop", domains=("shop.example.org",)), shop)})
    proxy.factory.routes = routes
    return shop


def port_tried(proxy: Proxy, host: bytes) -> int:
    client, _ = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    return proxy.reactor.tcpClients[-1][1]


def test_host_name_is_lower_case_without_port():
    assert host_name(b"Shop.Apps.Test:3456") == b"shop.apps.test"
    assert host_name(b"shop.apps.test") == b"shop.apps.test"
    assert host_name(b"[::1]:3456") is None
    assert host_name(None) is None


def test_an_apps_hosts_go_to_its_instances_and_every_other_host_to_the_seed():
    proxy = Proxy(urls=SEED)
    routed(proxy)
    assert port_tried(proxy, b"shop.apps.test") == 20001
    assert port_tried(proxy, b"SHOP.apps.test:80") == 20002  # its own rotation
    assert port_tried(proxy, b"shop.example.org") == 20001
    assert port_tried(proxy, b"other.apps.test") == 3001
    assert port_tried(proxy, b"127.0.0.1:3456") == 3001
    assert port_tried(proxy, b"shop.apps.test.evil.example") == 3001


def test_a_request_whose_app_backend_refuses_is_retried_on_the_app_never_on_the_seed():
    proxy = Proxy(urls=SEED)
    routed(proxy)
    client, out = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\n\r\n")
    first = proxy.reactor.tcpClients[-1]
    first[2].clientConnectionFailed(None, None)
    assert [c[1] for c in proxy.reactor.tcpClients] == [20001, 20002]
    conn, wire = proxy.backend()
    conn, wire = proxy.backend()
    assert sent(wire).startswith(b"GET / HTTP/1.1\r\n")
    conn.dataReceived(OK % (2, b"ok"))
    assert sent(out).endswith(b"\r\n\r\nok")


def test_an_app_with_no_instance_answers_503_with_retry_after_and_keeps_the_connection():
    proxy = Proxy(urls=SEED)
    shop = routed(proxy, shop_urls=[])
    # In memory no reader reads the list once more: it is empty as given.
    client, out = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\n\r\n")
    answer = sent(out)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 1\r\n" in answer
    assert b"Connection: close" not in answer
    assert proxy.attempts() == 0


class FakeRedis:
    address = RedisAddress.parse("redis://127.0.0.1:1/0")
    timeout = 1.0
    connected = False


def sync():
    reactor = MemoryReactorClock()
    seed = BackendSet("servers", "local", reactor)
    routes = Routes(seed)
    return AppsSync(routes, FakeRedis(), reactor), routes, seed


def test_apps_read_become_routes_with_their_instances_and_go_when_destroyed():
    s, routes, seed = sync()
    s._read([App("a", instances=("http://127.0.0.1:20001",)),
             App("b", domains=("b.example.org",))])
    a = routes.backends_for(b"a.localhost")
    assert [b.url for b in a.ring] == ["http://127.0.0.1:20001"]
    assert routes.backends_for(b"b.example.org") is routes.apps["b"]
    assert a is not seed and routes.backends_for(b"c.localhost") is seed
    s._read([App("b", domains=("b.example.org",))])
    assert routes.backends_for(b"a.localhost") is seed
    assert a.ring == [] and "a" not in s._services


def test_an_empty_read_after_redis_was_away_keeps_routing_until_a_notice():
    s, routes, seed = sync()
    s._read([App("a", instances=("http://127.0.0.1:20001",))])
    s.notices_lost()
    s._read([])  # a Redis that came back without its data
    kept = routes.backends_for(b"a.localhost")
    assert kept is routes.apps["a"] and [b.url for b in kept.ring] == ["http://127.0.0.1:20001"]
    s._trusted = True  # what a change notice does (reload(notice=True))
    s._read([])
    assert routes.backends_for(b"a.localhost") is seed


def test_the_admin_status_shows_each_apps_backends_beside_the_seeds():
    from dockpart.proxy_admin import status
    proxy = Proxy(urls=SEED)
    routed(proxy)
    shown = status(proxy.factory)
    assert [b["url"] for b in shown["backends"]] == SEED
    assert [b["url"] for b in shown["apps"]["shop"]["backends"]] == SHOP
    assert shown["apps"]["shop"]["list_key"] == "dockpart:app:shop:servers"


def test_an_apps_empty_list_is_read_once_more_by_its_own_reader_before_a_503():
    """The read before a 503 goes to the app's reader (AppsSync.readers), not the seed's."""
    from twisted.internet import defer
    proxy = Proxy(urls=SEED)
    shop = routed(proxy, shop_urls=[])
    reads = []

    class Reader:
        def reread(self):
            reads.append(shop.list_key)
            shop.update(SHOP[:1])  # a first instance was listed meanwhile
            return defer.succeed(True)

    proxy.factory.routes.readers[shop] = Reader()
    client, _ = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\n\r\n")
    assert reads == ["dockpart:app:shop:servers"]
    assert proxy.reactor.tcpClients[-1][1] == 20001
