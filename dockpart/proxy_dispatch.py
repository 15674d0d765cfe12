"""dockpart-proxy's protocol factory: where each exchange goes, its retries, and the drain.

:class:`ProxyFactory` builds the client connections (:mod:`dockpart.proxy_client`), picks a
backend for each exchange, lends it a pooled connection or opens one
(:mod:`dockpart.proxy_upstream`), sends it again elsewhere when that is safe, enforces the
deadlines and drains on shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer, protocol
from twisted.logger import Logger

from dockpart.proxy_backends import Backend, BackendSet
from dockpart.proxy_client import ClientConnection
from dockpart.proxy_exchange import Exchange
from dockpart.proxy_upstream import BackendConnection

#: Pooled connections idle longer are not reused: backends close theirs after a few seconds
#: (node's default is 5 s), and a request on a connection closing under it may be lost.
POOL_IDLE_TIME = 4.0


@dataclass
class Limits:
    """The answers a slow or greedy peer gets, in seconds and bytes."""
    max_header_size: int = 16384
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    connect_timeout: float = 3.0
    backend_timeout: float = 30.0
    first_read_wait: float = 2.0
    #: Per try, for an idempotent request without a body: past it with no byte of an answer,
    #: the request is sent once to another backend (None: no such retry).
    try_timeout: float | None = None


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

    def __init__(self, backends: BackendSet, reactor, limits: Limits | None = None):
        self.backends = backends
        self.reactor = reactor
        self.clock = reactor
        self.limits = limits or Limits()
        self.stats = Stats()
        self.clients: set[ClientConnection] = set()

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
        done = defer.Deferred()
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
        """Enforce every deadline (header, idle, backend answer); called about twice a second."""
        now = self.clock.seconds()
        for client in list(self.clients):
            deadline = client.deadline
            if deadline is not None and deadline < now and not client.closed:
                try:
                    client.expire(now)
                except Exception:
                    client.log.failure("enforcing a time limit")
                    client.abort()

    # Sending an exchange somewhere.

    def start(self, exchange: Exchange) -> None:
        backends = self.backends
        if exchange.client.closed:
            return
        if not backends.known:
            # Just started: the first read of the list is a moment away, or Redis is down.
            if not exchange.started:
                exchange.started = self.clock.seconds()
            if self.clock.seconds() - exchange.started < self.limits.first_read_wait:
                self.reactor.callLater(0.05, self.start, exchange)
                return
        if backends.shared:
            backends.pick_shared(self._picked, exchange)
        else:
            self._picked(backends.pick(), exchange)

    def _picked(self, backend: Backend | None, exchange: Exchange) -> None:
        client = exchange.client
        if client.closed:
            return
        if backend is None:
            if exchange.tried:
                # Backend addresses go to the log and the admin listener, not to clients.
                self.log.warn("every backend failed for a request: {urls}",
                              urls=", ".join(b.url for b in exchange.tried))
                client.fail_exchange(exchange, 502, "every backend failed\n")
            elif self.backends.known and not exchange.reread and not self.backends.shared:
                # Empty as far as we know; a notice of a first backend may be on its way.
                # A 503 should be true when said, so read the list once more first.
                exchange.reread = True
                self.backends.reread().addBoth(lambda _: self._picked(self.backends.pick(),
                                                                      exchange))
            elif self.backends.known:
                client.fail_exchange(exchange, 503, "no backend is available\n")
            else:
                client.fail_exchange(exchange, 503, "no backend is known yet\n")
            return
        exchange.try_on(backend)
        idle = backend.idle
        if idle:
            too_old = self.clock.seconds() - POOL_IDLE_TIME
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
            self.answer_wait(exchange)

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
        self.backends.failed(backend)
        if exchange.client.closed:
            return
        self.stats.retries += 1
        self._picked(self.backends.pick(exchange.tried), exchange)

    def answer_wait(self, exchange: Exchange) -> float:
        """How long the answer to a fully sent request is waited for on this try."""
        limits = self.limits
        if limits.try_timeout is not None and exchange.idempotent and not exchange.retried:
            return min(limits.try_timeout, limits.backend_timeout)
        return limits.backend_timeout

    def try_elsewhere(self, exchange: Exchange) -> bool:
        """After a try timed out without a byte of an answer: send it once to another backend.

        False when the request may not be sent again or no other backend is left.
        """
        if self.limits.try_timeout is None or not exchange.idempotent or exchange.retried:
            return False
        backend = self.backends.pick(exchange.tried)
        if backend is None:
            return False
        exchange.retried = True
        self.stats.retries += 1
        self._picked(backend, exchange)
        return True

    def retry(self, exchange: Exchange, backend: Backend, stale: bool) -> None:
        """Send again after a connection died before answering; a dead backend is left out."""
        if len(exchange.tried) > len(self.backends.ring) + 2:
            return exchange.client.fail_exchange(exchange, 502, "every backend failed\n")
        tried = exchange.tried
        if stale and tried.count(backend) < 2:
            # A pooled connection the backend had closed: the same backend, a new connection.
            while backend.idle:
                backend.idle.pop().drop()
            self._picked(backend, exchange)
            return
        self._picked(self.backends.pick(tried), exchange)
