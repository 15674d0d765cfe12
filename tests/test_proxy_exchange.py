"""The proxy exchange's states, in memory: a ClientConnection and its BackendConnections on
StringTransports, a MemoryReactorClock for connections and time.  No socket, no process: each
test feeds exact bytes in exact reads, so none depends on how TCP happens to split them."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from dockpart.proxy_backends import BackendSet
from dockpart.proxy_dispatch import Limits, ProxyFactory
from dockpart.proxy_client import MODE_MOVES, Mode
from dockpart.proxy_upstream import Phase

URLS = ["http://127.0.0.1:3001", "http://127.0.0.1:3002"]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
GET = b"GET /work HTTP/1.1\r\nHost: x\r\n\r\n"


class NoRedis:
    connected = False


class Proxy:
    """One proxy in memory; ``client()`` opens a client connection, ``backend()`` answers the
    next connection attempt the proxy made."""

    def __init__(self, urls=URLS, **limits):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.backends = BackendSet("servers", "local", self.reactor)
        self.backends.update(list(urls))
        self.factory = ProxyFactory(self.backends, self.reactor, Limits(**limits))
        self._taken = 0

    def client(self, ip: str = "127.0.0.1"):
        proto = self.factory.buildProtocol(IPv4Address("TCP", ip, 5555))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 3456),
                                    peerAddress=IPv4Address("TCP", ip, 5555))
        proto.makeConnection(transport)
        return proto, transport

    def later(self, seconds: float) -> None:
        """``seconds`` pass, then the proxy's sweep enforces its deadlines, as it would."""
        self.reactor.advance(seconds)
        self.factory.sweep()

    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def backend(self):
        """Complete the oldest connection attempt not completed yet."""
        host, port, connector, _, _ = self.reactor.tcpClients[self._taken]
        self._taken += 1
        conn = connector.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        conn.makeConnection(transport)
        return conn, transport


def sent(transport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def test_pipelined_requests_go_one_at_a_time_and_reuse_the_connection():
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    assert sent(wire).startswith(b"GET /1 HTTP/1.1\r\n")  # /2 waits for /1's answer
    conn.dataReceived(OK % (2, b"r1"))
    assert sent(out).endswith(b"\r\n\r\nr1")
    assert sent(wire).startswith(b"GET /2 HTTP/1.1\r\n") and proxy.attempts() == 1
    conn.dataReceived(OK % (2, b"r2"))
    assert sent(out).endswith(b"\r\n\r\nr2")
    assert conn.phase is Phase.IDLE and proxy.backends.ring[0].idle[-1] is conn


def test_body_and_the_next_head_in_one_read_then_the_rest_of_that_head():
    proxy = Proxy(urls=URLS[:1], max_header_size=1024)
    client, out = proxy.client()
    body = b"x" * 4000  # much larger than the header limit
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                        b"GET /next HTTP/1.1\r\nHo" % (len(body), body))
    client.dataReceived(b"st: x\r\n\r\n")
    conn, wire = proxy.backend()
    assert sent(wire).endswith(b"\r\n\r\n" + body)
    conn.dataReceived(OK % (2, b"up"))
    assert sent(out).startswith(b"HTTP/1.1 200")  # not 431: the head is small
    assert sent(wire).startswith(b"GET /next HTTP/1.1\r\n")


def test_expect_100_continue_passes_the_interim_answer_before_the_body():
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                        b"Expect: 100-continue\r\n\r\n")
    conn, wire = proxy.backend()
    assert b"Expect: 100-continue" in sent(wire)
    conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert sent(out) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.dataReceived(b"hello")
    assert sent(wire) == b"hello"
    conn.dataReceived(OK % (2, b"ok"))
    assert sent(out).startswith(b"HTTP/1.1 200") and conn.phase is Phase.IDLE


def test_an_answer_to_head_ends_with_its_head_and_the_connection_is_not_reused():
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert sent(out).endswith(b"Content-Length: 100\r\n\r\n")
    # The parser would wait for the 100 bytes announced: a new connection serves /g.
    assert conn.phase is Phase.CLOSED and proxy.attempts() == 2
    conn2, wire2 = proxy.backend()
    assert sent(wire2).startswith(b"GET /g ")


@pytest.mark.parametrize("status", [204, 304])
def test_bytes_after_a_bodiless_answer_close_the_connection_instead_of_answering_the_next(
        status):
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    sent(wire)
    conn.dataReceived(b"HTTP/1.1 %d X\r\n\r\n" % status + OK % (4, b"EVIL"))
    assert b"EVIL" not in out.value() and out.value().startswith(b"HTTP/1.1 %d" % status)
    assert conn.phase is Phase.CLOSED and wire.value() == b""
    conn2, wire2 = proxy.backend()
    assert sent(wire2).startswith(b"GET /b ")


def pooled_request_lost(reason):
    """A request sent on a pooled connection, which then goes as ``reason`` says, unanswered."""
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    sent(wire)
    conn.dataReceived(OK % (1, b"1"))
    sent(out)
    client.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sent(wire).startswith(b"GET /2 ")
    conn.connectionLost(Failure(reason))
    return proxy, conn, out


def test_a_request_on_a_connection_reset_before_answering_is_sent_again():
    """Reset, the backend's socket closed with the request unread: it never had it."""
    proxy, conn, out = pooled_request_lost(ConnectionLost())
    conn2, wire2 = proxy.backend()
    assert sent(wire2).startswith(b"GET /2 ") and conn2.backend is conn.backend
    conn2.dataReceived(OK % (1, b"2"))
    assert sent(out).endswith(b"\r\n\r\n2")


def test_a_request_on_a_connection_closed_cleanly_before_answering_is_not_sent_again():
    """A clean close: the backend may have read and run it before it died, so it is a 502."""
    proxy, conn, out = pooled_request_lost(ConnectionDone())
    assert sent(out).startswith(b"HTTP/1.1 502") and proxy.attempts() == 1
    assert conn.backend.active == 0


def asked_backends(proxy, answer=None) -> list:
    """Stub the try time-out's probe: records whom it asks; ``answer`` is its status, or
    None for a backend that never answers."""
    asked = []

    def probe(backend):
        asked.append(backend)
        return defer.succeed(answer) if answer is not None else defer.Deferred()
    proxy.factory.tries.probe = probe
    return asked


@pytest.mark.parametrize("request_bytes", [
    b"GET /meow HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"])
def test_a_try_timeout_never_sends_the_request_elsewhere_a_silent_backend_gets_504(
        request_bytes):
    proxy = Proxy(try_timeout=1.0, backend_timeout=5.0)
    asked = asked_backends(proxy)
    client, out = proxy.client()
    client.dataReceived(request_bytes)
    frozen, wire = proxy.backend()
    assert sent(wire)
    proxy.later(1.1)
    # Left out at once (the next requests go elsewhere) and asked whether it answers.
    assert asked == [frozen.backend] and out.value() == b""
    assert frozen.backend.down_until > proxy.reactor.seconds()
    assert proxy.backends.pick() is not frozen.backend
    proxy.later(0.6)  # the question went unanswered: one try and a half in all
    assert out.value().startswith(b"HTTP/1.1 504") and proxy.attempts() == 1
    assert frozen.phase is Phase.CLOSED and frozen.backend.active == 0


def test_a_slow_request_on_a_backend_that_answers_the_question_waits_for_its_answer():
    proxy = Proxy(urls=URLS[:1], try_timeout=1.0, backend_timeout=5.0)
    asked_backends(proxy, answer=200)
    client, out = proxy.client()
    client.dataReceived(b"GET /work?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
    slow, wire = proxy.backend()
    proxy.later(1.1)
    assert slow.backend.down_until <= proxy.reactor.seconds()  # answered: back in rotation
    proxy.later(0.6)
    proxy.later(1.5)
    assert out.value() == b"" and proxy.attempts() == 1
    slow.dataReceived(OK % (4, b"done"))
    assert sent(out).endswith(b"done")
    # Its limit is still the backend timeout from the end of the request.
    client.dataReceived(b"GET /work?ms=9000 HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy.later(1.1)
    proxy.later(4.0)
    assert sent(out).startswith(b"HTTP/1.1 504") and proxy.attempts() == 1


SHIPPED_SAFE = (b"/", b"/get*", b"/recent", b"/listservers", b"/work")


@pytest.mark.parametrize("request_bytes", [
    b"GET /get/k HTTP/1.1\r\nHost: x\r\n\r\n", b"HEAD /recent?n=3 HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_a_route_declared_safe_goes_once_to_another_backend_after_a_try_timeout(
        request_bytes):
    proxy = Proxy(try_timeout=1.0, backend_timeout=5.0, retry_safe=SHIPPED_SAFE)
    asked = asked_backends(proxy)
    client, out = proxy.client()
    client.dataReceived(request_bytes)
    frozen, wire = proxy.backend()
    request = sent(wire)
    proxy.later(1.1)
    # Left out and asked, as any; the request goes to the other backend at once.
    assert asked == [frozen.backend] and frozen.phase is Phase.CLOSED
    assert frozen.backend.down_until > proxy.reactor.seconds() and frozen.backend.active == 0
    other, wire2 = proxy.backend()
    assert other.backend is not frozen.backend and sent(wire2) == request
    assert out.value() == b"" and proxy.factory.stats.retries == 1
    other.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert sent(out).startswith(b"HTTP/1.1 200") and proxy.attempts() == 2


def test_a_route_declared_safe_is_sent_again_once_only():
    proxy = Proxy(try_timeout=1.0, backend_timeout=5.0, retry_safe=SHIPPED_SAFE)
    asked = asked_backends(proxy)
    client, out = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    first, _ = proxy.backend()
    proxy.later(1.1)
    second, _ = proxy.backend()
    proxy.later(1.1)  # silent too: never-twice from here (left out, asked, then 504)
    assert asked == [first.backend, second.backend] and out.value() == b""
    proxy.later(0.6)
    assert out.value().startswith(b"HTTP/1.1 504") and proxy.attempts() == 2


@pytest.mark.parametrize("request_bytes", [
    b"GET /meow HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /recent/ HTTP/1.1\r\nHost: x\r\n\r\n",  # exact: /recent only
    b"GET /get/../meow HTTP/1.1\r\nHost: x\r\n\r\n",  # a dot segment matches nothing
    b"GET /%67et/k HTTP/1.1\r\nHost: x\r\n\r\n",  # nor does a percent-escape
    b"GET //meow HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx",
    b"DELETE /work HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_a_route_not_declared_safe_is_never_sent_again(request_bytes):
    proxy = Proxy(try_timeout=1.0, backend_timeout=5.0, retry_safe=SHIPPED_SAFE)
    asked_backends(proxy)
    client, out = proxy.client()
    client.dataReceived(request_bytes)
    proxy.backend()
    proxy.later(1.1)
    proxy.later(0.6)
    assert out.value().startswith(b"HTTP/1.1 504") and proxy.attempts() == 1


def test_a_declared_path_of_an_app_routed_by_host_is_never_sent_again():
    """--retry-safe names the seed's routes: an app's own instances get never-twice."""
    from dockpart.proxy_routes import Routes
    proxy = Proxy(try_timeout=1.0, backend_timeout=5.0, retry_safe=SHIPPED_SAFE)
    app = BackendSet("app:servers", "local", proxy.reactor)
    app.update(["http://127.0.0.1:4001", "http://127.0.0.1:4002"])
    routes = proxy.factory.routes = Routes(proxy.backends, "apps.test")
    routes.hosts = {b"hello.apps.test": app}
    asked_backends(proxy)
    client, out = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: hello.apps.test\r\n\r\n")
    conn, _ = proxy.backend()
    assert conn.backend in app.ring
    proxy.later(1.1)
    proxy.later(0.6)
    assert out.value().startswith(b"HTTP/1.1 504") and proxy.attempts() == 1


def test_a_stall_in_the_middle_of_a_body_ends_the_client_connection():
    proxy = Proxy(backend_timeout=2.0)
    client, out = proxy.client()
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    proxy.reactor.advance(1.5)
    conn.dataReceived(b"more")  # each read restarts the limit
    proxy.later(1.5)
    assert not out.disconnecting and not client.closed
    proxy.later(1)
    assert client.closed and conn.backend.down_until > proxy.reactor.seconds()


def test_early_bytes_after_an_upgrade_wait_for_the_101():
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: ws\r\nConnection: Upgrade\r\n"
                        b"\r\nearly")
    conn, wire = proxy.backend()
    assert sent(wire).endswith(b"\r\n\r\n")  # the head alone
    conn.dataReceived(b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: Upgrade\r\n\r\n")
    assert out.value().startswith(b"HTTP/1.1 101") and sent(wire) == b"early"
    assert conn.phase is Phase.TUNNEL


def test_early_bytes_after_a_refused_upgrade_are_dropped_with_the_connection():
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: ws\r\nConnection: Upgrade\r\n"
                        b"\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    sent(wire)
    conn.dataReceived(OK % (2, b"no"))
    assert b"Connection: close" in out.value() and out.disconnecting
    assert wire.value() == b"" and conn.phase is Phase.CLOSED  # never pooled


def test_a_client_slow_to_read_gets_the_idle_timeout_not_the_backend_timeout():
    proxy = Proxy(backend_timeout=2.0, idle_timeout=10.0)
    client, out = proxy.client()
    client.dataReceived(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
    for _ in range(2):  # the client's buffer fills: the backend is paused, through no fault
        conn.pause_reading("peer")
        proxy.later(2.5)
        assert not client.closed
        conn.resume_reading("peer")
        conn.dataReceived(b"more")
    conn.pause_reading("peer")
    proxy.later(2.5)
    proxy.later(10.1)
    assert client.closed  # a client that stops reading altogether is let go
    assert conn.backend.down_until <= proxy.reactor.seconds()  # and the backend is not blamed


@pytest.mark.parametrize("body", [b"ffffffffffffffffff1\r\n", b"5\nhello\r\n",
                                  b"5\r\nhelloXX", b"0\r\nContent-Length: 5\r\n\r\n"])
def test_a_malformed_chunked_body_after_the_head_went_out_ends_both_sides_at_once(body):
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n")
    conn, wire = proxy.backend()
    assert sent(wire).endswith(b"3\r\nabc\r\n") and conn.backend.active == 1
    client.dataReceived(body)  # no time passes: no timer is needed to end it
    assert out.value().startswith(b"HTTP/1.1 400") and out.disconnecting
    assert conn.phase is Phase.CLOSED and wire.disconnecting and conn.backend.active == 0


def test_a_malformed_body_of_a_request_still_connecting_frees_its_slot():
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\nhello\r\n")
    assert out.value().startswith(b"HTTP/1.1 400") and proxy.backends.ring[0].active == 0
    conn, wire = proxy.backend()  # the connection made meanwhile is closed, never lent
    assert conn.phase is Phase.CLOSED and wire.value() == b""


def test_a_malformed_body_behind_a_request_in_flight_is_answered_in_turn_never_sent():
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                        b"POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\nhello\r\n")
    conn, wire = proxy.backend()
    assert b"/2" not in sent(wire)
    conn.dataReceived(OK % (2, b"r1"))
    first, refused = out.value().split(b"HTTP/1.1 ")[1:]
    assert first.endswith(b"r1") and refused.startswith(b"400") and out.disconnecting
    assert wire.value() == b"" and conn.backend.active == 0


# The client connection's mode (an enum with its allowed moves).

def test_a_client_connection_goes_from_open_to_upgrading_to_tunnel_to_closed():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    proxy = Proxy()
    client, out = proxy.client()
    assert client.mode is Mode.OPEN
    client.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: ws\r\nConnection: Upgrade\r\n"
                        b"\r\n")
    assert client.mode is Mode.UPGRADING
    conn, wire = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: Upgrade\r\n\r\n")
    assert client.mode is Mode.TUNNEL
    client.dataReceived(b"ping")
    assert sent(wire).endswith(b"ping")
    conn.connectionLost(Failure(ConnectionDone()))
    assert client.mode is Mode.CLOSED and client.closed and out.disconnecting


def test_a_refused_request_behind_another_waits_in_refusing_for_its_turn():
    proxy = Proxy()
    client, out = proxy.client()
    client.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 ")
    assert client.mode is Mode.REFUSING and out.value() == b""  # /1 is answered first
    conn, wire = proxy.backend()
    conn.dataReceived(OK % (2, b"r1"))
    answers = out.value()
    assert answers.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in answers
    assert client.mode is Mode.CLOSED and out.disconnecting
    assert b"/3" not in wire.value()


def test_a_move_the_table_does_not_allow_closes_the_client_connection():
    proxy = Proxy()
    client, out = proxy.client()
    client.transition(Mode.TUNNEL)  # OPEN cannot become a tunnel without an upgrade
    assert client.mode is Mode.CLOSED and out.disconnecting
    client.transition(Mode.CLOSED)  # closing twice is no error
    assert set(MODE_MOVES) == set(Mode)


# One owner of a backend's in-flight count: the slot.

def test_a_slot_is_given_back_once_however_many_endings_a_try_has():
    from dockpart.proxy_backends import Backend
    backend = Backend("http://127.0.0.1:3001", "127.0.0.1", 3001)
    first, second = backend.take(), backend.take()
    assert backend.active == 2
    first.release()
    first.release()
    assert backend.active == 1
    second.release()
    assert backend.active == 0


def _answered(proxy, client, out):
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    conn.dataReceived(OK % (2, b"ok"))


def _tunnelled(proxy, client, out):
    client.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: ws\r\nConnection: Upgrade\r\n"
                        b"\r\n")
    conn, _ = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: Upgrade\r\n\r\n")


def _timed_out(proxy, client, out):
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy.backend()
    proxy.later(31)
    assert out.value().startswith(b"HTTP/1.1 504")


def _try_timed_out(proxy, client, out):
    proxy.factory.limits.try_timeout = 1.0
    asked_backends(proxy)
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    proxy.later(1.1)
    assert conn.backend.active == 1  # held while the backend is asked
    proxy.later(0.6)
    assert out.value().startswith(b"HTTP/1.1 504")


def _refused_connection(proxy, client, out):
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    connector = proxy.reactor.tcpClients[0][2]
    proxy._taken = 1
    connector.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    conn, _ = proxy.backend()
    conn.dataReceived(OK % (2, b"ok"))


def _bad_response(proxy, client, out):
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx")
    assert out.value().startswith(b"HTTP/1.1 502")


def _reset_before_answering(proxy, client, out):
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    conn.connectionLost(Failure(ConnectionLost()))
    conn2, _ = proxy.backend()
    conn2.dataReceived(OK % (2, b"ok"))


def _closed_before_answering(proxy, client, out):
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    conn.connectionLost(Failure(ConnectionDone()))
    assert out.value().startswith(b"HTTP/1.1 502")


def _client_gone_while_connecting(proxy, client, out):
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    client.connectionLost(Failure(ConnectionDone()))
    conn, _ = proxy.backend()
    assert conn.phase is Phase.CLOSED


def _client_gone_mid_response(proxy, client, out):
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    client.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    client.connectionLost(Failure(ConnectionDone()))
    conn.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize("ending", [_answered, _tunnelled, _timed_out, _try_timed_out,
                                    _refused_connection, _bad_response, _reset_before_answering,
                                    _closed_before_answering,
                                    _client_gone_while_connecting, _client_gone_mid_response])
def test_every_ending_of_a_try_gives_its_backend_slot_back(ending):
    proxy = Proxy()
    client, out = proxy.client()
    ending(proxy, client, out)
    assert [b.active for b in proxy.backends.ring] == [0, 0]
    assert all(not b.idle or b.idle[-1].pipe is None for b in proxy.backends.ring)


# Flow control both ways: one pipe per client and backend connection paired.

def test_a_full_backend_buffer_pauses_the_client_until_it_drains():
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\nhalf")
    conn, wire = proxy.backend()
    assert wire.producer is not None and wire.streaming
    wire.producer.pauseProducing()  # the backend reads slower than the client sends
    assert out.producerState == "paused"
    wire.producer.resumeProducing()
    assert out.producerState == "producing"
    wire.producer.pauseProducing()
    client.dataReceived(b"more")
    conn.dataReceived(OK % (2, b"ok"))
    # The answer ends the pairing: the client reads again, nothing stays registered.
    assert wire.producer is None and out.producerState == "producing"
    assert conn.pipe is None and conn.phase is Phase.IDLE


def test_a_full_client_buffer_pauses_the_backend_until_the_answer_ends():
    proxy = Proxy(urls=URLS[:1])
    client, out = proxy.client()
    client.dataReceived(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, wire = proxy.backend()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nhalf")
    assert out.producer is not None and out.streaming
    out.producer.pauseProducing()  # the client reads slower than the backend sends
    assert wire.producerState == "paused" and conn.pipe.client_behind
    conn.dataReceived(b"more")
    assert out.producer is None and wire.producerState == "producing"
    assert conn.phase is Phase.IDLE


def test_a_pipe_takes_back_only_what_it_registered_and_closes_twice_harmlessly():
    from dockpart.proxy_exchange import Pipe, Reading, Throttle

    class Side(Reading):
        def __init__(self):
            self.transport = StringTransport()
            self.throttle = Throttle(self)

    client, upstream = Side(), Side()
    pipe = Pipe(client, upstream)
    pipe.request_flows()
    pipe.response_flows()
    upstream.transport.producer.pauseProducing()
    client.transport.producer.pauseProducing()
    assert client.reading_paused("peer") and pipe.client_behind
    other = Pipe(client, Side())
    other.close()  # not its producers: they stay, the pauses are lifted
    assert upstream.transport.producer is not None and client.transport.producer is not None
    pipe.close()
    pipe.close()
    assert upstream.transport.producer is None and client.transport.producer is None
    assert not client.reading_paused("peer") and not upstream.reading_paused("peer")
    assert client.transport.producerState == upstream.transport.producerState == "producing"


def test_a_backend_quiet_with_requests_in_flight_gets_new_ones_after_the_others():
    """With --try-timeout, one that answered nothing for a tenth of a try while it holds a
    request (frozen a moment ago, or busy) is passed over, so few requests meet a frozen
    instance before its try runs out; when every one is quiet the rotation goes on."""
    proxy = Proxy()
    proxy.backends.quiet_after = 0.1
    quiet, other = proxy.backends.ring
    proxy.client()[0].dataReceived(GET)
    conn, _ = proxy.backend()
    assert conn.backend is quiet
    proxy.reactor.advance(0.2)
    for _ in range(3):  # the rotation would alternate
        proxy.client()[0].dataReceived(GET)
    assert [c[1] for c in proxy.reactor.tcpClients[1:]] == [3002] * 3
    proxy.reactor.advance(0.2)  # now both are quiet: the rotation again
    for _ in range(2):
        proxy.client()[0].dataReceived(GET)
    assert sorted(c[1] for c in proxy.reactor.tcpClients[4:]) == [3001, 3002]
    conn.dataReceived(OK % (2, b"ok"))  # it answers: no longer quiet
    assert quiet.answered_at == proxy.reactor.seconds()



# What one client may hold (dockpart.proxy_limits).

def test_a_client_past_its_requests_in_flight_gets_429_and_others_are_served():
    proxy = Proxy(urls=URLS[:1], max_inflight_per_client=2)
    busy = [proxy.client() for _ in range(2)]
    for client, _ in busy:
        client.dataReceived(GET)
    third, out = proxy.client()
    third.dataReceived(GET)
    assert out.value().startswith(b"HTTP/1.1 429") and proxy.attempts() == 2
    assert not out.disconnecting  # the request was read whole: the connection stays
    other, other_out = proxy.client(ip="10.0.0.2")
    other.dataReceived(GET)
    assert proxy.attempts() == 3
    # One answered: that client has a place again.
    conn, _ = proxy.backend()
    conn.dataReceived(OK % (2, b"ok"))
    sent(out)
    third.dataReceived(GET)
    assert proxy.attempts() == 3 and conn.exchange is not None  # the pooled connection
    assert not out.value().startswith(b"HTTP/1.1 429")


def test_places_come_back_when_a_client_goes_away_mid_request():
    proxy = Proxy(urls=URLS[:1], max_inflight_per_client=1)
    client, _ = proxy.client()
    client.dataReceived(GET)
    client.connectionLost(Failure(ConnectionDone()))
    again, out = proxy.client()
    again.dataReceived(GET)
    assert out.value() == b"" and proxy.attempts() == 2
    assert proxy.factory.per_client.inflight == {b"127.0.0.1": 1}


def test_a_trickled_body_is_cut_408_at_its_deadline_and_its_backend_slot_freed():
    proxy = Proxy(urls=URLS[:1], body_timeout=20.0, body_min_rate=500.0)
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
    conn, wire = proxy.backend()
    for _ in range(4):  # a byte every 5 s: each pause is far below the idle timeout
        proxy.later(5)
        client.dataReceived(b"x")
    assert out.value() == b""
    proxy.later(1)  # 21 s for 5 bytes: past 20 s + 5/500 s
    assert out.value().startswith(b"HTTP/1.1 408") and out.disconnecting
    assert wire.disconnecting and conn.backend.active == 0
    assert proxy.factory.per_client.inflight == {}


def test_a_body_that_keeps_its_rate_is_not_cut():
    proxy = Proxy(urls=URLS[:1], body_timeout=20.0, body_min_rate=500.0)
    client, out = proxy.client()
    client.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n")
    conn, wire = proxy.backend()
    for _ in range(30):  # 1000 bytes a second for 30 s: slow, but above the rate
        proxy.later(1)
        client.dataReceived(b"x" * 1000)
    assert out.value() == b"" and len(sent(wire)) > 30000
    conn.dataReceived(OK % (2, b"ok"))
    assert out.value().startswith(b"HTTP/1.1 200")


def test_the_load_counts_complete_requests_and_a_few_of_each_client():
    proxy = Proxy(urls=URLS[:1], load_per_client=3)
    for _ in range(6):  # one client, six long requests
        proxy.client()[0].dataReceived(GET)
    for _ in range(2):  # and bodies trickling in
        proxy.client()[0].dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 9"
                                       b"\r\n\r\nx")
    proxy.client(ip="10.0.0.2")[0].dataReceived(GET)
    assert proxy.backends.ring[0].active == 9
    assert proxy.factory.fair_inflight() == {URLS[0]: 3 + 1}
