"""dockpart-proxy's routes by Host: each app (``dockpart apps``) to its own instances.

``NAME.<apps domain>`` and each domain of an app go to the app's instances; every other Host
(and a request without one) goes to the seed's list exactly as before.  Each app has a
:class:`~dockpart.proxy_backends.BackendSet` of its own over ``dockpart:app:NAME:servers``:
its own rotation, passive and active health, retries and load reports (their ``list`` names
the app's list, so the autoscaler reads each app's load apart).

:class:`AppsSync` keeps the routes current: one Redis connection subscribed to
``dockpart:apps:changed`` (an app created, changed or destroyed: the records are read again)
and to the pattern of every app's list channel (that app's list is read again), plus a
periodic read that catches a missed notice.  While Redis is away the proxy routes from what
it read last; an app is dropped only when a read that follows a notice (or lists other apps)
says it is gone, not when a Redis that lost its data reads empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from dockpart import apps, keys
from dockpart.periodic import Periodic
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_health import HealthChecks
from dockpart.proxy_hold import Hold, HoldLimits
from dockpart.proxy_load import LoadPublisher, proxy_id
from dockpart.proxy_sync import RedisList, Subscriber, redis_connection
from dockpart.redisconn import RedisService, RedisUnavailable, command


def host_name(host: bytes | None) -> bytes | None:
    """The name in a Host header, lower-cased, without its port (None for an IP literal)."""
    if not host or host.startswith(b"["):
        return None
    return host.rpartition(b":")[0].lower() if b":" in host else host.lower()


class Routes:
    """Which BackendSet a Host goes to: an app's, else the seed's."""

    def __init__(self, seed: BackendSet, apps_domain: str = "localhost"):
        self.seed = seed
        self.apps_domain = apps_domain.lower().strip(".")
        self.apps: dict[str, BackendSet] = {}
        self.hosts: dict[bytes, BackendSet] = {}
        #: What reads each app's list from Redis (a read before a 503), by its BackendSet.
        self.readers: dict[BackendSet, RedisList] = {}

    def backends_for(self, host: bytes | None) -> BackendSet:
        name = host_name(host) if self.hosts else None
        return self.seed if name is None else self.hosts.get(name, self.seed)

    def app_hosts(self, app: apps.App) -> list[bytes]:
        return [f"{app.name}.{self.apps_domain}".encode(), *(d.encode() for d in app.domains)]

    def set_apps(self, found: dict[str, tuple[apps.App, BackendSet]],
                 readers: dict[BackendSet, RedisList] | None = None) -> None:
        """Route exactly ``found`` (name -> its record and set of backends)."""
        self.readers = readers or {}
        self.apps = {name: backends for name, (_, backends) in found.items()}
        self.hosts = {host: backends for app, backends in found.values()
                      for host in self.app_hosts(app)}


class _Reads(Periodic):
    def __init__(self, sync: AppsSync, interval: float, clock):
        super().__init__(interval, clock)
        self.sync = sync

    def tick(self):
        self.sync.reload()
        for reader in list(self.sync.readers.values()):
            reader.refresh()
        for backends in list(self.sync.routes.apps.values()):
            if backends.hold is not None:
                backends.hold.ask_again()


class AppsSync(MultiService):
    """Keeps :class:`Routes` current; per app, its load reports and health checks."""

    log = Logger()

    def __init__(self, routes: Routes, redis: RedisService, reactor, *, interval: float = 1.0,
                 down_time: float = 10.0, health=None, hold: HoldLimits = HoldLimits()):
        super().__init__()
        self.routes = routes
        self.redis = redis
        self.reactor = reactor
        self.down_time = down_time
        self.health = health  # (path, interval, timeout) for active checks, or None
        self.hold = hold  # bounds of the requests held for an app at zero
        self.found: dict[str, tuple[apps.App, BackendSet]] = {}
        self._services: dict[str, MultiService] = {}
        self.readers: dict[str, RedisList] = {}  # each app's list read from Redis
        self._publishers: dict[str, LoadPublisher] = {}
        self._reading: Deferred | None = None
        self._again = False
        self._trusted = True  # an absent app may be dropped (no Redis outage since a notice)
        #: Requests in flight per URL as load (ProxyFactory.fair_inflight), for the reports.
        self.inflight: Callable[[], Mapping[str, int]] | None = None
        redis_connection(self, Subscriber, reactor).setServiceParent(self)
        _Reads(self, interval, reactor).setServiceParent(self)

    def subscriptions(self) -> list[bytes]:
        """The apps' channel (an app created, changed or destroyed), infra's activation
        answers, and every app's list's."""
        return [command(b"SUBSCRIBE", keys.APPS_CHANNEL.encode(), keys.APPS_ACTIVATION.encode()),
                command(b"PSUBSCRIBE", keys.APP_SERVERS_PATTERN.encode())]

    def notice(self, reply: list) -> None:
        if reply[0] == "message" and reply[1] == keys.APPS_ACTIVATION:
            self.activation_notice(reply[2])
        elif reply[0] == "message":
            self.reload(notice=True)
        else:
            self.list_changed(keys.app_of_channel(reply[2]))

    def notices_connected(self) -> None:
        self.reload()

    def notices_lost(self) -> None:
        self._trusted = False

    def activation_notice(self, text: str) -> None:
        """``failed NAME SECONDS`` from infra: the app's held requests get 503 at once."""
        parts = text.split()
        entry = self.found.get(parts[1]) if len(parts) == 3 and parts[0] == "failed" else None
        if entry is not None and entry[1].hold is not None:
            try:
                seconds = float(parts[2])
            except ValueError:
                return
            entry[1].hold.failed(seconds)

    def ask(self, name: str, proxy: str, held: int) -> Deferred:
        """Ask infra for the app's first instance (dockpart.proxy_hold)."""
        return apps.activate(self.redis, name, proxy, held)

    def list_changed(self, name: str | None) -> None:
        reader = self.readers.get(name) if name is not None else None
        if reader is not None:
            reader.trust_empty()
            reader.refresh()

    def reload(self, notice: bool = False) -> None:
        """Read every app's record; notices during a read cause one more read after it."""
        if notice:
            self._trusted = True
        if self._reading is not None:
            self._again = True
            return
        reading = self._reading = apps.read_all(self.redis)
        reading.addCallback(self._read)
        reading.addErrback(lambda f: f.trap(RedisUnavailable))
        reading.addErrback(lambda f: self.log.failure("reading the apps", f))
        reading.addBoth(self._done)

    def _done(self, _):
        self._reading = None
        if self._again:
            self._again = False
            self.reload()

    def _read(self, found: list[apps.App]) -> None:
        names = {app.name for app in found}
        if not found and self.found and not self._trusted:
            return  # empty after Redis was away, with no notice: most likely lost, keep routing
        now = {}
        for app in found:
            entry = self.found.get(app.name)
            backends = entry[1] if entry else self._add(app)
            now[app.name] = (app, backends)
            if backends.hold is not None:
                backends.hold.enabled = app.activates
        for name, (_, backends) in self.found.items():
            if name not in names:
                self._remove(name, backends)
        if {n: a.domains for n, (a, _) in now.items()} != \
                {n: a.domains for n, (a, _) in self.found.items()}:
            self.log.info("apps routed: {apps}", apps=" ".join(sorted(names)) or "(none)")
        self.found = now
        self.routes.set_apps(now, {backends: self.readers[name]
                                   for name, (_, backends) in now.items()})
        for app in found:
            backends = now[app.name][1]
            if not backends.known:
                # The record's own read of the list, as one moment: route from it at once.
                backends.update(list(app.instances))

    def _add(self, app: apps.App) -> BackendSet:
        backends = BackendSet(app.tier.servers, "local", self.reactor, down_time=self.down_time)
        self.readers[app.name] = RedisList(self.redis, backends)
        backends.hold = Hold(app.name, self.reactor, self.ask, self.hold, proxy_id())
        services = MultiService()
        publisher = self._publishers[app.name] = LoadPublisher(
            backends, self.redis, self.reactor, name=f"{proxy_id()}:app:{app.name}",
            app=app.name)
        publisher.inflight = self.inflight
        publisher.setServiceParent(services)
        if self.health is not None:
            path, interval, timeout = self.health
            HealthChecks(backends, path, interval, timeout, self.reactor).setServiceParent(
                services)
        self._services[app.name] = services
        services.setServiceParent(self)
        return backends

    def _remove(self, name: str, backends: BackendSet) -> None:
        """Routes go; requests in flight finish on the connections they have."""
        backends.update([])
        if backends.hold is not None:
            backends.hold.failed(0, "the app was destroyed")
        self.readers.pop(name, None)
        self._publishers.pop(name, None)
        services = self._services.pop(name, None)
        if services is not None:
            self.removeService(services)
        self.log.info("app {name} is no longer routed", name=name)

    def published(self, name: str) -> dict | None:
        """The last load report of app ``name``'s instances (for the admin listener)."""
        publisher = self._publishers.get(name)
        return publisher.published if publisher is not None else None

    def status(self) -> dict:
        return {name: backends.status() for name, (_, backends) in self.found.items()}
