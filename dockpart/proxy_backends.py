"""The backends dockpart-proxy sends to: each one's figures, the rotation, passive health.

What a backend is (:class:`Backend`: its address, idle connections and counters) and how the
next one is chosen (:class:`BackendSet`: the rotation, failed backends left out).  A pure
model: no Redis here.  Others tell it what happened through its methods (a new list, a
failure, an answer) and read its figures; none writes its attributes, except ``Backend.idle``,
the pool of idle connections, which the connection side fills and empties.  Reading the list
from Redis (and the shared rotation's LMOVE) is :mod:`dockpart.proxy_sync`'s job; asking
backends whether they answer is :mod:`dockpart.proxy_health`'s.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.logger import Logger

from dockpart import load
from dockpart.tier import BadInstanceURL, parse_instance_url

if TYPE_CHECKING:
    from dockpart.proxy_hold import Hold

#: Idle pooled connections kept per backend; more are closed when they come back.
MAX_IDLE = 256


class Backend:
    """One entry of the list: where it is, its idle connections and what happened to it."""

    __slots__ = ("url", "host", "port", "authority", "idle", "down_until", "requests",
                 "errors", "latency_sum", "latency_count", "latency_buckets", "_active", "listed",
                 "answered_at", "busy_since")

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
        self.latency_buckets = load.empty_buckets()
        self._active = 0
        self.listed = True
        self.answered_at = 0.0  # when it last answered anything (a response head, a probe)
        self.busy_since = 0.0  # when its requests in flight went from none to one

    @property
    def active(self) -> int:
        """Requests in flight here: the slots taken and not given back."""
        return self._active

    def take(self, now: float | None = None) -> Slot:
        """One request in flight here (since ``now``), until the slot is released."""
        if not self._active and now is not None:
            self.busy_since = now
        self._active += 1
        return Slot(self)

    def heard(self, now: float) -> None:
        """It answered something: a response head, a probe."""
        self.answered_at = now

    def answered(self) -> None:
        """A response from this backend was passed on whole."""
        self.requests += 1

    def erred(self) -> None:
        """An attempt on this backend failed (no answer, a broken one, a cut body)."""
        self.errors += 1

    def timed(self, seconds: float, now: float | None = None) -> None:
        """One response head arrived ``seconds`` after its request was sent (at ``now``: it
        was heard, as :meth:`heard` says; one call on every request, not two)."""
        if now is not None:
            self.answered_at = now
        self.latency_sum += seconds
        self.latency_count += 1
        self.latency_buckets[load.bucket_of(seconds)] += 1

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


class Slot:
    """A request's place on a backend: taken by :meth:`Backend.take`, given back once.

    The one owner of :attr:`Backend.active`: however many endings a try has (an answer, a
    time-out, a lost connection), only the first :meth:`release` counts.
    """

    __slots__ = ("backend", "held")

    def __init__(self, backend: Backend):
        self.backend = backend
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.backend._active -= 1


class BackendSet:
    """The rotation over the known backends, in ``local`` or ``shared`` mode.

    ``local``: O(1) per request, no Redis round trip.  ``shared``: one
    ``LMOVE KEY KEY RIGHT LEFT`` per request (the seed's RPOPLPUSH, sent by
    :mod:`dockpart.proxy_sync`), so several proxies share one rotation; while Redis is away it
    rotates locally over the last list it knew.
    """

    log = Logger()

    def __init__(self, list_key: str, balance: str, clock, down_time: float = 10.0,
                 quiet_after: float | None = None):
        self.list_key = list_key
        self.shared = balance == "shared"
        self.clock = clock
        self.down_time = down_time
        #: A backend with requests in flight that answered nothing for this long is tried
        #: after the others: one that just froze gets few new requests before it is ejected.
        self.quiet_after = quiet_after
        self.ring: list[Backend] = []
        self.by_url: dict[str, Backend] = {}
        self._next = 0
        self.known = False  # a list was read at least once
        self._bad: set[str] = set()
        # An app's dockpart.proxy_hold.Hold: requests waiting for its first backend.
        self.hold: Hold | None = None

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
        if ring and self.hold is not None:
            self.hold.ready()

    # Choosing.

    def pick(self, tried=()) -> Backend | None:
        """The next backend in local rotation that is healthy and not tried yet.

        When every untried backend is marked down, the least recently failed one is tried
        anyway: a guess beats a certain 502.  A quiet one (see ``quiet_after``) comes after
        the others.  None when nothing is left.
        """
        ring = self.ring
        n = len(ring)
        if not n:
            return None
        now = self.clock.seconds()
        start = self._next
        fallback = None
        quiet = None
        quiet_since = now - self.quiet_after if self.quiet_after else None
        for i in range(n):
            backend = ring[(start + i) % n]
            if backend in tried:
                continue
            if backend.down_until <= now:
                if quiet_since is not None and backend.active and \
                        backend.answered_at < quiet_since and backend.busy_since < quiet_since:
                    if quiet is None:
                        quiet = i
                    continue
                self._next = (start + i + 1) % n
                return backend
            if fallback is None or backend.down_until < fallback.down_until:
                fallback = backend
        if quiet is not None:
            self._next = (start + quiet + 1) % n
            return ring[(start + quiet) % n]
        return fallback

    def shared_choice(self, url):
        """The backend for what LMOVE answered: a URL, None for an empty list (no backend), or
        an error (the local rotation answers instead)."""
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
            backend.erred()
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
            "list_known": self.known,
            "backends": [b.status(now) for b in self.ring],
        }
