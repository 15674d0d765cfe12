"""The tier's load signal: what every proxy measured, in one format for all its readers.

Each dockpart-proxy process publishes a report once a second (``keys.proxy_load``,
expiring after :data:`REPORT_TTL`, so a proxy that died stops counting within seconds).
The autoscaler, the admin listener and the dashboard read the same reports and add
them up with :func:`merge`: one source of truth for "how loaded is each instance".

A report is JSON::

    {"proxy": "host:pid", "time": 1700000000.5, "interval": 1.0, "list": "servers",
     # "app": "NAME" too, in the report on an app's instances (its list's key in "list")
     "backends": {"http://127.0.0.1:3001": {
         "requests": 120,        # responses completed since the previous report
         "errors": 0,            # failed attempts since the previous report
         "latency_sum": 0.84,    # seconds to response head, summed over those requests
         "latency_buckets": [...],  # counts per LATENCY_BOUNDS (+ one for "slower")
         "inflight": 3,          # requests in progress now
         "healthy": true}}}
"""

from __future__ import annotations

import bisect
import json

from dockpart import keys

#: Seconds a report stays in Redis; readers also ignore reports older than this.
REPORT_TTL = 5.0

#: Upper bounds (seconds) of the latency histogram's buckets; a last bucket holds the rest.
LATENCY_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def bucket_of(seconds: float) -> int:
    """The histogram bucket a latency falls in."""
    return bisect.bisect_left(LATENCY_BOUNDS, seconds)


def empty_buckets() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS) + 1)


def decode(raw, now: float) -> dict | None:
    """A report read from Redis, or None if it is malformed or older than REPORT_TTL."""
    try:
        report = json.loads(raw)
        if now - float(report["time"]) > REPORT_TTL or not isinstance(report["backends"], dict):
            return None
    except (TypeError, ValueError, KeyError):
        return None
    return report


def merge(reports: list[dict]) -> dict[str, dict]:
    """Per backend URL, the sum over every proxy's report (``healthy``: any proxy says so)."""
    total: dict[str, dict] = {}
    for report in reports:
        for url, figures in report["backends"].items():
            into = total.setdefault(url, {"requests": 0, "errors": 0, "latency_sum": 0.0,
                                          "latency_buckets": empty_buckets(), "inflight": 0,
                                          "healthy": False, "proxies": 0})
            into["proxies"] += 1
            for name in ("requests", "errors", "latency_sum", "inflight"):
                into[name] += figures.get(name, 0)
            into["healthy"] = into["healthy"] or bool(figures.get("healthy"))
            for i, n in enumerate(figures.get("latency_buckets", ())[:len(into["latency_buckets"])]):
                into["latency_buckets"][i] += n
    return total


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None when nothing was timed)."""
    count = sum(buckets)
    if not count:
        return None
    rank, seen = q * count, 0
    for i, n in enumerate(buckets):
        seen += n
        if seen >= rank and n:
            return LATENCY_BOUNDS[i] if i < len(LATENCY_BOUNDS) else float("inf")
    return float("inf")


async def read_reports(redis, now: float) -> list[dict]:
    """Every proxy's current report (none older than REPORT_TTL), from a RedisService.

    Raises RedisUnavailable when Redis cannot answer: the caller decides what "unknown" means.
    """
    ids = await redis.call("ZRANGEBYSCORE", keys.LOAD_PROXIES, now - REPORT_TTL, "+inf")
    if not ids:
        return []
    raws = await redis.call("MGET", *[keys.proxy_load(i) for i in ids])
    reports = (decode(raw, now) for raw in raws)
    return [report for report in reports if report is not None]
