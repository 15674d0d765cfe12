"""dockpart-proxy's copy of the Redis list: its change notices, its periodic read, and the
Redis client of ``--balance shared``.

The proxy keeps the last list it read, so traffic goes on while Redis is away; a pub/sub notice
on ``keys.changes_channel(KEY)`` makes it read the list again at once, and a periodic read
catches anything a notice missed.  Right after Redis comes back, an empty list read without a
notice is most likely a Redis that lost its data, not a tier with no instance: the proxy keeps
serving what it had, logs it, and goes on reading until the list or a notice says otherwise.
"""

from __future__ import annotations

from collections import deque

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from dockpart import keys
from dockpart.periodic import Periodic
from dockpart.proxy_backends import BackendSet
from dockpart.redisconn import (INCOMPLETE, RedisError, RedisService, RedisUnavailable, auth,
                                command, read_reply)


class RedisList:
    """The list as Redis holds it, read into a :class:`BackendSet`; and, in shared mode, the
    rotation's per-request LMOVE (through :class:`_Rotation` while it is connected).

    Right after Redis was away, an empty read is not taken at its word (see the module's
    docstring) until a change notice or a non-empty read.
    """

    log = Logger()

    def __init__(self, redis: RedisService, backends: BackendSet):
        self.redis = redis
        self.backends = backends
        self.rotation: _Rotation | None = None  # the LMOVE connection (shared mode), when up
        # After Redis was away, an empty read may be a list Redis lost, not an empty tier.
        self._distrust_empty = False
        self._holding = False  # serving the last list although Redis now says empty
        self._rereading: defer.Deferred | None = None
        self._waiting: list = []

    def refresh(self) -> defer.Deferred:
        """Read the list from Redis; keep the last one when Redis cannot answer.

        Fires True when the list was read, False when Redis could not answer.
        """
        d = self.redis.call("LRANGE", self.backends.list_key, 0, -1)
        d.addCallback(self._read)
        d.addErrback(self._unavailable)
        return d

    def _read(self, urls: list[str]) -> bool:
        backends = self.backends
        if urls:
            self._distrust_empty = self._holding = False
        elif self._distrust_empty and backends.ring:
            if not self._holding:
                self._holding = True
                self.log.warn("{key} read empty after Redis was away, with no change notice "
                              "(a restart that lost it?): still serving the {n} backends read "
                              "before, and reading again", key=backends.list_key,
                              n=len(backends.ring))
            return True
        backends.update(urls)
        return True

    def _unavailable(self, failure) -> bool:
        failure.trap(RedisUnavailable)
        self.distrust_empty()
        return False

    def distrust_empty(self) -> None:
        """Redis was away: an empty list is not taken until a notice or a non-empty read."""
        self._distrust_empty = True

    def trust_empty(self) -> None:
        """A change notice: what the list says next is what the tier is."""
        self._distrust_empty = self._holding = False

    def reread(self) -> defer.Deferred:
        """A read of the list that started now; concurrent callers share one read."""
        if self._rereading is None:
            self._rereading = self.refresh()
            self._rereading.addBoth(self._reread_done)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d

    def _reread_done(self, result):
        self._rereading = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    def pick_shared(self, callback, arg) -> None:
        """One step of the rotation shared in Redis: ``callback(backend or None, arg)``.

        Uses the local rotation while Redis is away.
        """
        rotation = self.rotation
        if rotation is None:
            callback(self.backends.pick(), arg)
        else:
            rotation.lmove(callback, arg)

    def choice(self, answer):
        """The backend for what LMOVE answered; an empty list right after Redis came back
        (perhaps without its data) is served by the local rotation."""
        if answer is None and self._distrust_empty:
            return self.backends.pick()
        return self.backends.shared_choice(answer)


class Subscriber(Protocol):
    """A Redis connection that only listens to notices: what it subscribes to and what a notice
    means are its owner's (``factory.owner``): ``subscriptions()`` (the RESP commands),
    ``notice(reply)`` for each ``message``/``pmessage``, ``notices_connected()`` and
    ``notices_lost()``."""

    log = Logger()
    transport: ITCPTransport  # set by the ClientService's TCP connection before connectionMade

    def connectionMade(self):
        owner = self.factory.owner
        self.buffer = b""
        if owner.redis.address.password:
            self.transport.write(auth(owner.redis.address))
        for subscription in owner.subscriptions():
            self.transport.write(subscription)
        owner.notices_connected()

    def dataReceived(self, data):
        buf = self.buffer + data
        pos = 0
        owner = self.factory.owner
        try:
            while pos < len(buf):
                reply, pos = read_reply(buf, pos)
                if reply is INCOMPLETE:
                    break
                if isinstance(reply, list) and reply and reply[0] in ("message", "pmessage"):
                    owner.notice(reply)
                elif isinstance(reply, RedisError):
                    self.log.warn("Redis refused the subscription: {error}", error=str(reply))
        except ValueError:
            self.log.warn("not a Redis reply on a notice connection; reconnecting")
            self.transport.abortConnection()
            return
        self.buffer = buf[pos:]

    def connectionLost(self, reason: Failure = connectionDone):
        self.factory.owner.notices_lost()


class _Rotation(Protocol):
    """A lean Redis connection for the per-request LMOVE of ``--balance shared``.

    Why not :class:`RedisService`: the proxy serves about 15,000 requests/s
    (docs/benchmarks.md), and here each LMOVE, pipelined and answered in order, costs a plain
    callback, with no Deferred and no timer (measured on the project's 2-core machine, 50
    LMOVEs in flight against a local redis-server: 84,000 to 200,000 LMOVE/s).
    A connection that stops answering is dropped by :meth:`watch`, and requests fall back to
    the local rotation until it is back.
    """

    log = Logger()
    transport: ITCPTransport  # set by the ClientService's TCP connection before connectionMade

    def connectionMade(self):
        owner = self.factory.owner
        self.lists = owner.lists
        self.backends = owner.backends
        self.transport.setTcpNoDelay(True)
        self.waiting: deque = deque()
        self.buffer = b""
        self.replies = 0
        self._seen = 0
        self._stalled = 0.0
        self._lmove = command(b"LMOVE", *[self.backends.list_key.encode()] * 2, b"RIGHT", b"LEFT")
        address = owner.redis.address
        if address.password:
            self._send(auth(address), None)
        if address.db:
            self._send(command(b"SELECT", str(address.db).encode()), None)
        self.lists.rotation = self

    def _send(self, data: bytes, callback, arg=None) -> None:
        self.transport.write(data)
        self.waiting.append((callback, arg))

    def lmove(self, callback, arg) -> None:
        self.transport.write(self._lmove)
        self.waiting.append((callback, arg))

    def dataReceived(self, data):
        buf = self.buffer + data if self.buffer else data
        pos = 0
        size = len(buf)
        waiting = self.waiting
        choice = self.lists.choice
        while pos < size:
            try:
                value, pos = read_reply(buf, pos)
            except ValueError:
                self.transport.abortConnection()
                return
            if value is INCOMPLETE:
                break
            self.replies += 1
            callback, arg = waiting.popleft()
            if callback is not None:
                try:
                    callback(choice(value), arg)
                except Exception:
                    self.log.failure("handling a request after LMOVE")
        self.buffer = buf[pos:]

    def watch(self, elapsed: float, timeout: float) -> None:
        """Called periodically: drop the connection when answers stopped coming."""
        if self.waiting and self.replies == self._seen:
            self._stalled += elapsed
            if self._stalled >= timeout:
                self.transport.abortConnection()
        else:
            self._stalled = 0.0
        self._seen = self.replies

    def connectionLost(self, reason: Failure = connectionDone):
        if self.lists.rotation is self:
            self.lists.rotation = None
        waiting, self.waiting = self.waiting, deque()
        for callback, arg in waiting:
            if callback is not None:
                callback(self.backends.pick(), arg)


def redis_connection(owner, protocol_class, reactor) -> ClientService:
    """A Redis connection of ``owner``'s own (``factory.owner``), made again whenever lost."""
    factory = Factory.forProtocol(protocol_class)
    factory.noisy = False
    factory.owner = owner  # type: ignore[attr-defined]  # the protocols' way back to owner
    address = owner.redis.address
    endpoint = TCP4ClientEndpoint(reactor, address.host, address.port,
                                  timeout=owner.redis.timeout)
    # Retry every half second or so: a restarted Redis is heard from at once.
    return ClientService(endpoint, factory, retryPolicy=lambda attempt: min(0.5 * attempt, 2.0),
                         clock=reactor)


class _Reads(Periodic):
    """BackendSync's periodic read: the safety net for a notice that never came."""

    def __init__(self, sync: "BackendSync", interval: float, clock):
        super().__init__(interval, clock, now=True)
        self.sync = sync

    def tick(self) -> None:
        self.sync.tick()


class BackendSync(MultiService):
    """Keeps a BackendSet's list current: notices on the channel plus a periodic read.

    Its :attr:`lists` (a :class:`RedisList`) is what the proxy asks for a read before a 503
    and, in shared mode, for the next backend.
    """

    log = Logger()

    def __init__(self, backends: BackendSet, redis: RedisService, reactor,
                 interval: float = 1.0):
        super().__init__()
        self.backends = backends
        self.redis = redis
        self.lists = RedisList(redis, backends)
        self.list_key = backends.list_key
        self._connection(Subscriber, reactor)
        if backends.shared:
            self._connection(_Rotation, reactor)
        # Added last: started after the connections, stopped before them.
        _Reads(self, interval, reactor).setServiceParent(self)
        self.interval = interval
        self._refreshing: defer.Deferred | None = None
        self._again = False
        self._retry = None  # the soon read of a start before Redis answered
        self.reactor = reactor

    def _connection(self, protocol_class, reactor) -> None:
        redis_connection(self, protocol_class, reactor).setServiceParent(self)

    def stopService(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return super().stopService()

    def subscriptions(self) -> list[bytes]:
        """The list's change channel: each message on it means: read the list again."""
        return [command(b"SUBSCRIBE", keys.changes_channel(self.list_key).encode())]

    def notice(self, reply: list) -> None:
        self.refresh(notice=True)

    def notices_connected(self) -> None:
        """The notice connection is (back) up: read whatever changed while it was away."""
        self.refresh()

    def notices_lost(self) -> None:
        self.lists.distrust_empty()

    def tick(self) -> None:
        rotation = self.lists.rotation
        if rotation is not None:
            rotation.watch(self.interval, self.redis.timeout)
        self.refresh()

    def refresh(self, notice: bool = False) -> None:
        """Read the list; notices that arrive during a read cause one more read after it."""
        if notice:
            self.lists.trust_empty()
        if self._refreshing is not None:
            self._again = True
            return
        self._refreshing = self.lists.refresh()
        self._refreshing.addErrback(lambda f: self.log.failure("reading {key}", f,
                                                               key=self.list_key))
        self._refreshing.addBoth(self._refreshed)

    def _refreshed(self, read):
        self._refreshing = None
        if read is False and not self.backends.known and self.running:
            # Starting up before the Redis connection is: try again soon, not in a second
            # (once: a read already due soon is not doubled).
            if self._retry is None or not self._retry.active():
                self._retry = self.reactor.callLater(0.1, self.refresh)
        elif self._again:
            self._again = False
            self.refresh()
