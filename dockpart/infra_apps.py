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

Scale to zero: an app autoscaled with ``min`` 0 and ``zero_after`` seconds, on which no
proxy reported a request (in flight, held or answered) for that long, gets ``desired`` 0.  A
proxy holding a request for an app at zero sets the app's activation key
(:func:`apps.activate`) and publishes on ``keys.APPS_ACTIVATION``; the runner hears it and
steps at once: ``desired`` becomes what the held load asks for (one at least), written to the
record before any spawn, so an infra restart or a lease change during the activation neither
loses it (the key stays until an instance serves) nor doubles it (spawns are counted against
``desired``).  When the spawn fails, the key goes, ``desired`` goes back to 0 and
``failed NAME SECONDS`` tells the proxies to answer their held requests 503 and to ask again
only after the backoff.

Scale to zero meets a roll-over: while an app rolls over, the idle rule waits (its window
starts again when the roll-over ends), so an app is never drained mid roll-over.  A release
pushed to an app at zero starts one instance of it, health-gated like every roll-over's (a
release that cannot serve is refused at the push), which the idle rule takes back to zero
after ``zero_after`` seconds without a request.  Requests held meanwhile go to the new
release's first instance: an activation during a roll-over raises the count the roll-over
fills.

A destroyed app is brought to zero, then forgotten.  An app whose record vanished without
being destroyed (a Redis that lost its data) is written back from what this infra knew, and
its worker's reconcile lists its instances again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from dockpart import apps, keys, records, releases, rollover, tier
from dockpart.apps import App
from dockpart.drivers import DriverError, Unavailable
from dockpart.infra_autoscale import Policy, Settings, observe
from dockpart.periodic import Every, Outage
from dockpart.proxy_sync import Subscriber, redis_connection
from dockpart.redisconn import RedisService, RedisUnavailable, command
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
    last_busy: float = 0.0  # when a proxy last reported a request for the app
    activating: float | None = None  # when an activation from zero began, until one serves


def _answered(reports: list[records.LoadReport], app: App) -> bool:
    """Whether a proxy answered a request of the app since its previous report."""
    return any(figures.requests for r in reports if r.list == app.tier.servers
               for figures in r.backends.values())


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
        self._stepping: defer.Deferred | None = None
        self._again = False
        Every(interval, clock, self.kick, now=True).setServiceParent(self)
        redis_connection(self, Subscriber, clock).setServiceParent(self)
        self.rollover = rollover.Rollover(redis, host, ports, clock)
        # Said once in Redis: a push asks it whether to build an image or check out a tree.
        self.driver_name = driver_name
        self._driver_said = not driver_name

    def kick(self) -> defer.Deferred:
        """A step now, or one more right after the step under way: never two at once (two
        would both count an app's instances short and spawn twice)."""
        if self._stepping is not None:
            self._again = True
            return self._stepping
        d = self._stepping = defer.ensureDeferred(self.step())

        def done(result):
            self._stepping = None
            if self._again:
                self._again = False
                self.kick()
            return result
        return d.addBoth(done)

    def subscriptions(self) -> list[bytes]:
        """keys.APPS_ACTIVATION: an ``activate NAME`` notice makes the runner step now."""
        return [command(b"SUBSCRIBE", keys.APPS_ACTIVATION.encode())]

    def notice(self, reply: list) -> None:
        if str(reply[2]).startswith("activate "):
            self.kick()

    def notices_connected(self) -> None:
        self.kick()  # an activation asked while this infra was away waits in Redis

    def notices_lost(self) -> None:
        pass  # the periodic step still finds a pending activation

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
        activating = [name for name, app in live.items() if app.activates]
        asked = await apps.asked(self.redis, activating) if activating else {}
        if asked or (now >= self._next_autoscale and any(a.autoscale for a in live.values())):
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
                empty = await self._converge(one, app, held, reports, app.name in gone,
                                             asked.get(app.name))
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
            one = self.tiers[app.name] = AppTier(app, worker, driver,
                                                 last_busy=self.clock.seconds())
            worker.setServiceParent(self)
        one.app = one.driver.app = app  # a new release or command runs from the next spawn
        return one

    async def _converge(self, one: AppTier, app: App, held_flat, reports, destroyed: bool,
                        asked: int | None = None) -> bool:
        """One step towards the app's count; whether nothing of it is left."""
        t = app.tier
        marks = await rollover.read_marks(self.redis, app.name)  # before the lists
        lists = await tier.snapshot(self.redis, t)
        await rollover.plan(self.redis, app, one.driver, marks, lists)
        running = await one.driver.instances()
        leaving = set(lists[t.destroy_queue]) | set(lists[t.destroying])
        listed = set(lists[t.servers])
        staying = (listed | set(lists[t.spawn_queue]) | set(lists[t.spawning])) - leaving
        if self._learn(one, listed, {url for urls in lists.values() for url in urls}) \
                and app.activates and not listed:
            await self._activation_failed(one, app)
            app = replace(app, desired=0)
            asked = None
        ours = apps.ports_of(held_flat, app.name)
        for port in set(running) - ours:  # Redis lost its hash: the running keep theirs
            await self.redis.call("HSETNX", keys.APP_PORTS, port, app.name)
        desired = app.desired
        if app.autoscale and not destroyed:
            if listed and (asked is not None or one.activating is not None):
                await self._activated(one, app)
            elif asked is not None and self.clock.seconds() >= one.held_until:
                app = await self._activate(one, app, asked, reports)
            if app.rollover:  # the roll-over keeps the count; the idle window restarts after
                one.last_busy = self.clock.seconds()
                if app.activates and app.zero_after and not app.desired:
                    app = await self._wake_for_rollover(one, app)
                desired = app.desired
            else:
                desired = await self._autoscale(one, app, lists, reports)
        if not (app.release or app.command or app.image):
            desired = 0  # nothing to run yet: it waits for its first push
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

    def _learn(self, one: AppTier, listed: set[str], everywhere: set[str]) -> bool:
        """A spawn asked for that left every list without serving failed: hold the next.

        Whether one failed."""
        failed = False
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
                failed = True
        return failed

    async def _activate(self, one: AppTier, app: App, held: int, reports) -> App:
        """Proxies hold ``held`` requests for the app at zero: the count that load asks for
        (more as the proxies tell of more, while none serves), in the record first: what a
        restarted infra or the next leaseholder goes on from."""
        if reports:
            held = max(held, sum(r.held for r in reports if r.list == app.tier.servers))
        desired = max(app.desired, min(max(1, math.ceil(held / app.target)), app.max))
        if one.activating is None:
            one.activating = self.clock.seconds()
            self.log.info("apps: activating {name} from zero ({held} held): {desired} "
                          "instance(s)", name=app.name, held=held, desired=desired)
        elif desired != app.desired:
            self.log.info("apps: {name} holds {held} requests: {desired} instance(s)",
                          name=app.name, held=held, desired=desired)
        one.last_busy = self.clock.seconds()
        if desired == app.desired:
            return app
        await apps.update(self.redis, app.name, desired=desired)
        self.clock.callLater(0, one.worker.take_now)  # once this step queued the spawns
        one.app = app = replace(app, desired=desired)
        return app

    async def _wake_for_rollover(self, one: AppTier, app: App) -> App:
        """A release pushed to an app at zero: one instance of it starts, health-gated as in
        any roll-over (a release that cannot serve is refused at the push, not at the next
        request), and the idle rule takes the app back to zero after ``zero_after`` seconds
        without a request."""
        await apps.update(self.redis, app.name, desired=1)
        await releases.tell(self.redis, app.name,
                            f"{app.name} is at zero: one instance of {app.rollover} starts to "
                            f"show it serves; it scales to zero after {app.zero_after:g} s "
                            f"without a request")
        self.log.info("apps: {name} at zero rolls over to {release}: one instance starts",
                      name=app.name, release=app.rollover)
        one.app = app = replace(app, desired=1)
        return app

    async def _activated(self, one: AppTier, app: App) -> None:
        """An instance serves: the activation is done (its key goes)."""
        await self.redis.call("DEL", keys.app_activation(app.name))
        if one.activating is not None:
            self.log.info("apps: {name} activated in {seconds:.3f} s", name=app.name,
                          seconds=self.clock.seconds() - one.activating)
            one.activating = None

    async def _activation_failed(self, one: AppTier, app: App) -> None:
        """The app's first instance did not start: back to zero; the proxies answer 503 and
        the next request asks again after the hold."""
        one.activating = None
        hold = max(0.0, one.held_until - self.clock.seconds())
        await apps.update(self.redis, app.name, desired=0)
        await self.redis.call("DEL", keys.app_activation(app.name))
        await self.redis.call("PUBLISH", keys.APPS_ACTIVATION, f"failed {app.name} {hold:g}")

    async def _autoscale(self, one: AppTier, app: App, lists, reports) -> int:
        """The autoscaler's count for the app, written to its record when it changes."""
        desired = min(max(app.desired, app.min), app.max)
        settings = Settings(min_instances=app.min, max_instances=app.max, target=app.target)
        if one.policy is None or one.policy.settings != settings:
            one.policy = Policy(settings, self.clock)
        if reports is not None:
            seen = observe(lists, reports, app.tier)
            now = self.clock.seconds()
            if seen.inflight or one.activating is not None or _answered(reports, app):
                one.last_busy = now
            # Never to zero on load figures: only the idle rule below takes an app there.
            decision = (one.policy.decide(seen, max(app.min, 1), app.max) if reports
                        else one.policy.unknown("no load figures", seen))
            if decision.action in ("up", "down"):
                desired = decision.desired
                self.log.info("apps: autoscale {name} {action}: {reason}", name=app.name,
                              action=decision.action, reason=decision.reason)
            idle = now - one.last_busy
            if app.activates and app.zero_after and desired and idle >= app.zero_after:
                desired = 0
                self.log.info("apps: {name} had no request for {idle:.1f} s: scaling to zero",
                              name=app.name, idle=idle)
        if desired != app.desired:
            await apps.update(self.redis, app.name, desired=desired)
        return desired
