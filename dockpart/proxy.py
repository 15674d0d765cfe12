"""dockpart-proxy: a fast, fault-tolerant reverse proxy over the Redis list ``servers``.

Run it with ``twistd -n dockpart-proxy --listen tcp:3456 --redis redis://127.0.0.1:6379/0``.
It never writes the list it rotates over; when Redis is away it keeps serving from the last
list it read and reconnects by itself.
"""

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dockpart import keys
from dockpart.proxy_backends import BackendSet
from dockpart.proxy_health import HealthChecks
from dockpart.proxy_sync import BackendSync
from dockpart.proxy_http import Limits, ProxyFactory
from dockpart.proxy_load import LoadPublisher
from dockpart.listening import Listener
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
        ["admin", None, None, "Endpoint of the admin listener (JSON status, /metrics); off "
                              "by default, e.g. tcp:3457:interface=127.0.0.1."],
        ["refresh-interval", None, 1.0, "Seconds between reads of the list (safety net).", float],
        ["down-time", None, 10.0, "Seconds a failed backend is left out.", float],
        ["health-path", None, None, "Path for active health checks (off unless given)."],
        ["health-interval", None, 5.0, "Seconds between active health checks.", float],
        ["connect-timeout", None, 3.0, "Seconds to connect to a backend.", float],
        ["backend-timeout", None, 30.0, "Seconds to wait for a backend's response (504).", float],
        ["try-timeout", None, None, "Seconds one backend gets to start answering an idempotent "
                                    "request without a body before it is sent once to another "
                                    "(off unless given).", float],
        ["header-timeout", None, 10.0, "Seconds a client has to send request headers (408).",
         float],
        ["idle-timeout", None, 60.0, "Seconds an idle keep-alive client connection stays, "
                                     "and the longest pause inside a request body (408).", float],
        ["max-header-size", None, 16384, "Largest request head in bytes (431 beyond).", int],
    ]

    def postOptions(self):
        super().postOptions()
        if self["balance"] not in BALANCES:
            raise usage.UsageError(f"--balance must be one of {', '.join(BALANCES)}, "
                                   f"not {self['balance']!r}")
        if not self["servers-key"]:
            raise usage.UsageError("--servers-key must not be empty")
        for name in ("refresh-interval", "down-time", "health-interval", "connect-timeout",
                     "backend-timeout", "header-timeout", "idle-timeout", "max-header-size"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["try-timeout"] is not None and self["try-timeout"] <= 0:
            raise usage.UsageError("--try-timeout must be positive")
        path = self["health-path"]
        if path is not None and not path.startswith("/"):
            raise usage.UsageError(f"--health-path {path!r} must start with /")


def _endpoint(reactor, option: str, description: str):
    try:
        return serverFromString(reactor, description)
    except ValueError as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    redis = RedisService(config["redis"], config["redis-timeout"], reactor)
    redis.setServiceParent(top)
    backends = BackendSet(redis, config["servers-key"], config["balance"], reactor,
                          down_time=config["down-time"])
    BackendSync(backends, reactor, config["refresh-interval"]).setServiceParent(top)
    LoadPublisher(backends, redis, reactor).setServiceParent(top)
    if config["health-path"]:
        # An answer slower than the interval (a second at least) counts as none.
        HealthChecks(backends, config["health-path"], config["health-interval"],
                     min(config["connect-timeout"], max(config["health-interval"], 1.0)),
                     reactor).setServiceParent(top)
    limits = Limits(max_header_size=config["max-header-size"],
                    header_timeout=config["header-timeout"], idle_timeout=config["idle-timeout"],
                    connect_timeout=config["connect-timeout"],
                    backend_timeout=config["backend-timeout"], try_timeout=config["try-timeout"],
                    first_read_wait=config["redis-timeout"])
    proxy = ProxyFactory(backends, reactor, limits)
    shortest = min(limits.header_timeout, limits.idle_timeout, limits.backend_timeout)
    sweep = TimerService(min(0.5, shortest / 4), proxy.sweep)
    sweep.clock = reactor
    sweep.setServiceParent(top)
    Listener("dockpart-proxy", _endpoint(reactor, "listen", config["listen"]),
             proxy).setServiceParent(top)
    if config["admin"]:
        from dockpart.proxy_admin import admin_site
        Listener("dockpart-proxy admin", _endpoint(reactor, "admin", config["admin"]),
                 admin_site(proxy)).setServiceParent(top)
    return top
