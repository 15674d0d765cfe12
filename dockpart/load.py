"""The tier's load signal: what every proxy measured, added up for all its readers.

Each dockpart-proxy process publishes a :class:`~dockpart.records.LoadReport` once a second
(expiring after ``records.REPORT_TTL``, so a proxy that died stops counting within seconds).
The autoscaler, the admin listener and the dashboard read the same reports
(:func:`dockpart.records.read_load_reports`) and add them up with :func:`merge`: one source
of truth for "how loaded is each instance".  This module is the arithmetic: the latency
histogram, the sum over proxies, quantiles.

An app that scales to zero (:mod:`dockpart.proxy_hold`) adds its held requests to the load:
``LoadReport.hold`` (held now, activations and their seconds).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

# The record's format (its TTL, its histogram's bounds) is dockpart.records'.
from dockpart.records import LATENCY_BOUNDS, REPORT_TTL, LoadReport  # noqa: F401


def bucket_of(seconds: float) -> int:
    """The histogram bucket a latency falls in."""
    return bisect.bisect_left(LATENCY_BOUNDS, seconds)


def empty_buckets() -> list[int]:
    return [0] * (len(LATENCY_BOUNDS) + 1)


def merge(reports: Iterable[LoadReport]) -> dict[str, dict]:
    """Per backend URL, the sum over every proxy's report (``healthy``: any proxy says so),
    as a dict with the report's fields and ``proxies``, how many reported it."""
    total: dict[str, dict] = {}
    for report in reports:
        for url, figures in report.backends.items():
            into = total.setdefault(url, {"requests": 0, "errors": 0, "latency_sum": 0.0,
                                          "latency_buckets": empty_buckets(), "inflight": 0,
                                          "healthy": False, "proxies": 0})
            into["proxies"] += 1
            for name in ("requests", "errors", "latency_sum", "inflight"):
                into[name] += getattr(figures, name)
            into["healthy"] = into["healthy"] or figures.healthy
            for i, n in enumerate(figures.latency_buckets):
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
