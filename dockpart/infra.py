"""dockpart-infra, the daemon: its options and the services it runs.

Run it with ``twistd -n dockpart-infra --driver docker`` (or ``--driver process``, or
``--driver swarm`` on a Docker Swarm manager).  The
work itself (queues, lease, reconcile) is :mod:`dockpart.infra_worker`'s; how instances
run is the chosen driver's (:mod:`dockpart.drivers`).
"""

import os
from pathlib import Path

from twisted.application.service import MultiService
from twisted.python import usage

from dockpart import infra_apps, infra_autoscale
from dockpart.drivers import ThreadPoolService
from dockpart.infra_worker import EntryRules, Worker
from dockpart.redisconn import RedisOptions, RedisService
from dockpart.tier import FIRST_PORT, MAX_PORT
from dockpart.website import site_limits, site_options

DRIVERS = ("docker", "process", "swarm")
#: Where --dashboard-token comes from when the option is not given.
DASHBOARD_TOKEN_ENV = "DOCKPART_DASHBOARD_TOKEN"


def _port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    try:
        low_port, high_port = int(low), int(high if sep else low)
    except ValueError:
        raise usage.UsageError(f"--port-range {value!r}: expected LOW-HIGH, e.g. 3001-3100") \
            from None
    if not 1 <= low_port <= high_port <= MAX_PORT:
        raise usage.UsageError(f"--port-range {value!r}: need 1 <= LOW <= HIGH <= {MAX_PORT}")
    return low_port, high_port


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return os.path.join(base, "dockpart-infra")


class Options(infra_autoscale.AutoscaleOptions, RedisOptions):
    synopsis = "[options]"
    longdesc = ("Spawns and destroys dockpart-web instances as /spawn and /destroy ask. "
                "The Docker endpoint comes from DOCKER_HOST, else the local socket.")
    optFlags = [
        ["dashboard-no-token", None, "Run the dashboard without a token: anyone who reaches its "
                                     "port may spawn and destroy (off: a token is required)."],
        ["rebuild", None, "Docker: per spawn, stop/rm the container, rmi and build its image with "
                          "--build-arg start_port=PORT, then run it (the seed's way; slow)."],
    ]
    optParameters = [
        ["driver", None, "docker", f"How instances run: {' or '.join(DRIVERS)}."],
        ["image", None, "dockpart-web", "Docker: the web app image (built once if missing)."],
        ["dockerfile", None, "Dockerfiles/web.Dockerfile",
         "Docker: the web app's Dockerfile, relative to --build-context."],
        ["build-context", None, ".", "Docker: the folder the image is built from."],
        ["advertise-host", None, "127.0.0.1", "Host name in instance URLs (as dockpart-web's)."],
        ["first-port", None, FIRST_PORT, "The first instance's port: never destroyed.", int],
        ["port-range", None, None,
         f"Ports instances may take: LOW-HIGH (default: after --first-port to {MAX_PORT})."],
        ["interval", None, 0.2, "Seconds between looks at the queues.", float],
        ["reconcile-interval", None, 2.0,
         "Seconds between reconciliations (each probes every instance).", float],
        ["probe-timeout", None, 1.0, "Seconds an instance has to answer reconcile's probe before "
                                     "it leaves servers (until it answers again).", float],
        ["drain", None, 3.0, "Seconds a destroyed instance keeps serving after leaving servers.",
         float],
        ["spawn-timeout", None, 30.0, "Seconds a new instance has to answer HTTP.", float],
        ["stop-timeout", None, 5.0, "Seconds an instance has to stop before it is killed.", float],
        ["max-active", None, 10, "Requests handled at the same time.", int],
        ["lease", None, 5.0, "Seconds the lease on the queues lasts unless renewed (one infra "
                             "per Redis; another waits that long after a crash).", float],
        ["retry-max", None, 5.0, "Longest wait between retries while Docker or Redis is away.",
         float],
        ["max-per-node", None, None, "Swarm: at most this many instances on one node "
                                     "(default: no limit).", int],
        ["instance-interface", None, "127.0.0.1",
         "Swarm: the address instances listen on, on their node (0.0.0.0 on a cluster, so that "
         "proxies on other nodes reach them)."],
        ["state-dir", None, None, "Process driver: instances' logs and identity "
                                  "(default $XDG_STATE_HOME/dockpart-infra)."],
        ["app-ports", None, None, "Ports the instances of apps (dockpart apps) may take, "
                                  "shared by every app and never by two: LOW-HIGH "
                                  "(default 20000-29999)."],
        ["dashboard", None, None, "Endpoint of the live dashboard, e.g. "
                                  "tcp:8080:interface=127.0.0.1 (off by default)."],
        ["dashboard-token", None, None, f"Token the dashboard asks for, buttons included "
                                        f"(env {DASHBOARD_TOKEN_ENV}); required with "
                                        f"--dashboard unless --dashboard-no-token."],
        *site_options("dashboard-"),
    ]

    def __init__(self):
        super().__init__()
        self["build-args"] = {}
        self["constraints"] = []
        self["dashboard-hosts"] = []

    def opt_dashboard_host(self, value: str) -> None:
        """A host name the dashboard answers to besides loopback names and the address it
        listens on (repeatable), e.g. dashboard.example.org; other Host headers get 403."""
        self["dashboard-hosts"].append(value.strip().lower())

    def opt_constraint(self, value: str) -> None:
        """Swarm: a placement constraint (repeatable), e.g. node.labels.dockpart==web"""
        if not any(op in value for op in ("==", "!=")):
            raise usage.UsageError(f"--constraint {value!r}: expected Swarm's syntax, "
                                   f"e.g. node.labels.dockpart==web or node.role!=manager")
        self["constraints"].append(value)

    def opt_build_arg(self, value: str) -> None:
        """Docker: KEY=VALUE passed to the image build (repeatable), e.g. BASE_IMAGE=..."""
        name, sep, arg = value.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--build-arg {value!r}: expected KEY=VALUE")
        self["build-args"][name] = arg

    def postOptions(self) -> None:
        super().postOptions()
        if self["driver"] not in DRIVERS:
            raise usage.UsageError(f"--driver {self['driver']!r}: choose {' or '.join(DRIVERS)}")
        if self["rebuild"] and self["driver"] != "docker":
            raise usage.UsageError("--rebuild only applies to --driver docker")
        first = self["first-port"]
        if not 1 <= first <= MAX_PORT:
            raise usage.UsageError(f"--first-port {first}: need 1 to {MAX_PORT}")
        self["port-range"] = _port_range(self["port-range"] or f"{first + 1}-{MAX_PORT}")
        self["app-ports"] = _port_range(self["app-ports"] or "%d-%d" % infra_apps.APP_PORTS)
        for name in ("interval", "reconcile-interval", "spawn-timeout", "stop-timeout", "retry-max",
                     "lease", "probe-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["drain"] < 0:
            raise usage.UsageError("--drain cannot be negative")
        if self["lease"] <= 2 * self["interval"]:
            raise usage.UsageError("--lease must be longer than two --interval")
        if self["max-active"] < 1:
            raise usage.UsageError("--max-active must be at least 1")
        if self["max-per-node"] is not None and self["max-per-node"] < 1:
            raise usage.UsageError("--max-per-node must be at least 1")
        if self["driver"] != "swarm" and (self["constraints"] or self["max-per-node"]):
            raise usage.UsageError("--constraint and --max-per-node only apply to --driver swarm")
        self["state-dir"] = self["state-dir"] or _default_state_dir()
        self["dashboard-token"] = self["dashboard-token"] or os.environ.get(
            DASHBOARD_TOKEN_ENV) or None
        if self["dashboard"] and not self["dashboard-token"] and not self["dashboard-no-token"]:
            raise usage.UsageError(
                f"--dashboard needs a token: --dashboard-token TOKEN or {DASHBOARD_TOKEN_ENV} "
                f"(scripts/up makes one), or --dashboard-no-token to run it open to every "
                f"local process")
        if self["dashboard-token"] and self["dashboard-no-token"]:
            raise usage.UsageError("--dashboard-no-token and a dashboard token: choose one")
        self["dashboard-site"] = site_limits(self, "dashboard-")


def make_driver(config, pool: ThreadPoolService, reactor):
    """The driver that ``--driver`` names, imported only when chosen."""
    redis_url = config["redis"].url()  # the password too: instances need it
    if config["driver"] == "process":
        from dockpart.drivers.process import ProcessDriver
        return ProcessDriver(pool, config["state-dir"], redis_url, config["advertise-host"],
                             config["first-port"], config["stop-timeout"], reactor)
    from dockpart.drivers.docker import DockerDriver
    context = Path(config["build-context"]).resolve()
    args = (pool, config["image"], str(context), config["dockerfile"], config["build-args"],
            redis_url, str(config["redis"]))
    kw = dict(stop_timeout=config["stop-timeout"],
              # As the process driver does: an instance must know which one is first.
              instance_args=["--first-port", str(config["first-port"]),
                             "--advertise-host", config["advertise-host"]])
    if config["driver"] == "swarm":
        from dockpart.drivers.swarm import SwarmDriver
        return SwarmDriver(*args, constraints=config["constraints"],
                           max_per_node=config["max-per-node"],
                           interface=config["instance-interface"],
                           place_timeout=config["spawn-timeout"], reactor=reactor, **kw)
    return DockerDriver(*args, rebuild=config["rebuild"], **kw)


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    redis = RedisService(config["redis"], config["redis-timeout"], reactor)
    redis.setServiceParent(top)
    pool = ThreadPoolService(f"dockpart-infra-{config['driver']}", reactor=reactor)
    pool.setServiceParent(top)
    low, high = config["port-range"]
    rules = EntryRules(config["advertise-host"], low, high, config["first-port"],
                       any_host=config["driver"] == "swarm")
    def make_worker(driver, rules, **kw) -> Worker:
        return Worker(redis, driver, rules, interval=config["interval"],
                      reconcile_interval=config["reconcile-interval"], drain=config["drain"],
                      spawn_timeout=config["spawn-timeout"], max_active=config["max-active"],
                      retry_max=config["retry-max"], lease=config["lease"],
                      probe_timeout=config["probe-timeout"], reactor=reactor, **kw)

    # An instance that exited is replaced, unless the autoscaler owns the count.
    worker = make_worker(make_driver(config, pool, reactor), rules,
                         keep_count=not config["autoscale"])
    worker.setServiceParent(top)
    app_low, app_high = config["app-ports"]
    app_rules = EntryRules(config["advertise-host"], app_low, app_high, 0,
                           any_host=config["driver"] == "swarm")
    from dockpart.drivers.apps import app_driver
    infra_apps.AppsRunner(
        redis, lambda app: app_driver(app, config, pool, reactor),
        # The app's count is the runner's: an instance that exited is only removed.
        lambda app, driver: make_worker(driver, app_rules, keep_count=False, lists=app.tier),
        host=config["advertise-host"], ports=config["app-ports"],
        autoscale_interval=config["evaluate-interval"], driver_name=config["driver"],
        clock=reactor).setServiceParent(top)
    infra_autoscale.attach(config, redis, worker, top, reactor)
    if config["dashboard"]:
        from dockpart.dashboard import make_dashboard
        make_dashboard(config, redis, worker, reactor).setServiceParent(top)
    return top
