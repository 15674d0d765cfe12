"""The proxy's load publisher; every proxy's reports are read by :func:`dockpart.load.read_reports`.

Each dockpart-proxy process writes, once a second, what it measured per backend since its
previous report (format: :mod:`dockpart.load`) under a key of its own that expires, and
scores its id by the report's time in ``keys.LOAD_PROXIES``.  Several proxies (or
``--workers`` processes) publish side by side and add up; one that died stops counting when
its report expires.  The autoscaler, the admin listener and the dashboard read these reports.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger

from dockpart import keys, load
from dockpart.periodic import Periodic
from dockpart.proxy_backends import BackendSet
from dockpart.redisconn import RedisService, RedisUnavailable

#: Seconds between reports.
INTERVAL = 1.0

# KEYS: the report's key, the index; ARGV: report, TTL ms, proxy id, time, oldest time kept.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""


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
        self._failing = False
        #: Requests in flight per URL as load (ProxyFactory.fair_inflight); None: every one.
        self.inflight: Callable[[], Mapping[str, int]] | None = None

    def tick(self) -> defer.Deferred | None:
        return self.publish()

    def report(self) -> dict:
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
            figures[url] = {
                "requests": b.requests - requests,
                "errors": b.errors - errors,
                "latency_sum": round(b.latency_sum - latency_sum, 6),
                "latency_buckets": [n - m for n, m in zip(b.latency_buckets, buckets)],
                "inflight": b.active if inflight is None else inflight.get(url, 0),
                "healthy": b.down_until <= now,
            }
        self._seen = seen
        interval = now - self._last_time if self._last_time is not None else self.interval
        self._last_time = now
        report = {"proxy": self.id, "time": now, "interval": round(interval, 3),
                  "list": self.backends.list_key, "backends": figures}
        if self.app is not None:
            report["app"] = self.app
        return report

    def publish(self) -> defer.Deferred | None:
        if not self.backends.known:
            return None  # nothing read yet: an empty report would say "no load"
        report = self.report()
        self.backends.published = report
        ttl_ms = int(load.REPORT_TTL * 1000)
        d = self.redis.eval(_PUBLISH, [keys.proxy_load(self.id), keys.LOAD_PROXIES],
                            [json.dumps(report), ttl_ms, self.id, report["time"],
                             report["time"] - load.REPORT_TTL])
        d.addCallbacks(self._published, self._not_published)
        return d

    def _published(self, _) -> None:
        if self._failing:
            self._failing = False
            self.log.info("load reports are published again")

    def _not_published(self, failure) -> None:
        if not self._failing:
            self._failing = True
            if failure.check(RedisUnavailable):
                self.log.warn("cannot publish load reports: {error}",
                              error=failure.getErrorMessage())
            else:
                self.log.failure("publishing a load report", failure)


