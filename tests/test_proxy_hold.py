"""The hold queue in memory: requests for an app at zero wait in arrival order, bounded in
number and time, and go on when its first instance is listed (MemoryReactorClock,
StringTransport; the proxy as test_proxy_exchange builds it)."""

from twisted.internet import defer

from dockpart.apps import App
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_hold import ASK_AGAIN, Hold, HoldLimits
from dockpart.proxy_load import LoadPublisher
from dockpart.proxy_routes import Routes
from dockpart.records import LoadReport
from test_proxy_exchange import OK, NoRedis, Proxy, sent

SEED = ["http://127.0.0.1:3001"]
ZOOM = "http://127.0.0.1:20001"
GET = b"GET /%d HTTP/1.1\r\nHost: zoom.apps.test\r\n\r\n"


class Asks:
    """What the hold asked Redis for (each ask fires at once)."""

    def __init__(self):
        self.records: list[dict] = []

    def __call__(self, name: str, proxy: str, held: int):
        self.records.append({"name": name, "proxy": proxy, "held": held})
        return defer.succeed(1)


def at_zero(proxy: Proxy, limits=HoldLimits(3, 5.0)):
    """An app that scales to zero, routed, with no instance; its list read once more is empty."""
    zoom = BackendSet("dockpart:app:zoom:servers", "local", proxy.reactor)
    zoom.update([])  # in memory no reader reads the list once more: it is empty as given
    asks = Asks()
    zoom.hold = Hold("zoom", proxy.reactor, asks, limits, "test:1")
    zoom.hold.enabled = True
    routes = Routes(proxy.backends, "apps.test")
    routes.set_apps({"zoom": (App("zoom", autoscale=True, min=0), zoom)})
    proxy.factory.routes = routes
    return zoom, asks


def request(proxy: Proxy, n: int):
    client, out = proxy.client()
    client.dataReceived(GET % n)
    return client, out


def test_requests_at_zero_are_held_asked_for_then_sent_in_arrival_order():
    proxy = Proxy(urls=SEED)
    zoom, asks = at_zero(proxy)
    clients = [request(proxy, n) for n in range(3)]
    assert [sent(out) for _, out in clients] == [b""] * 3  # no answer, held
    assert proxy.attempts() == 0
    assert zoom.hold.held == 3
    # At the first, and when the held requests doubled (not at each).
    assert [(a["name"], a["proxy"], a["held"]) for a in asks.records] == [
        ("zoom", "test:1", 1), ("zoom", "test:1", 2)]
    proxy.later(2.0)
    assert zoom.hold.held == 3 and [sent(out) for _, out in clients] == [b""] * 3
    zoom.update([ZOOM])  # its first instance is listed: healthy and registered
    assert zoom.hold.held == 0
    assert [c[1] for c in proxy.reactor.tcpClients] == [20001] * 3
    for n, (_, out) in enumerate(clients):
        conn, wire = proxy.backend()
        assert sent(wire).startswith(b"GET /%d HTTP/1.1\r\n" % n)  # first come, first sent
        conn.dataReceived(OK % (2, b"ok"))
        assert sent(out).endswith(b"\r\n\r\nok")
    assert zoom.hold.activations == 1 and zoom.hold.activation_last == 2.0


def test_beyond_hold_max_503_at_once_with_retry_after():
    proxy = Proxy(urls=SEED)
    zoom, _ = at_zero(proxy, HoldLimits(2, 5.0))
    held = [request(proxy, n) for n in range(2)]
    _, out = request(proxy, 3)
    answer = sent(out)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in answer
    assert zoom.hold.held == 2 and zoom.hold.refused["overflow"] == 1
    assert [sent(o) for _, o in held] == [b"", b""]


def test_a_held_request_past_hold_timeout_gets_503_and_leaves_the_queue():
    proxy = Proxy(urls=SEED)
    zoom, _ = at_zero(proxy, HoldLimits(3, 5.0))
    _, first = request(proxy, 1)
    proxy.later(3.0)
    _, second = request(proxy, 2)
    proxy.later(2.5)  # the first waited 5.5 s, the second 2.5 s
    answer = sent(first)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"did not start in time" in answer
    assert b"\r\nRetry-After: " in answer
    assert sent(second) == b"" and zoom.hold.held == 1
    proxy.later(3.0)
    assert sent(second).startswith(b"HTTP/1.1 503 ")
    assert zoom.hold.held == 0 and zoom.hold.refused["timeout"] == 2


def test_the_proxys_other_deadlines_do_not_cut_a_held_request():
    """The header deadline set when its head began is the hold's to replace."""
    proxy = Proxy(urls=SEED, header_timeout=1.0)
    zoom, _ = at_zero(proxy, HoldLimits(3, 5.0))
    _, out = request(proxy, 1)
    proxy.later(4.0)
    assert sent(out) == b"" and zoom.hold.held == 1


def test_a_held_request_whose_client_leaves_is_dropped():
    proxy = Proxy(urls=SEED)
    zoom, _ = at_zero(proxy)
    gone, _ = request(proxy, 1)
    _, out = request(proxy, 2)
    gone.connectionLost(None)
    assert zoom.hold.held == 1
    zoom.update([ZOOM])
    assert [c[1] for c in proxy.reactor.tcpClients] == [20001]  # only the one still there
    proxy.later(10.0)  # its time-out was cancelled with it: nothing more happens
    assert zoom.hold.refused["timeout"] == 0


def test_a_failed_start_answers_the_held_503_and_holds_none_for_the_backoff():
    proxy = Proxy(urls=SEED)
    zoom, asks = at_zero(proxy)
    _, out = request(proxy, 1)
    zoom.hold.failed(4.0)
    answer = sent(out)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"failed to start" in answer
    assert b"\r\nRetry-After: 4\r\n" in answer
    proxy.later(1.0)
    _, out = request(proxy, 2)
    answer = sent(out)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 3\r\n" in answer
    assert len(asks.records) == 1
    proxy.later(3.5)
    _, out = request(proxy, 3)
    assert sent(out) == b"" and [a["held"] for a in asks.records] == [1, 1]  # asked again


def test_an_app_that_does_not_scale_to_zero_still_answers_503_at_once():
    proxy = Proxy(urls=SEED)
    zoom, asks = at_zero(proxy)
    zoom.hold.enabled = False
    _, out = request(proxy, 1)
    assert sent(out).startswith(b"HTTP/1.1 503 ") and asks.records == []


def test_asks_again_only_while_held_when_doubled_or_a_second_later():
    proxy = Proxy(urls=SEED)
    zoom, asks = at_zero(proxy, HoldLimits(10, 5.0))
    zoom.hold.ask_again()
    assert asks.records == []  # nothing held
    for n in range(5):
        request(proxy, n)
    zoom.hold.ask_again()
    assert [a["held"] for a in asks.records] == [1, 2, 4]
    proxy.reactor.advance(ASK_AGAIN)
    zoom.hold.ask_again()
    assert [a["held"] for a in asks.records] == [1, 2, 4, 5]


def test_the_load_report_counts_held_requests_and_each_activations_time():
    proxy = Proxy(urls=SEED)
    zoom, _ = at_zero(proxy)
    publisher = LoadPublisher(zoom, NoRedis(), proxy.reactor, name="p", app="zoom")
    request(proxy, 1)
    request(proxy, 2)
    report = publisher.report().shown()
    assert report["held"] == 2 and report["activations"] == 0
    assert report["activation_seconds"] == [] and report["activation_last"] is None
    proxy.reactor.advance(0.75)
    zoom.update([ZOOM])
    report = LoadReport.decode(publisher.report().encode(), proxy.reactor.seconds()).shown()
    assert report["held"] == 0 and report["activations"] == 1
    assert report["activation_seconds"] == [0.75] and report["activation_last"] == 0.75
    assert report["activation_recent"] == [0.75]
    assert publisher.report().hold.activation_seconds == ()  # each once
