"""dockpart-proxy: a fast, fault-tolerant reverse proxy over the Redis list ``servers``.

Run it with ``twistd -n dockpart-proxy --listen tcp:3456 --redis redis://127.0.0.1:6379/0``.
It never writes the list it rotates over; when Redis is away it keeps serving from the last
list it read and reconnects by itself.  ``--workers N`` runs N such processes on one port
(:mod:`dockpart.proxy_workers`); on SIGTERM each stops accepting and finishes its requests in
flight first (``--shutdown-timeout``), so a new proxy started on the same port beforehand
takes over with no refused connection.
"""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from dockpart import apps, keys
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_health import HealthChecks
from dockpart.proxy_hold import HOLD_MAX, HOLD_TIMEOUT, HoldLimits
from dockpart.proxy_sync import BackendSync
from dockpart.proxy_dispatch import Limits, ProxyFactory
from dockpart.proxy_load import LoadPublisher
from dockpart.proxy_retry import safe_routes
from dockpart.proxy_routes import AppsSync, Routes
from dockpart.listening import DEFAULT_BACKLOG, Listener, shared_port_endpoint, tcp_address
from dockpart.proxy_workers import (ReadySignal, Workers, WorkersAdmin, die_with_parent,
                                    usable_cpus)
from dockpart.redisconn import RedisOptions, RedisService

BALANCES = ("local", "shared")


class Options(RedisOptions):
    synopsis = "[options]"
    longdesc = ("Forwards every HTTP request to one of the backend URLs in a Redis list, "
                "in rotation. --balance local (default) rotates in memory and follows changes "
                "by pub/sub; --balance shared does one LMOVE per request, as the seed did.")
    optParameters = [
        ["listen", "l", "tcp:3456", "Endpoint to listen on."],
        ["servers-key", None, keys.SERVERS, "Redis list of backend URLs to rotate over."],
        ["balance", "b", "local", "local (in-memory rotation) or shared (LMOVE per request)."],
        ["apps-domain", None, "localhost", "Host NAME.<this> goes to app NAME's instances "
                                           "(dockpart apps); other hosts to --servers-key."],
        ["admin", None, None, "Endpoint of the admin listener (JSON status, /metrics); off "
                              "by default, e.g. tcp:3457:interface=127.0.0.1."],
        ["hold-max", None, HOLD_MAX, "Requests held per app at zero instances while one "
                                     "starts (503 with Retry-After beyond).", int],
        ["hold-timeout", None, HOLD_TIMEOUT, "Seconds a request waits at most for an app at "
                                             "zero to start (503 with Retry-After beyond).",
         float],
        ["refresh-interval", None, 1.0, "Seconds between reads of the list (safety net).", float],
        ["down-time", None, 10.0, "Seconds a failed backend is left out.", float],
        ["health-path", None, None, "Path for active health checks (off unless given)."],
        ["health-interval", None, 5.0, "Seconds between active health checks.", float],
        ["connect-timeout", None, 3.0, "Seconds to connect to a backend.", float],
        ["backend-timeout", None, 30.0, "Seconds to wait for a backend's response (504).", float],
        ["try-timeout", None, None, "Seconds a backend gets to start answering before it is "
                                    "left out and asked whether it answers at all; silent "
                                    "half that long again, the request gets 504 (not sent "
                                    "twice but for --retry-safe; off unless given).", float],
        ["header-timeout", None, 10.0, "Seconds a client has to send request headers (408).",
         float],
        ["idle-timeout", None, 60.0, "Seconds an idle keep-alive client connection stays, "
                                     "and the longest pause inside a request body (408).", float],
        ["max-header-size", None, 16384, "Largest request head in bytes (431 beyond).", int],
        ["max-inflight-per-client", None, 256, "Requests one client address may have in "
                                               "flight (429 beyond; 0: no limit).", int],
        ["body-timeout", None, 20.0, "Seconds a request body may take, plus one per "
                                     "--body-min-rate bytes received (408 beyond; 0: no "
                                     "limit).", float],
        ["body-min-rate", None, 500.0, "Bytes per second of body that earn one more second "
                                       "of --body-timeout.", float],
        ["load-per-client", None, 8, "Requests of one client address counted as load for the "
                                     "autoscaler, at most (0: all; raise it to load-test "
                                     "from one host).", int],
        ["workers", "w", "1", "Processes serving the port (SO_REUSEPORT), each with its own "
                              "reactor and backend pools; auto = one per CPU."],
        ["shutdown-timeout", None, 10.0, "Seconds a stopping proxy lets requests in flight "
                                         "finish before it cuts them.", float],
        ["backlog", None, DEFAULT_BACKLOG, "Length of the listen queue (takes the place of the "
                                   "endpoint's backlog=).", int],
        ["worker-of", None, None, "(internal) The pid of the --workers parent.", int],
        ["ready-fd", None, None, "(internal) A pipe to tell the --workers parent, once "
                                 "listening, that this worker is ready.", int],
    ]

    def __init__(self):
        super().__init__()
        self["retry-safe"] = ()

    def opt_retry_safe(self, paths: str) -> None:
        """Paths (comma-separated; repeatable) whose bodiless GET or HEAD may be sent to
        another backend after --try-timeout: ones harmless to run twice. Exact, or a prefix
        ending in *; the seed's list only (apps: never). None by default (a timed-out
        request gets 504, never sent twice)."""
        try:
            self["retry-safe"] += safe_routes(paths)
        except ValueError as e:
            raise usage.UsageError(f"--retry-safe: {e}")

    def parseOptions(self, options=None):
        # What the parent of --workers passes on to each worker, exactly as given.
        self.args = list(options) if options is not None else []
        super().parseOptions(options)

    def postOptions(self):
        super().postOptions()
        if self["balance"] not in BALANCES:
            raise usage.UsageError(f"--balance must be one of {', '.join(BALANCES)}, "
                                   f"not {self['balance']!r}")
        try:
            self["apps-domain"] = apps.check_domain(self["apps-domain"])
        except apps.BadApp as e:
            raise usage.UsageError(f"--apps-domain: {e}") from None
        if not self["servers-key"]:
            raise usage.UsageError("--servers-key must not be empty")
        workers = self["workers"]
        if workers == "auto":
            workers = str(usable_cpus())
        if not workers.isdigit() or int(workers) < 1:
            raise usage.UsageError(f"--workers must be a positive number or auto, not {workers!r}")
        self["workers"] = int(workers)
        if self["workers"] > 1 and tcp_address(self["listen"])[1] == 0:
            raise usage.UsageError("--workers above 1 needs a fixed --listen port, not 0 "
                                   "(each worker would get a port of its own)")
        for name in ("refresh-interval", "down-time", "health-interval", "connect-timeout",
                     "backend-timeout", "header-timeout", "idle-timeout", "max-header-size",
                     "shutdown-timeout", "backlog", "hold-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["hold-max"] < 0:
            raise usage.UsageError("--hold-max cannot be negative (0: no request is held)")
        for name in ("max-inflight-per-client", "body-timeout", "body-min-rate",
                     "load-per-client"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 or more")
        if self["try-timeout"] is not None and self["try-timeout"] <= 0:
            raise usage.UsageError("--try-timeout must be positive")
        if self["retry-safe"] and self["try-timeout"] is None:
            raise usage.UsageError("--retry-safe needs --try-timeout (only a try that timed "
                                   "out is sent again)")
        path = self["health-path"]
        if path is not None and not path.startswith("/"):
            raise usage.UsageError(f"--health-path {path!r} must start with /")


class ProxyService(MultiService):
    """Stops gracefully: no new connection, requests in flight finish (bounded), then the rest."""

    log = Logger()

    def __init__(self, shutdown_timeout: float):
        super().__init__()
        self.shutdown_timeout = shutdown_timeout
        self.proxy: ProxyFactory | None = None  # set once built, with its listener
        self.listener: Listener | None = None

    @defer.inlineCallbacks
    def stopService(self):
        if self.listener is not None:
            yield self.listener.stopService()
        assert self.proxy is not None  # built before the service starts
        busy = len(self.proxy.clients)
        if busy:
            self.log.info("stopping: {busy} client connections open; waiting up to {timeout} s "
                          "for their requests in flight", busy=busy, timeout=self.shutdown_timeout)
        cut = yield self.proxy.drain(self.shutdown_timeout)
        if cut:
            self.log.warn("stopping: cut {cut} connections still busy after {timeout} s",
                          cut=cut, timeout=self.shutdown_timeout)
        yield super().stopService()


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    if config["workers"] > 1:
        return _parent_service(config, reactor)
    if config["worker-of"]:
        die_with_parent(config["worker-of"])
    top = ProxyService(config["shutdown-timeout"])
    redis = RedisService(config["redis"], config["redis-timeout"], reactor)
    redis.setServiceParent(top)
    try_timeout = config["try-timeout"]
    backends = BackendSet(config["servers-key"], config["balance"], reactor,
                          down_time=config["down-time"],
                          quiet_after=try_timeout / 10 if try_timeout else None)
    sync = BackendSync(backends, redis, reactor, config["refresh-interval"])
    sync.setServiceParent(top)
    publisher = LoadPublisher(backends, redis, reactor)
    publisher.setServiceParent(top)
    health = None
    if config["health-path"]:
        # An answer slower than the interval (a second at least) counts as none.
        health = (config["health-path"], config["health-interval"],
                  min(config["connect-timeout"], max(config["health-interval"], 1.0)))
        HealthChecks(backends, *health, reactor).setServiceParent(top)
    routes = Routes(backends, config["apps-domain"])
    apps_sync = AppsSync(routes, redis, reactor, interval=config["refresh-interval"],
                         down_time=config["down-time"], health=health,
                         hold=HoldLimits(config["hold-max"], config["hold-timeout"]))
    apps_sync.setServiceParent(top)
    limits = Limits(max_header_size=config["max-header-size"],
                    header_timeout=config["header-timeout"], idle_timeout=config["idle-timeout"],
                    connect_timeout=config["connect-timeout"],
                    backend_timeout=config["backend-timeout"], try_timeout=config["try-timeout"],
                    probe_path=config["health-path"] or "/", retry_safe=config["retry-safe"],
                    max_inflight_per_client=config["max-inflight-per-client"],
                    body_timeout=config["body-timeout"], body_min_rate=config["body-min-rate"],
                    load_per_client=config["load-per-client"],
                    first_read_wait=config["redis-timeout"])
    proxy = top.proxy = ProxyFactory(backends, reactor, limits, sync.lists)
    proxy.routes = routes
    publisher.inflight = apps_sync.inflight = proxy.fair_inflight
    shortest = min(limits.header_timeout, limits.idle_timeout, limits.backend_timeout,
                   limits.try_timeout or limits.backend_timeout)
    sweep = TimerService(min(0.5, shortest / 4), proxy.sweep)
    sweep.clock = reactor
    sweep.setServiceParent(top)
    top.listener = Listener("dockpart-proxy", shared_port_endpoint(
        reactor, "listen", config["listen"], config["backlog"]), proxy)
    top.listener.setServiceParent(top)
    if config["admin"]:
        from dockpart.proxy_admin import admin_site
        Listener("dockpart-proxy admin", shared_port_endpoint(reactor, "admin", config["admin"]),
                 admin_site(proxy, publisher, apps_sync)).setServiceParent(top)
    if config["ready-fd"] is not None:
        ReadySignal(config["ready-fd"]).setServiceParent(top)  # last: after the listeners
    return top


def _parent_service(config, reactor) -> MultiService:
    """--workers N: N worker processes serve; this one runs them and sums their figures."""
    top = MultiService()
    workers = Workers(config.args, config["workers"], config["listen"],
                      config["shutdown-timeout"], bool(config["admin"]), reactor)
    workers.setServiceParent(top)
    if config["admin"]:
        from dockpart.proxy_admin import quiet_site
        Listener("dockpart-proxy admin", shared_port_endpoint(reactor, "admin", config["admin"]),
                 quiet_site(WorkersAdmin(workers))).setServiceParent(top)
    return top
