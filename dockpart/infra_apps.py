"""dockpart-infra's apps: every app's instances, kept at the count its record asks for.

One :class:`~dockpart.infra_worker.Worker` per app does for the app's lists
(:func:`keys.app_tier`) what the seed's worker does for ``servers``: queues moved atomically
into processing, a lease, the health gate before an instance joins, the drain before it
stops, reconcile, dead letters.  :class:`AppsRunner` looks at the records every
``interval`` and, per app whose lease it holds, asks for spawns on free ports of the apps'
range (``dockpart:apps:ports``: no two apps share one) or for destroys, until the app has
``desired`` instances; with ``autoscale`` on, the seed's autoscaling :class:`Policy` sets
``desired`` from the proxies' reports on the app's own list, within the app's min and max.
While an app rolls over to a new release (:mod:`dockpart.rollover`) that replaces keeping
its count, and the autoscaler leaves it alone.

A destroyed app is brought to zero, then forgotten.  An app whose record vanished without
being destroyed (a Redis that lost its data) is written back from what this infra knew, and
its worker's reconcile lists its instances again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from dockpart import apps, keys, records, rollover, tier
from dockpart.apps import App
from dockpart.drivers import DriverError, Unavailable
from dockpart.infra_autoscale import Policy, Settings, observe
from dockpart.periodic import Every, Outage
from dockpart.redisconn import RedisService, RedisUnavailable
from dockpart.tier import instance_port

#: Default range of the apps' instance ports (below Linux's ephemeral range).
APP_PORTS = (20000, 29999)

#: Seconds no spawn is asked for after an app's spawn failed, doubling up to the second.
SPAWN_HOLD = (1.0, 60.0)


@dataclass
class AppTier:
    """What infra holds for one app."""
    app: App
    worker: Any  # infra_worker.Worker
    driver: Any  # an app driver (dockpart.drivers.apps)
    policy: Policy | None = None
    asked: set[str] = field(default_factory=set)  # spawns asked for, not yet seen serving
    failures: int = 0  # spawns that never served, in a row
    held_until: float = 0.0
    rolling: rollover.Rolling | None = None
    #: Ports of failed spawns, kept from the next allocations until then (something else
    #: may listen there: the next spawn takes another port).
    quarantine: dict[int, float] = field(default_factory=dict)


class AppsRunner(MultiService):
    """Every app's worker, and the count of each app's instances."""

    log = Logger()

    def __init__(self, redis: RedisService, make_driver, make_worker, *, host: str,
                 ports: tuple[int, int] = APP_PORTS, interval: float = 0.5,
                 autoscale_interval: float = 2.0, driver_name: str = "", clock):
        super().__init__()
        self.redis = redis
        self.make_driver = make_driver  # App -> driver
        self.make_worker = make_worker  # (App, driver) -> Worker
        self.host = host
        self.ports = ports
        self.clock = clock
        self.autoscale_interval = autoscale_interval
        self._next_autoscale = 0.0
        self.tiers: dict[str, AppTier] = {}
        self._hold = backoffPolicy(*SPAWN_HOLD, factor=2.0, jitter=lambda: 0.0)
        self._redis = Outage(self.log, "apps: Redis is away ({error}); instances keep running",
                             "apps: Redis is back")
        Every(interval, clock, lambda: defer.ensureDeferred(self.step()),
              now=True).setServiceParent(self)
        self.rollover = rollover.Rollover(redis, host, ports, clock)
        # Said once in Redis: a push asks it whether to build an image or check out a tree.
        self.driver_name = driver_name
        self._driver_said = not driver_name

    async def step(self) -> None:
        try:
            await self._step()
        except RedisUnavailable as e:
            self._redis.failed(str(e))
            return
        self._redis.ok()

    async def _step(self) -> None:
        if not self._driver_said:
            await self.redis.call("SET", keys.APPS_DRIVER, self.driver_name)
            self._driver_said = True
        live = {app.name: app for app in await apps.read_all(self.redis)}
        gone = {app.name: app for app in await apps.read_all(self.redis, keys.APPS_DESTROYED)}
        for name, known in list(self.tiers.items()):
            if name not in live and name not in gone and known.worker.leased:
                # Not destroyed, yet no record: Redis lost it.  What this infra knew returns.
                self.log.warn("apps: the record of {name} is gone from Redis, not destroyed; "
                              "writing it back", name=name)
                await apps.create(self.redis, known.app)
                live[name] = known.app
        held = await self.redis.call("HGETALL", keys.APP_PORTS) or []
        reports = None
        now = self.clock.seconds()
        if now >= self._next_autoscale and any(a.autoscale for a in live.values()):
            self._next_autoscale = now + self.autoscale_interval
            reports = await records.read_load_reports(self.redis, now)
        for app in [*live.values(), *gone.values()]:
            one = self._tier(app)
            if not one.worker.leased:
                continue
            if getattr(one.driver, "logs", None) is not None:
                try:
                    await one.driver.logs.look(self.redis)
                except (OSError, DriverError, Unavailable) as e:
                    self.log.warn("apps: reading the logs of {name}: {error}", name=app.name,
                                  error=e)
            try:
                empty = await self._converge(one, app, held, reports, app.name in gone)
            except RedisUnavailable:
                raise
            except Exception:
                self.log.failure("apps: keeping {name} at its count", name=app.name)
                continue
            if empty and app.name in gone:
                await apps.forget(self.redis, app.name)
                del self.tiers[app.name]
                await defer.maybeDeferred(self.removeService, one.worker)
                self.log.info("apps: {name} is destroyed: no instance, no record left",
                              name=app.name)

    def _tier(self, app: App) -> AppTier:
        one = self.tiers.get(app.name)
        if one is None:
            driver = self.make_driver(app)
            worker = self.make_worker(app, driver)
            worker.setName(f"app {app.name}")
            one = self.tiers[app.name] = AppTier(app, worker, driver)
            worker.setServiceParent(self)
        one.app = one.driver.app = app  # a new release or command runs from the next spawn
        return one

    async def _converge(self, one: AppTier, app: App, held_flat, reports, destroyed: bool
                        ) -> bool:
        """One step towards the app's count; whether nothing of it is left."""
        t = app.tier
        marks = await rollover.read_marks(self.redis, app.name)  # before the lists
        lists = await tier.snapshot(self.redis, t)
        await rollover.plan(self.redis, app, one.driver, marks, lists)
        running = await one.driver.instances()
        leaving = set(lists[t.destroy_queue]) | set(lists[t.destroying])
        listed = set(lists[t.servers])
        staying = (listed | set(lists[t.spawn_queue]) | set(lists[t.spawning])) - leaving
        self._learn(one, listed, {url for urls in lists.values() for url in urls})
        ours = apps.ports_of(held_flat, app.name)
        for port in set(running) - ours:  # Redis lost its hash: the running keep theirs
            await self.redis.call("HSETNX", keys.APP_PORTS, port, app.name)
        desired = app.desired
        if not (app.release or app.command or app.image):
            desired = 0  # nothing to run yet: it waits for its first push
        if app.autoscale and not destroyed and not app.rollover:
            desired = await self._autoscale(one, app, lists, reports)
        if app.rollover and not destroyed:
            await self.rollover.step(one, app, lists, marks)
        elif len(staying) < desired and self.clock.seconds() >= one.held_until:
            urls = await apps.allocate(self.redis, app.name, *self.ports, self.host,
                                       desired - len(staying), app.release)
            for url in urls:  # a port used before runs the live release now
                one.driver.releases.pop(instance_port(url), None)
            one.asked.update(urls)
            if urls:
                self.log.info("apps: {name} has {n}, wants {desired}: spawning {urls}",
                              name=app.name, n=len(staying), desired=desired,
                              urls=" ".join(urls))
            if len(urls) < desired - len(staying):
                self.log.warn("apps: no free port left in {low}-{high} for {name}",
                              low=self.ports[0], high=self.ports[1], name=app.name)
        elif len(staying) > desired:
            for _ in range(len(staying) - desired):
                url = await tier.request_destroy(self.redis, 0, random.getrandbits(31), t)
                if url is None:
                    break  # the others still spawn: next time
                self.log.info("apps: {name} wants {desired}: destroying {url}",
                              name=app.name, desired=desired, url=url)
        in_lists = {instance_port(url) for urls in lists.values() for url in urls}
        now = self.clock.seconds()
        one.quarantine = {p: until for p, until in one.quarantine.items() if until > now}
        unused = ours - in_lists - set(running) - set(one.quarantine)
        if unused:
            await apps.release_ports(self.redis, app.name, sorted(unused))
        if destroyed and not any(lists.values()) and running:
            # Running but never listed (it stopped answering): nothing to drain.
            for port in running:
                await one.driver.remove(port)
            return False
        return not any(lists.values()) and not running

    def _learn(self, one: AppTier, listed: set[str], everywhere: set[str]) -> None:
        """A spawn asked for that left every list without serving failed: hold the next."""
        for url in list(one.asked):
            if url in listed:
                one.asked.discard(url)
                one.failures = 0
            elif url not in everywhere:
                one.asked.discard(url)
                hold = self._hold(one.failures)
                one.failures += 1
                one.held_until = self.clock.seconds() + hold
                port = instance_port(url)
                if port is not None:
                    one.quarantine[port] = self.clock.seconds() + SPAWN_HOLD[1]
                self.log.warn("apps: the spawn of {url} for {name} failed (see the dead "
                              "letters); next spawn in {hold:g} s", url=url,
                              name=one.app.name, hold=hold)

    async def _autoscale(self, one: AppTier, app: App, lists, reports) -> int:
        """The autoscaler's count for the app, written to its record when it changes."""
        desired = min(max(app.desired, app.min), app.max)
        settings = Settings(min_instances=app.min, max_instances=app.max, target=app.target)
        if one.policy is None or one.policy.settings != settings:
            one.policy = Policy(settings, self.clock)
        if reports is not None:
            seen = observe(lists, reports, app.tier)
            decision = (one.policy.decide(seen, app.min, app.max) if reports
                        else one.policy.unknown("no load figures", seen))
            if decision.action in ("up", "down"):
                desired = decision.desired
                self.log.info("apps: autoscale {name} {action}: {reason}", name=app.name,
                              action=decision.action, reason=decision.reason)
        if desired != app.desired:
            await apps.update(self.redis, app.name, desired=desired)
        return desired
