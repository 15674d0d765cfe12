"""The backends dockpart-proxy sends to: the Redis list, its rotation, health and figures.

The list lives in Redis (``servers`` unless ``--servers-key`` says otherwise).  The proxy keeps
the last list it read, so traffic goes on while Redis is away; a pub/sub notice on
``keys.changes_channel(KEY)`` makes it read the list again at once, and a periodic read
catches anything a notice missed.
"""

from collections import deque

from twisted.application.internet import ClientService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dockpart import keys
from dockpart.tier import BadInstanceURL, parse_instance_url
from dockpart.redisconn import RedisService, RedisUnavailable

#: Idle pooled connections kept per backend; more are closed when they come back.
MAX_IDLE = 256


class Backend:
    """One entry of the list: where it is, its idle connections and what happened to it."""

    __slots__ = ("url", "host", "port", "authority", "idle", "down_until", "requests",
                 "errors", "latency_sum", "latency_count", "active", "listed")

    def __init__(self, url: str, host: str, port: int):
        self.url = url
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}".encode()
        self.idle: deque = deque()
        self.down_until = 0.0
        self.requests = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.active = 0
        self.listed = True

    def status(self, now: float) -> dict:
        return {
            "url": self.url,
            "healthy": self.down_until <= now,
            "down_for": round(max(0.0, self.down_until - now), 3),
            "requests": self.requests,
            "errors": self.errors,
            "active": self.active,
            "idle_connections": len(self.idle),
            "mean_latency_ms": round(1000 * self.latency_sum / self.latency_count, 3)
            if self.latency_count else None,
        }


class BackendSet:
    """The rotation over the known backends, in ``local`` or ``shared`` mode.

    ``local``: O(1) per request, no Redis round trip.  ``shared``: one
    ``LMOVE KEY KEY RIGHT LEFT`` per request (the seed's RPOPLPUSH), so several proxies share
    one rotation; while Redis is away it rotates locally over the last list it knew.
    """

    log = Logger()

    def __init__(self, redis: RedisService, list_key: str, balance: str, clock,
                 down_time: float = 10.0):
        self.redis = redis
        self.list_key = list_key
        self.shared = balance == "shared"
        self.clock = clock
        self.down_time = down_time
        self.ring: list[Backend] = []
        self.by_url: dict[str, Backend] = {}
        self._next = 0
        self.known = False  # a list was read at least once
        self.rotation: "_Rotation | None" = None  # the connection for LMOVE (shared mode)
        self._bad: set[str] = set()
        self._rereading = None
        self._waiting: list = []

    # The list.

    def update(self, urls: list[str]) -> None:
        """Take ``urls`` as the new list; backends keep their figures and pooled connections."""
        ring = []
        for url in urls:
            backend = self.by_url.get(url)
            if backend is None:
                try:
                    host, port = parse_instance_url(url)
                except BadInstanceURL as e:
                    if url not in self._bad:
                        self._bad.add(url)
                        self.log.warn("ignoring list entry: {reason}", reason=str(e))
                    continue
                backend = self.by_url[url] = Backend(url, host, port)
            backend.listed = True
            ring.append(backend)
        current = set(map(id, ring))
        for url, backend in list(self.by_url.items()):
            if id(backend) not in current:
                backend.listed = False
                while backend.idle:
                    backend.idle.pop().drop()
                if not backend.active:
                    del self.by_url[url]
        if [b.url for b in ring] != [b.url for b in self.ring]:
            self.log.info("backends of {key}: {urls}", key=self.list_key,
                          urls=" ".join(b.url for b in ring) or "(none)")
        self.ring = ring
        self.known = True

    def refresh(self) -> defer.Deferred:
        """Read the list from Redis; keep the last one when Redis cannot answer.

        Fires True when the list was read, False when Redis could not answer.
        """
        d = self.redis.call("LRANGE", self.list_key, 0, -1)
        d.addCallback(lambda urls: self.update(urls) or True)
        d.addErrback(lambda f: f.trap(RedisUnavailable) and False)
        return d

    def reread(self) -> defer.Deferred:
        """A read of the list that started now; concurrent callers share one read."""
        if self._rereading is None:
            self._rereading = self.refresh()
            self._rereading.addBoth(self._reread_done)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _reread_done(self, result):
        self._rereading = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(result)

    # Choosing.

    def pick(self, tried=()) -> Backend | None:
        """The next backend in local rotation that is healthy and not tried yet.

        When every untried backend is marked down, the least recently failed one is tried
        anyway: a guess beats a certain 502.  None when nothing is left.
        """
        ring = self.ring
        n = len(ring)
        if not n:
            return None
        now = self.clock.seconds()
        start = self._next
        fallback = None
        for i in range(n):
            backend = ring[(start + i) % n]
            if backend in tried:
                continue
            if backend.down_until <= now:
                self._next = (start + i + 1) % n
                return backend
            if fallback is None or backend.down_until < fallback.down_until:
                fallback = backend
        return fallback

    def pick_shared(self, callback, arg) -> None:
        """One step of the rotation shared in Redis: ``callback(backend or None, arg)``.

        Uses the local rotation while Redis is away.
        """
        rotation = self.rotation
        if rotation is None:
            callback(self.pick(), arg)
        else:
            rotation.lmove(callback, arg)

    def shared_choice(self, url):
        """The backend for what LMOVE answered (a string, None for an empty list, or an error)."""
        if url is None:
            return None
        if url.__class__ is not str:
            return self.pick()
        backend = self.by_url.get(url)
        if backend is None:
            try:
                host, port = parse_instance_url(url)
            except BadInstanceURL:
                return self.pick()
            # Listed in Redis but not yet read here: a notice is on its way.
            backend = self.by_url[url] = Backend(url, host, port)
            backend.listed = False
        if backend.down_until > self.clock.seconds():
            return self.pick() or backend
        return backend

    # Health.

    def failed(self, backend: Backend, count: bool = True) -> None:
        """Passive health: a backend that refused or timed out is left out for a while."""
        if count:
            backend.errors += 1
        if backend.down_until <= self.clock.seconds():
            self.log.warn("backend {url} failed; left out for {seconds}s", url=backend.url,
                          seconds=self.down_time)
        backend.down_until = self.clock.seconds() + self.down_time

    def healthy(self, backend: Backend) -> None:
        if backend.down_until > self.clock.seconds():
            self.log.info("backend {url} answers again", url=backend.url)
        backend.down_until = 0.0

    def status(self) -> dict:
        now = self.clock.seconds()
        return {
            "list_key": self.list_key,
            "balance": "shared" if self.shared else "local",
            "redis_connected": self.redis.connected,
            "list_known": self.known,
            "backends": [b.status(now) for b in self.ring],
        }


class _Notices(Protocol):
    """SUBSCRIBE to the list's channel; any message means: read the list again."""

    def connectionMade(self):
        owner = self.factory.owner
        password = owner.redis.address.password
        if password:
            self.transport.write(_command(b"AUTH", password.encode()))
        self.transport.write(_command(b"SUBSCRIBE", keys.changes_channel(owner.list_key).encode()))
        # Whatever changed while no notice could arrive.
        owner.refresh()

    def dataReceived(self, data):
        if b"message" in data:
            self.factory.owner.refresh()


class _Rotation(Protocol):
    """A lean Redis connection for the per-request LMOVE of ``--balance shared``.

    Commands are pipelined and answered in order; no Deferred per request.  A connection
    that stops answering is dropped by :meth:`watch`, and requests fall back to the local
    rotation until it is back.
    """

    log = Logger()

    def connectionMade(self):
        owner = self.factory.owner
        self.backends = owner.backends
        self.transport.setTcpNoDelay(True)
        self.waiting: deque = deque()
        self.buffer = b""
        self.replies = 0
        self._seen = 0
        self._stalled = 0.0
        self._lmove = _command(b"LMOVE", *[self.backends.list_key.encode()] * 2, b"RIGHT", b"LEFT")
        address = owner.redis.address
        if address.password:
            self._send(_command(b"AUTH", address.password.encode()), None)
        if address.db:
            self._send(_command(b"SELECT", str(address.db).encode()), None)
        self.backends.rotation = self

    def _send(self, command: bytes, callback, arg=None) -> None:
        self.transport.write(command)
        self.waiting.append((callback, arg))

    def lmove(self, callback, arg) -> None:
        self.transport.write(self._lmove)
        self.waiting.append((callback, arg))

    def dataReceived(self, data):
        buf = self.buffer + data if self.buffer else data
        pos = 0
        size = len(buf)
        waiting = self.waiting
        backends = self.backends
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            kind = buf[pos]
            if kind == 36:  # $: a bulk string, or nil
                n = int(buf[pos + 1:end])
                if n < 0:
                    value = None
                    pos = end + 2
                else:
                    if size < end + 4 + n:
                        break
                    value = buf[end + 2:end + 2 + n].decode()
                    pos = end + 4 + n
            elif kind in (43, 58):  # +simple string, :integer
                value = buf[pos + 1:end].decode()
                pos = end + 2
            elif kind == 45:  # -error
                value = RedisUnavailable(buf[pos + 1:end].decode(errors="replace"))
                pos = end + 2
            else:
                self.transport.abortConnection()
                return
            self.replies += 1
            callback, arg = waiting.popleft()
            if callback is not None:
                try:
                    callback(backends.shared_choice(value), arg)
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

    def connectionLost(self, reason):
        backends = self.backends
        if backends.rotation is self:
            backends.rotation = None
        waiting, self.waiting = self.waiting, deque()
        for callback, arg in waiting:
            if callback is not None:
                callback(backends.pick(), arg)


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class BackendSync(MultiService):
    """Keeps a BackendSet's list current: notices on the channel plus a periodic read."""

    log = Logger()

    def __init__(self, backends: BackendSet, reactor, interval: float = 1.0):
        super().__init__()
        self.backends = backends
        self.redis = backends.redis
        self.list_key = backends.list_key
        self._connection(_Notices, reactor)
        if backends.shared:
            self._connection(_Rotation, reactor)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self.interval = interval
        self._refreshing = None
        self._again = False
        self.reactor = reactor

    def _connection(self, protocol_class, reactor) -> None:
        """A Redis connection of our own, made again whenever it is lost."""
        factory = Factory.forProtocol(protocol_class)
        factory.noisy = False
        factory.owner = self
        address = self.redis.address
        endpoint = TCP4ClientEndpoint(reactor, address.host, address.port,
                                      timeout=self.redis.timeout)
        # Retry every half second or so: a restarted Redis is heard from at once.
        ClientService(endpoint, factory, retryPolicy=lambda attempt: min(0.5 * attempt, 2.0),
                      clock=reactor).setServiceParent(self)

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self):
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def _tick(self) -> None:
        rotation = self.backends.rotation
        if rotation is not None:
            rotation.watch(self.interval, self.redis.timeout)
        self.refresh()

    def refresh(self) -> None:
        """Read the list; notices that arrive during a read cause one more read after it."""
        if self._refreshing is not None:
            self._again = True
            return
        self._refreshing = self.backends.refresh()
        self._refreshing.addErrback(lambda f: self.log.failure("reading {key}", f, key=self.list_key))
        self._refreshing.addBoth(self._refreshed)

    def _refreshed(self, read):
        self._refreshing = None
        if read is False and not self.backends.known and self.running:
            # Starting up before the Redis connection is: try again soon, not in a second.
            self.reactor.callLater(0.1, self.refresh)
        elif self._again:
            self._again = False
            self.refresh()
