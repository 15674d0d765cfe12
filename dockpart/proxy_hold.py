"""dockpart-proxy's hold queue: an app at zero instances gets its first requests held, not refused.

An app autoscaled with ``--min 0`` (:attr:`dockpart.apps.App.activates`) may have no instance.
A request for it then waits here, in arrival order, while the proxy asks for an instance
through Redis (:func:`dockpart.apps.activate`: one ``SET NX`` of the app's activation key and a
notice, so infra acts at once and several proxies or ``--workers`` ask once).  When the app's
list gets its first instance (infra lists it only once healthy; the list's change notice tells
the proxy), every held request is sent on, in the order it came.

Bounded, so a burst cannot exhaust the proxy (KEDA's interceptor warns that it can): at most
``hold_max`` requests per app and ``hold_timeout`` seconds each; beyond either, 503 with
``Retry-After``.  A held request whose client leaves is dropped.  When infra says the start
failed, the held requests get 503 at once and no request is held for the backoff infra gave.
Held requests count as load in the proxy's reports (:mod:`dockpart.proxy_load`), so a burst
from zero asks for enough instances, not one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from dockpart.records import HoldFigures
from dockpart.redisconn import RedisUnavailable

#: Default bounds: requests held per app per proxy, seconds each waits at most.
HOLD_MAX = 100
HOLD_TIMEOUT = 30.0

#: Seconds between two asks for the same activation while requests are held (the first ask
#: may have been lost with Redis; the key makes every further ask a no-op).  Between them, an
#: ask each time the held requests doubled: a burst from zero asks for enough instances.
ASK_AGAIN = 1.0

#: Latencies of activations kept for the admin listener, and the latest of them in each
#: load report (the dashboard shows them).
KEPT = 20
REPORTED = 5


@dataclass(frozen=True)
class HoldLimits:
    hold_max: int = HOLD_MAX
    hold_timeout: float = HOLD_TIMEOUT


class Hold:
    """The requests held for one app, and its activations' figures."""

    log = Logger()

    def __init__(self, name: str, clock, ask: Callable[[str, str, int], defer.Deferred],
                 limits: HoldLimits = HoldLimits(), proxy: str = ""):
        self.name = name
        self.clock = clock
        self.ask = ask  # (app name, this proxy, requests held) -> Deferred
        self.limits = limits
        self.proxy = proxy
        self.enabled = False  # the app's record says it activates from zero
        #: exchange -> (its time-out call, where it resumes): in arrival order.
        self.queue: OrderedDict = OrderedDict()
        self.since: float | None = None  # the first request held since the app had none
        self.asked_at = -math.inf
        self.asked_held = 0  # what the last ask said
        self.refuse_until = 0.0  # after a failed start, no request is held until then
        self.activations = 0
        self.activation_last: float | None = None
        self.recent: list[float] = []  # the latest activations' seconds, newest last
        self._new: list[float] = []  # since the previous load report
        self.refused = {"overflow": 0, "timeout": 0, "failed": 0}

    @property
    def held(self) -> int:
        return len(self.queue)

    def hold(self, exchange, resume: Callable) -> bool:
        """Hold ``exchange`` until an instance serves (``resume(exchange)`` then); False when
        it may not be held (the caller answers 503)."""
        now = self.clock.seconds()
        if not self.enabled or now < self.refuse_until:
            return False
        if len(self.queue) >= self.limits.hold_max:
            self.refused["overflow"] += 1
            return False
        exchange.held = self
        exchange.client.deadline = None  # the hold's own time-out applies
        self.queue[exchange] = (self.clock.callLater(self.limits.hold_timeout, self._expire,
                                                     exchange), resume)
        if self.since is None:
            self.since = now
            self.log.info("app {name} has no instance: holding its requests while one starts",
                          name=self.name)
        self.ask_again()
        return True

    def retry_after(self) -> int:
        """Seconds a refused client is told to wait: the backoff after a failed start, or 1."""
        return max(1, math.ceil(self.refuse_until - self.clock.seconds()))

    def ask_again(self) -> None:
        """Ask for an instance while requests are held: at the first, when they doubled
        since the last ask, and once a second."""
        now = self.clock.seconds()
        held = len(self.queue)
        if not held or (now - self.asked_at < ASK_AGAIN and held < 2 * self.asked_held):
            return
        self.asked_at, self.asked_held = now, held
        d = self.ask(self.name, self.proxy, held)
        d.addErrback(lambda f: f.trap(RedisUnavailable))  # asked again in a second
        d.addErrback(lambda f: self.log.failure("asking for an instance of {name}", f,
                                                name=self.name))

    def discard(self, exchange) -> None:
        """The client of a held request left: it leaves the queue."""
        entry = self.queue.pop(exchange, None)
        if entry is not None:
            exchange.held = None
            if entry[0].active():
                entry[0].cancel()

    def _expire(self, exchange) -> None:
        if self.queue.pop(exchange, None) is not None:
            exchange.held = None
            self.refused["timeout"] += 1
            exchange.client.fail_exchange(
                exchange, 503, "the app did not start in time\n",
                extra=b"Retry-After: %d\r\n" % max(1, round(self.limits.hold_timeout / 10)))

    def ready(self) -> None:
        """The app's list has an instance: every held request goes on, first come first."""
        now = self.clock.seconds()
        if self.since is not None:
            seconds = now - self.since
            self.since = None
            self.activations += 1
            self.activation_last = seconds
            self.recent = (self.recent + [seconds])[-KEPT:]
            self._new.append(seconds)
            self.log.info("app {name} activated in {seconds:.3f} s; {n} held requests go on",
                          name=self.name, seconds=seconds, n=len(self.queue))
        self.asked_at, self.asked_held = -math.inf, 0
        queue, self.queue = self.queue, OrderedDict()
        for exchange, (call, resume) in queue.items():
            exchange.held = None
            if call.active():
                call.cancel()
            resume(exchange)

    def failed(self, seconds: float, why: str = "the app failed to start") -> None:
        """Infra says the app failed to start and holds its next try ``seconds`` (or the app
        is gone): every held request gets 503 saying ``why``."""
        self.since = None
        self.asked_at, self.asked_held = -math.inf, 0
        self.refuse_until = self.clock.seconds() + seconds
        queue, self.queue = self.queue, OrderedDict()
        if queue:
            self.log.warn("app {name}: {why}: {n} held requests get 503; the next request "
                          "asks again in {seconds:g} s", name=self.name, why=why, n=len(queue),
                          seconds=seconds)
        for exchange, (call, _) in queue.items():
            exchange.held = None
            if call.active():
                call.cancel()
            self.refused["failed"] += 1
            exchange.client.fail_exchange(exchange, 503, why + "\n",
                                          extra=b"Retry-After: %d\r\n" % max(1, math.ceil(seconds)))

    def report(self) -> HoldFigures:
        """What the load report carries (and the new activations become old)."""
        new, self._new = self._new, []
        return HoldFigures(len(self.queue), self.activations, tuple(round(s, 4) for s in new),
                           tuple(round(s, 4) for s in self.recent[-REPORTED:]),
                           None if self.activation_last is None
                           else round(self.activation_last, 4))

    def status(self) -> dict:
        return {"held": len(self.queue), "activates": self.enabled,
                "activations": self.activations, "activation_recent": [round(s, 4) for s in
                                                                       self.recent],
                "refused": dict(self.refused)}
