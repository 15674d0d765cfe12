"""The proxy's load publisher; every proxy's reports are read by
:func:`dockpart.records.read_load_reports`.

Each dockpart-proxy process writes, once a second, what it measured per backend since its
previous report (a :class:`~dockpart.records.LoadReport`) under a key of its own that
expires, and scores its id by the report's time in ``keys.LOAD_PROXIES``.  Several proxies (or
``--workers`` processes) publish side by side and add up; one that died stops counting when
its report expires.  The autoscaler, the admin listener and the dashboard read these reports.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger

from dockpart import load
from dockpart.periodic import Outage, Periodic
from dockpart.proxy_backends import BackendSet
from dockpart.records import BackendLoad, LoadReport, publish_load_report
from dockpart.redisconn import RedisService, RedisUnavailable

#: Seconds between reports.
INTERVAL = 1.0


def proxy_id() -> str:
    """This process's name in the reports: several processes may share a host."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LoadPublisher(Periodic):
    """Writes this proxy's report every :data:`INTERVAL` seconds; never stops on an error."""

    log = Logger()

    def __init__(self, backends: BackendSet, redis: RedisService, clock,
                 interval: float = INTERVAL, name: str | None = None, app: str | None = None):
        super().__init__(interval, clock)
        self.app = app  # the app whose instances these are (dockpart.proxy_routes), if any
        self.backends = backends
        self.redis = redis
        self.id = name or proxy_id()
        self._seen: dict[str, tuple] = {}  # per URL, the counters at the previous report
        self._last_time: float | None = None
        self._outage = Outage(self.log, "cannot publish load reports: {error}",
                              "load reports are published again")
        self.published: dict | None = None  # the last report, for the admin listener
        #: Requests in flight per URL as load (ProxyFactory.fair_inflight); None: every one.
        self.inflight: Callable[[], Mapping[str, int]] | None = None

    def tick(self) -> defer.Deferred | None:
        return self.publish()

    def report(self) -> LoadReport:
        """The figures since the previous report (and makes them the new starting point)."""
        now = self.clock.seconds()
        figures = {}
        seen = {}
        inflight = self.inflight() if self.inflight is not None else None
        for url, b in list(self.backends.by_url.items()):
            counters = (b.requests, b.errors, b.latency_sum, list(b.latency_buckets))
            seen[url] = counters
            requests, errors, latency_sum, buckets = self._seen.get(
                url, (0, 0, 0.0, load.empty_buckets()))
            figures[url] = BackendLoad(
                requests=b.requests - requests,
                errors=b.errors - errors,
                latency_sum=round(b.latency_sum - latency_sum, 6),
                latency_buckets=tuple(n - m for n, m in zip(b.latency_buckets, buckets)),
                inflight=b.active if inflight is None else inflight.get(url, 0),
                healthy=b.down_until <= now)
        self._seen = seen
        interval = now - self._last_time if self._last_time is not None else self.interval
        self._last_time = now
        hold = self.backends.hold  # requests held for an app at zero are load too
        return LoadReport(figures, self.id, now, round(interval, 3), self.backends.list_key,
                          self.app, hold.report() if hold is not None else None)

    def publish(self) -> defer.Deferred | None:
        if not self.backends.known:
            return None  # nothing read yet: an empty report would say "no load"
        report = self.report()
        self.published = report.shown()
        d = publish_load_report(self.redis, report)
        d.addCallbacks(self._published, self._not_published)
        return d

    def _published(self, _) -> None:
        self._outage.ok()

    def _not_published(self, failure) -> None:
        if failure.check(RedisUnavailable):
            self._outage.failed(failure.getErrorMessage())
        else:
            self._outage.failed(failure.getErrorMessage(), failure=failure)
