"""What the dashboard shows: the tier read once a second, and the last 15 minutes of it.

One :class:`TierWatch` per dockpart-infra reads Redis (the lists, the queues, the dead
letters, the lease, the autoscaler's keys, the deploy route, every proxy's load report) and,
while this infra holds the lease, its driver.  Every page and API client is served from the
latest snapshot, so ten open dashboards cost the tier what one does.
"""

from collections import deque

from twisted.internet import defer
from twisted.python.failure import Failure

from dockpart import apps, load, records, releases
from dockpart.drivers import DriverError, Unavailable
from dockpart.periodic import Outage, Periodic
from dockpart.redisconn import RedisService, RedisUnavailable
from dockpart.tier import instance_port, instance_url

#: Seconds between two looks at the tier (the page polls at the same rate).
SAMPLE_INTERVAL = 1.0
#: Seconds of history the charts show.
HISTORY_SECONDS = 15 * 60
#: Newest dead letters and autoscaling decisions shown.
DEAD_LETTERS_SHOWN = 20
DECISIONS_SHOWN = 10

#: The lists an instance URL can be in, as the snapshot names them.
LISTS = records.TIER_LIST_NAMES


def _ms(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    return None if seconds == float("inf") else round(seconds * 1000, 3)


def figures(merged: dict, interval: float) -> dict:
    """A backend's (or the tier's) merged report as rates and latency quantiles."""
    return {"rps": round(merged["requests"] / interval, 2),
            "errors": round(merged["errors"] / interval, 2),
            "p50_ms": _ms(load.quantile(merged["latency_buckets"], 0.5)),
            "p95_ms": _ms(load.quantile(merged["latency_buckets"], 0.95)),
            "inflight": merged["inflight"]}


def tier_totals(merged: dict[str, dict]) -> dict:
    """The sum over every backend, in the format of one backend."""
    each = [records.LoadReport({"tier": records.BackendLoad(
        m["requests"], m["errors"], m["latency_sum"], tuple(m["latency_buckets"]),
        m["inflight"], m["healthy"])}) for m in merged.values()]
    return load.merge(each or [records.LoadReport({"tier": records.BackendLoad()})])["tier"]


def instance_state(url: str, lists: dict[str, list[str]], seen: dict | None,
                   driver_known: bool) -> str:
    """One word for where an instance is in its life, from the lists and the driver."""
    if url in lists["destroying"] or url in lists["destroy_queue"]:
        return "draining"
    if url in lists["spawning"]:
        return "starting"
    if url in lists["spawn_queue"]:
        return "queued"
    if not driver_known:
        return "listed"  # a standby does not ask the driver
    if seen is None:
        return "external"  # in servers, not started by this infra (e.g. the first instance)
    if not seen["running"]:
        return seen["state"]
    return "running" if url in lists["servers"] else "unlisted"


def _health(merged: dict | None) -> str:
    if merged is None:
        return "no figures"
    return "healthy" if merged["healthy"] else "down"


def app_view(app: apps.App, reports: list[records.LoadReport], history=()) -> dict:
    """One app as the dashboard shows it: its scale, its instances and their figures, its
    releases (newest first; ``history``, :func:`releases.read`)."""
    interval = max((r.interval for r in reports), default=1.0)
    merged = load.merge(reports)
    empty = {"rps": None, "errors": None, "p50_ms": None, "p95_ms": None, "inflight": None}
    return {**app.as_json(),
            "instances": [{"url": url, "health": _health(merged.get(url)),
                           **(figures(merged[url], interval) if url in merged else empty)}
                          for url in app.instances],
            "releases": [{"id": r.id, "commit": r.commit[:7], "when": r.at, "note": r.note,
                          "what": r.what, "live": r.id == app.release} for r in history],
            **figures(tier_totals({u: f for u, f in merged.items() if u in app.instances}),
                      interval),
            # Scale to zero (dockpart.proxy_hold): requests held now, latest activations' s.
            "held": sum(r.held for r in reports),
            "activations": sorted(s for r in reports if r.hold is not None
                                  for s in r.hold.activation_recent)}


class TierWatch(Periodic):
    """Looks at the tier every ``interval`` seconds; keeps the snapshot and the history."""

    def __init__(self, redis: RedisService, worker, interval: float = SAMPLE_INTERVAL,
                 history: float = HISTORY_SECONDS, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(interval, reactor, now=True)
        self.redis = redis
        self.worker = worker
        self.driver = worker.driver
        self.host = worker.rules.host
        self.snapshot: dict = {"time": None, "error": "not looked yet", "instances": []}
        self.points: deque = deque(maxlen=max(1, int(history / interval)))
        self.events: deque = deque(maxlen=1000)
        self._last_servers: set[str] | None = None
        self._shown_since = float("-inf")  # when the look behind the snapshot began
        self._failing = Outage(self.log, "could not look at the tier ({error})",
                               "looking at the tier works again")

    def tick(self) -> defer.Deferred:
        return defer.ensureDeferred(self.refresh(record=True))

    async def refresh(self, record: bool = False) -> dict:
        """Look at the tier now; with ``record``, add the look to the history."""
        now = self.clock.seconds()
        try:
            snapshot = await self._look(now)
        except RedisUnavailable as e:
            snapshot = {**self.snapshot, "error": f"Redis is unreachable: {e}"}
        except Exception as e:  # said on the page each time, logged once
            self._failing.failed(repr(e), failure=Failure())
            snapshot = {**self.snapshot, "error": f"could not look at the tier: {e!r}"}
        else:
            self._failing.ok()
            if record:
                self._record(snapshot)
        # A button's look and the periodic one can overlap: an older look that ends last
        # must not put back what the newer one already replaced.
        if now >= self._shown_since:
            self._shown_since = now
            self.snapshot = snapshot
        return snapshot

    async def _look(self, now: float) -> dict:
        view = await records.read_tier_view(self.redis, DEAD_LETTERS_SHOWN, DECISIONS_SHOWN)
        lists, holder = view.lists, view.lease_holder
        every = await records.read_load_reports(self.redis, now)
        reports = [r for r in every if r.app is None]  # the apps' own load is theirs
        found = await apps.read_all(self.redis)
        history = {app.name: await releases.read(self.redis, app.name) for app in found}
        active = holder == self.worker.id
        inventory, driver_error = None, None
        if active:
            try:
                inventory = await self.driver.instances()
            except (Unavailable, DriverError) as e:
                driver_error = str(e)
        interval = max((r.interval for r in reports), default=1.0)
        merged = load.merge(reports)
        # Where each instance answers: the URL its driver placed it at (swarm), else this host.
        by_url = {found.url or instance_url(self.host, port): found.shown()
                  for port, found in (inventory or {}).items()}
        urls = set().union(*lists.values(), merged, by_url)
        instances = []
        for url in sorted(urls, key=lambda u: (instance_port(u) or 0, u)):
            seen = by_url.get(url)
            row = {"url": url,
                   "state": instance_state(url, lists, seen, inventory is not None),
                   "id": seen["id"] if seen else None,
                   "node": seen.get("node") if seen else None,  # a Swarm driver's, if it says
                   "in_servers": url in lists["servers"],
                   "first": url == instance_url(self.host, self.worker.rules.first_port),
                   "health": _health(merged.get(url))}
            row.update(figures(merged[url], interval) if url in merged
                       else {"rps": None, "errors": None, "p50_ms": None, "p95_ms": None,
                             "inflight": None})
            instances.append(row)
        return {
            "time": now,
            "error": None,
            "role": "active" if active else "standby",
            "infra": {"id": self.worker.id, "driver": self.driver.name,
                      "driver_error": driver_error},
            "lease_holder": holder,
            "tier": {"instances": len(lists["servers"]), "proxies": len(reports),
                     **figures(tier_totals(merged), interval)},
            "instances": instances,
            "queues": lists,
            "dead_letters": [letter.shown() for letter in view.dead_letters],
            "autoscale": {"decisions": [d.shown() for d in view.decisions],
                          "desired": view.desired, "limits": view.limits.shown()},
            "deploy": {"live": view.live},
            "apps": [app_view(app, [r for r in every if r.app == app.name], history[app.name])
                     for app in found],
        }

    def _record(self, snapshot: dict) -> None:
        servers = set(snapshot["queues"]["servers"])
        now = snapshot["time"]
        if self._last_servers is not None:
            for url in sorted(servers - self._last_servers):
                self.events.append({"time": now, "kind": "spawn", "url": url})
            for url in sorted(self._last_servers - servers):
                self.events.append({"time": now, "kind": "destroy", "url": url})
        self._last_servers = servers
        self.points.append({"time": now, "rps": snapshot["tier"]["rps"],
                            "p95_ms": snapshot["tier"]["p95_ms"], "instances": len(servers),
                            "per_instance": {row["url"]: row["rps"]
                                             for row in snapshot["instances"]
                                             if row["rps"] is not None}})

    def history(self, since: float = 0.0) -> dict:
        """The recorded looks after ``since`` as columns (what a chart takes), and the marks."""
        points = [p for p in self.points if p["time"] > since]
        urls = sorted({url for p in points for url in p["per_instance"]},
                      key=lambda u: (instance_port(u) or 0, u))
        return {"interval": self.interval,
                "time": [p["time"] for p in points],
                "rps": [p["rps"] for p in points],
                "p95_ms": [p["p95_ms"] for p in points],
                "instances": [p["instances"] for p in points],
                "per_instance": {url: [p["per_instance"].get(url) for p in points]
                                 for url in urls},
                "events": [e for e in self.events if e["time"] > since]}

