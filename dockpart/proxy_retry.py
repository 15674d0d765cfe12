"""When dockpart-proxy sends a request again, and what becomes of a try that timed out.

No request is ever run twice because of the proxy: the seed's routes change state on ``GET``
(``/meow`` takes an image, ``/spawn`` queues a spawn), so "GET is idempotent" is no licence.
As HAProxy's default ``retry-on conn-failure``, a request goes to another backend (or on a new
connection) only when the backend provably never read it (:func:`never_read`):

- the connection could not be made (refused, or no handshake within ``--connect-timeout``);
- the connection was *reset* before a byte of an answer, and the request has no body: a TCP
  stack resets, rather than closes, a connection closed while bytes it received are unread
  (RFC 1122 4.2.2.13), or one that receives bytes after it was closed, so the backend never
  had the whole head.  (A backend that reads a request, acts on it and then aborts the
  connection with SO_LINGER 0 without a word would defeat this; none of ours does.)

A clean close before any answer (the backend may have run the request and died) is a 502.

A try that timed out (``--try-timeout``: no byte of an answer that long after the request was
sent) is not sent elsewhere, unless declared safe (below): the backend may be running it.
:class:`Tries` ejects the backend at once, so the next requests avoid it, and asks it once
whether its process answers at all (:mod:`dockpart.probe`, half a try long).  Answering, it
is alive and this request is merely slow: back in rotation, and the request waits up to
``--backend-timeout``.  Silent (frozen, hung): the request is answered 504.  So a frozen
instance delays a request by one try and a half at most, and a slow request on a live one is
neither cut nor run twice.

Only routes an operator declared safe to run twice (``--retry-safe``, :func:`safe_routes`:
none by default, as HAProxy retries no response timeout unless told) go elsewhere after a try
timed out, once (the one left out is asked all the same): a bodiless GET or HEAD whose path is
one of them, for the seed's list (an app routed by Host, :mod:`dockpart.proxy_routes`, has
routes of its own, none declared).  The path is matched as sent, undecoded: one with a
percent-escape, a backslash, a dot segment or an empty segment matches no route, so a backend
that normalises paths cannot be led from a declared route to another.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.logger import Logger

from dockpart import probe
from dockpart.proxy_backends import Backend, BackendSet


#: Methods a declared route may be sent again with; a body is never sent twice.
SAFE_METHODS = frozenset([b"GET", b"HEAD"])
#: In a path, what a backend may decode or normalise into another path.
UNNORMAL = (b"%", b"\\", b"/.", b"//")


def safe_routes(text: str) -> tuple[bytes, ...]:
    """``--retry-safe``'s comma-separated paths, each exact or a prefix ending in ``*``."""
    routes = []
    for route in text.split(","):
        route = route.strip()
        raw = route.encode("ascii", "replace")
        if not route.startswith("/") or not route.isascii() or not route.isprintable() or \
                b"*" in raw[:-1] or any(c in raw for c in UNNORMAL + (b"?", b"#", b" ")):
            raise ValueError(f"{route!r} is not a plain path (/x, or /x* for a prefix)")
        routes.append(raw)
    return tuple(routes)


def declared_safe(routes: tuple[bytes, ...], exchange) -> bool:
    """Whether the operator declared this request harmless to run twice (``--retry-safe``)."""
    if not routes or exchange.method not in SAFE_METHODS or exchange.has_body or \
            exchange.upgrade:
        return False
    path = exchange.target.split(b"?", 1)[0]
    if any(c in path for c in UNNORMAL):
        return False
    return any(path == route or (route[-1:] == b"*" and path.startswith(route[:-1]))
               for route in routes)


def never_read(has_body: bool, got_bytes: bool, reason) -> bool:
    """Whether a connection lost before any answer provably never delivered the request."""
    # A reset (ECONNRESET, EPIPE), not our own abort, which Twisted reports as a kind of it.
    return not has_body and not got_bytes and reason.check(error.ConnectionLost) is not None \
        and reason.check(error.ConnectionAborted) is None


class Tries:
    """Per-try time limits: eject the backend on a try's time-out and ask it; then send a
    declared-safe request elsewhere, or wait, or 504."""

    log = Logger()

    def __init__(self, backends: BackendSet, clock, limits):
        self.backends = backends
        self.clock = clock
        self.limits = limits  # try_timeout, backend_timeout, probe_path, retry_safe
        self._asking: set[str] = set()

    @property
    def probe_timeout(self) -> float:
        return (self.limits.try_timeout or 0.0) / 2

    def first_wait(self) -> float:
        """How long an answer is awaited, from the end of the request, before anything is done."""
        try_timeout, backend_timeout = self.limits.try_timeout, self.limits.backend_timeout
        return backend_timeout if try_timeout is None else min(try_timeout, backend_timeout)

    def resend(self, exchange, backend: Backend) -> bool:
        """The request's try ran out: whether it goes to another backend instead (declared
        safe, not sent again yet, and another backend is known); the silent one is left out
        and asked, as :meth:`more_time` does."""
        if self.limits.try_timeout is None or exchange.resent or \
                exchange.backends is not self.backends or \
                not declared_safe(self.limits.retry_safe, exchange) or \
                all(b in exchange.tried for b in exchange.backends.ring):
            return False
        exchange.resent = True
        self.log.warn("backend {url} did not start answering within {seconds} s: left out "
                      "while asked whether it answers; the request, declared safe, goes to "
                      "another", url=backend.url, seconds=self.limits.try_timeout)
        exchange.backends.failed(backend)
        self.ask(backend)
        return True

    def more_time(self, exchange, backend: Backend, now: float) -> float | None:
        """The request's try ran out at ``now``: its new deadline, or None for a 504."""
        try_timeout, backend_timeout = self.limits.try_timeout, self.limits.backend_timeout
        if try_timeout is None or try_timeout >= backend_timeout:
            return None
        if not exchange.suspected_at:
            exchange.suspected_at = now
            self.log.warn("backend {url} did not start answering within {seconds} s: left "
                          "out while asked whether it answers", url=backend.url,
                          seconds=try_timeout)
            self.backends.failed(backend)
            self.ask(backend)
            return now + self.probe_timeout
        if backend.answered_at >= exchange.suspected_at:
            # Alive: the request is slow, not lost; the ordinary limit applies.
            last = exchange.suspected_at - try_timeout + backend_timeout
            return last if last > now else None
        return None

    def ask(self, backend: Backend) -> None:
        """One probe at a time per backend; its answer marks the backend alive (and healthy)."""
        if backend.url in self._asking:
            return
        self._asking.add(backend.url)
        d = self.probe(backend)
        d.addCallbacks(self._answered, lambda _: None, (backend,))
        d.addErrback(lambda f: self.log.failure("asking {url}", f, url=backend.url))
        d.addBoth(lambda _: self._asking.discard(backend.url))

    def probe(self, backend: Backend):
        return probe.status(self.clock, backend.host, backend.port, self.limits.probe_path,
                            self.probe_timeout, user_agent="dockpart-proxy try timeout")

    def _answered(self, code: int, backend: Backend) -> None:
        backend.heard(self.clock.seconds())
        if code < 500:
            self.backends.healthy(backend)
