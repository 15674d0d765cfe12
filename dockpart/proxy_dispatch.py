"""dockpart-proxy's protocol factory: where each exchange goes, its retries, and the drain.

:class:`ProxyFactory` builds the client connections (:mod:`dockpart.proxy_client`), picks a
backend for each exchange, lends it a pooled connection or opens one
(:mod:`dockpart.proxy_upstream`), sends it again only when the backend never read it
(:mod:`dockpart.proxy_retry`), holds each client to its share (:mod:`dockpart.proxy_limits`),
enforces the deadlines and drains on shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import defer, protocol
from twisted.logger import Logger

from dockpart.proxy_backends import Backend, BackendSet
from dockpart.proxy_client import ClientConnection
from dockpart.proxy_exchange import Exchange
from dockpart.proxy_limits import PerClient, body_overdue, fair_inflight
from dockpart.proxy_retry import Tries
from dockpart.proxy_upstream import BackendConnection

if TYPE_CHECKING:
    from dockpart.proxy_sync import RedisList
    from dockpart.proxy_routes import Routes

#: Pooled connections idle longer are not reused: backends close theirs after a few seconds
#: (node's default is 5 s), and a request on a connection closing under it may be lost.
POOL_IDLE_TIME = 4.0

#: Seconds a client is told to wait (Retry-After) when an app has no instance.
APP_RETRY_AFTER = 1


@dataclass
class Limits:
    """The answers a slow or greedy peer gets, in seconds and bytes."""
    max_header_size: int = 16384
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    connect_timeout: float = 3.0
    backend_timeout: float = 30.0
    first_read_wait: float = 2.0
    #: Past it with no byte of an answer, the backend is ejected and asked whether it
    #: answers at all (dockpart.proxy_retry; None: only backend_timeout applies).
    try_timeout: float | None = None
    #: What that question asks for (the health checks' path).
    probe_path: str = "/"
    #: Paths sent to another backend after a try timed out (dockpart.proxy_retry.safe_routes).
    retry_safe: tuple[bytes, ...] = ()
    #: One client address (dockpart.proxy_limits; 0: no limit): requests in flight (429
    #: beyond), a body's time (seconds, plus one per body_min_rate bytes; 408 beyond), and
    #: its share of the load reported to the autoscaler.
    max_inflight_per_client: int = 256
    body_timeout: float = 20.0
    body_min_rate: float = 500.0
    load_per_client: int = 8


class Stats:
    """Counters for the admin listener."""

    def __init__(self):
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.connections = 0
        self.retries = 0
        self.tunnels = 0


class _Connector(protocol.ClientFactory):
    """One connection attempt for one exchange."""

    noisy = False

    def __init__(self, proxy, backend: Backend, exchange: Exchange):
        self.proxy = proxy
        self.backend = backend
        self.exchange = exchange

    def buildProtocol(self, addr):
        conn = BackendConnection(self.backend, self.proxy)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector, reason):
        self.proxy.connect_failed(self.exchange, self.backend)


class ProxyFactory(protocol.Factory):
    """Client connections share the backends, the limits and the figures."""

    protocol = ClientConnection
    noisy = False
    log = Logger()

    def __init__(self, backends: BackendSet, reactor, limits: Limits | None = None,
                 lists: RedisList | None = None):
        self.backends = backends
        #: Where the list comes from (a read before a 503, shared mode's LMOVE); None in
        #: memory, where the list is only what was given to ``backends``.
        self.lists = lists
        self.reactor = reactor
        self.clock = reactor
        self.limits = limits or Limits()
        self.stats = Stats()
        self.clients: set[ClientConnection] = set()
        self.tries = Tries(backends, reactor, self.limits)
        self.per_client = PerClient(self.limits.max_inflight_per_client)
        # dockpart.proxy_routes.Routes: apps by Host; None: every request to ``backends``.
        self.routes: Routes | None = None

    def drain(self, timeout: float, poll: float = 0.05, idle_grace: float = 1.0
              ) -> defer.Deferred:
        """Finish what is in flight, take nothing new; fires with the number of connections cut.

        Called once the listener stopped accepting.  Every ``poll`` seconds: a busy connection
        is marked to close after a response that has not begun (``Connection: close``), one
        that stayed idle for ``idle_grace`` seconds is closed (a request a client is about to
        send on a connection it just opened or just used is answered, not cut), and after
        ``timeout`` seconds whatever is left is cut.  Polling keeps this apart from the
        exchange's own state handling.
        """
        done: defer.Deferred = defer.Deferred()
        give_up = self.clock.seconds() + timeout
        idle_since: dict[ClientConnection, tuple] = {}

        def tick() -> None:
            cut = 0
            now = self.clock.seconds()
            for client in list(self.clients):
                if client.closed:
                    continue
                exchange = client.current
                if now >= give_up:
                    cut += 1
                    client.abort()
                elif exchange is not None:
                    if not exchange.responded:
                        # Its response head says so; one already on its way did not, and
                        # the client may send its next request: it is answered, then closed.
                        exchange.close_after = True
                elif not client.parsing:
                    # Its idle deadline is set anew when a response ends: unchanged, nothing
                    # happened on the connection since it was first seen idle.
                    deadline, since = idle_since.get(client, (None, None))
                    if since is None or deadline != client.deadline:
                        idle_since[client] = (client.deadline, now)
                    elif now - since >= idle_grace:
                        client.close()
            if now >= give_up or not self.clients:
                done.callback(cut)
            else:
                self.reactor.callLater(poll, tick)

        tick()
        return done

    def sweep(self) -> None:
        """Enforce every deadline (header, idle, body, backend answer); called about twice a
        second."""
        now = self.clock.seconds()
        for client in list(self.clients):
            deadline = client.deadline
            if client.closed:
                continue
            try:
                exchange = client.current
                if deadline is not None and deadline < now:
                    client.expire(now)
                elif exchange is not None and self._body_overdue(client, exchange, now):
                    client.cut_body(exchange, 408, "the request body took too long\n")
            except Exception:
                client.log.failure("enforcing a time limit")
                client.abort()

    def _body_overdue(self, client: ClientConnection, exchange: Exchange, now: float) -> bool:
        """The body of the client's request in flight is late, through no fault of ours (no
        backend yet, or one that does not read)."""
        if exchange.request_done or exchange.upgrade or \
                client.reading_paused("peer") or client.reading_paused("no backend yet"):
            return False
        return body_overdue(exchange, now, self.limits.body_timeout, self.limits.body_min_rate)

    def fair_inflight(self) -> Mapping[str, int]:
        """Requests in flight per backend URL as load (dockpart.proxy_limits)."""
        return fair_inflight(self.clients, self.limits.load_per_client)

    # Sending an exchange somewhere.

    def start(self, exchange: Exchange) -> None:
        if exchange.client.closed:
            return
        if not self.per_client.admit(exchange):
            return exchange.client.fail_exchange(
                exchange, 429, "too many requests in flight from your address\n")
        if exchange.has_body and not exchange.body_from:
            exchange.body_from = self.clock.seconds()
        backends = exchange.backends
        if backends is None:
            backends = exchange.backends = (self.backends if self.routes is None
                                            else self.routes.backends_for(exchange.host))
        if not backends.known:
            # Just started: the first read of the list is a moment away, or Redis is down.
            if not exchange.started:
                exchange.started = self.clock.seconds()
            if self.clock.seconds() - exchange.started < self.limits.first_read_wait:
                self.reactor.callLater(0.05, self.start, exchange)
                return
        if backends.shared and self.lists is not None:
            self.lists.pick_shared(self._picked, exchange)
        else:
            self._picked(backends.pick(), exchange)

    def _picked(self, backend: Backend | None, exchange: Exchange) -> None:
        client = exchange.client
        if client.closed:
            return
        backends = exchange.backends
        if backend is None:
            if exchange.tried:
                # Backend addresses go to the log and the admin listener, not to clients.
                self.log.warn("every backend failed for a request: {urls}",
                              urls=", ".join(b.url for b in exchange.tried))
                client.fail_exchange(exchange, 502, "every backend failed\n")
            elif (backends.known and not exchange.reread and not backends.shared
                  and self.reader_for(backends) is not None):
                # Empty as far as we know; a notice of a first backend may be on its way.
                # A 503 should be true when said, so read the list once more first.
                exchange.reread = True
                reader = self.reader_for(backends)
                assert reader is not None
                reader.reread().addBoth(lambda _: self._picked(backends.pick(), exchange))
            elif backends is not self.backends:
                # An app with no instance: held while one starts when it scales to zero
                # (dockpart.proxy_hold), else it may be starting: try again in a moment.
                hold = backends.hold
                if hold is not None and hold.hold(exchange, self.start):
                    return
                client.fail_exchange(exchange, 503, "the app has no instance running\n",
                                     extra=b"Retry-After: %d\r\n" % (
                                         hold.retry_after() if hold else APP_RETRY_AFTER))
            elif backends.known:
                client.fail_exchange(exchange, 503, "no backend is available\n")
            else:
                client.fail_exchange(exchange, 503, "no backend is known yet\n")
            return
        now = self.clock.seconds()
        exchange.try_on(backend, now)
        idle = backend.idle
        if idle:
            too_old = now - POOL_IDLE_TIME
            while idle:
                conn = idle.pop()
                if conn.idle_since < too_old:
                    conn.drop()
                elif not conn.closed:
                    conn.send(exchange)
                    return
        self.reactor.connectTCP(backend.host, backend.port, _Connector(self, backend, exchange),
                                timeout=self.limits.connect_timeout)
        client.deadline = self.clock.seconds() + self.limits.connect_timeout + \
            self.tries.first_wait()

    def connected(self, conn: BackendConnection, exchange: Exchange) -> None:
        if exchange.backend is not conn.backend or exchange.conn is not None:
            conn.drop()  # the exchange ended (timeout) while connecting
        elif exchange.client.closed:
            exchange.end_try()
            conn.drop()
        else:
            conn.send(exchange)

    def connect_failed(self, exchange: Exchange, backend: Backend) -> None:
        if exchange.backend is not backend or exchange.conn is not None:
            return
        exchange.end_try()
        exchange.backends.failed(backend)
        if exchange.client.closed:
            return
        self.stats.retries += 1
        self._picked(exchange.backends.pick(exchange.tried), exchange)

    def reader_for(self, backends: BackendSet) -> RedisList | None:
        """What reads ``backends``' list from Redis (the seed's, or an app's); None in memory."""
        if backends is self.backends:
            return self.lists
        return self.routes.readers.get(backends) if self.routes is not None else None

    def retry(self, exchange: Exchange, backend: Backend, stale: bool) -> None:
        """Send again after a connection died before answering; a dead backend is left out."""
        if len(exchange.tried) > len(exchange.backends.ring) + 2:
            return exchange.client.fail_exchange(exchange, 502, "every backend failed\n")
        tried = exchange.tried
        if stale and tried.count(backend) < 2:
            # A pooled connection the backend had closed: the same backend, a new connection.
            while backend.idle:
                backend.idle.pop().drop()
            self._picked(backend, exchange)
            return
        self._picked(exchange.backends.pick(tried), exchange)
