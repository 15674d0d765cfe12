"""dockpart-proxy's admin listener: a JSON status of the backends and Prometheus metrics."""

from __future__ import annotations

import json

from twisted.web import resource, server

from dockpart import load
from dockpart.proxy_dispatch import ProxyFactory
from dockpart.proxy_load import LoadPublisher
from dockpart.proxy_routes import AppsSync


def _redis_connected(proxy: ProxyFactory) -> bool:
    return proxy.lists is not None and bool(proxy.lists.redis.connected)


def status(proxy: ProxyFactory, publisher: LoadPublisher | None = None,
           apps: AppsSync | None = None) -> dict:
    stats = proxy.stats
    model = proxy.backends.status()
    return {
        "list_key": model.pop("list_key"),
        "balance": model.pop("balance"),
        "redis_connected": _redis_connected(proxy),
        **model,
        "requests": stats.requests,
        "responses": {str(code): count for code, count in sorted(stats.responses.items())},
        "retries": stats.retries,
        "tunnels": stats.tunnels,
        "open_client_connections": len(proxy.clients),
        "client_connections": stats.connections,
        # What this proxy last published for the autoscaler and the dashboard (one source).
        "load": publisher.published if publisher is not None else None,
        # Each app routed by Host (dockpart.proxy_routes): its own list, rotation and figures.
        "apps": {name: {**backends.status(),
                        "load": apps.published(name) if apps is not None else None,
                        "hold": backends.hold.status() if backends.hold else None}
                 for name, backends in (proxy.routes.apps if proxy.routes else {}).items()},
    }


def metrics(proxy: ProxyFactory) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    stats = proxy.stats
    now = proxy.clock.seconds()
    lines = []

    def family(name, kind, text, samples):
        lines.append(f"# HELP dockpart_proxy_{name} {text}")
        lines.append(f"# TYPE dockpart_proxy_{name} {kind}")
        for labels, value, *suffix in samples:  # a histogram's samples name their suffix
            sample = f"dockpart_proxy_{name}{suffix[0] if suffix else ''}"
            label = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{sample}{{{label}}} {value}" if label else f"{sample} {value}")

    backends = proxy.backends.ring
    family("requests_total", "counter", "Requests parsed from clients.", [({}, stats.requests)])
    family("responses_total", "counter", "Responses sent to clients, by status code.",
           [({"code": code}, n) for code, n in sorted(stats.responses.items())])
    family("retries_total", "counter", "Attempts sent to another backend after a failure.",
           [({}, stats.retries)])
    family("client_connections", "gauge", "Open client connections.", [({}, len(proxy.clients))])
    family("redis_connected", "gauge", "1 while the Redis connection is up.",
           [({}, int(_redis_connected(proxy)))])
    family("backends", "gauge", "Backends in the list.", [({}, len(backends))])
    family("backend_up", "gauge", "1 unless the backend is left out after failures.",
           [({"backend": b.url}, int(b.down_until <= now)) for b in backends])
    family("backend_requests_total", "counter", "Responses received from the backend.",
           [({"backend": b.url}, b.requests) for b in backends])
    family("backend_errors_total", "counter", "Failed attempts on the backend.",
           [({"backend": b.url}, b.errors) for b in backends])
    family("backend_active", "gauge", "Requests in progress on the backend.",
           [({"backend": b.url}, b.active) for b in backends])
    family("backend_latency_seconds", "histogram", "Time from a request sent to the backend "
           "to its response headers.",
           [sample for b in backends for sample in _histogram(b)])
    holds = [(name, b.hold) for name, b in sorted((proxy.routes.apps if proxy.routes
                                                   else {}).items()) if b.hold is not None]
    family("app_held_requests", "gauge", "Requests held while the app starts from zero.",
           [({"app": name}, hold.held) for name, hold in holds])
    family("app_activations_total", "counter", "Starts from zero that released held requests.",
           [({"app": name}, hold.activations) for name, hold in holds])
    family("app_activation_last_seconds", "gauge", "Seconds from the first held request to "
           "the app's first instance, at the latest activation.",
           [({"app": name}, round(hold.activation_last, 6)) for name, hold in holds
            if hold.activation_last is not None])
    family("app_hold_refused_total", "counter", "Requests for an app at zero answered 503, "
           "by reason (overflow: --hold-max, timeout: --hold-timeout, failed: the start failed).",
           [({"app": name, "reason": why}, n) for name, hold in holds
            for why, n in sorted(hold.refused.items())])
    return "\n".join(lines) + "\n"


def _histogram(backend) -> list:
    """A backend's latency buckets as Prometheus histogram samples: cumulative ``_bucket``
    counts by upper bound ``le`` (the last one ``+Inf``), then ``_sum`` and ``_count``."""
    samples = []
    total = 0
    bounds = [repr(bound) for bound in load.LATENCY_BOUNDS] + ["+Inf"]
    for bound, count in zip(bounds, backend.latency_buckets):
        total += count
        samples.append(({"backend": backend.url, "le": bound}, total, "_bucket"))
    samples.append(({"backend": backend.url}, round(backend.latency_sum, 6), "_sum"))
    samples.append(({"backend": backend.url}, backend.latency_count, "_count"))
    return samples


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class AdminResource(resource.Resource):
    isLeaf = True

    def __init__(self, proxy: ProxyFactory, publisher: LoadPublisher | None = None,
                 apps: AppsSync | None = None):
        super().__init__()
        self.proxy = proxy
        self.publisher = publisher
        self.apps = apps

    def render_GET(self, request):
        path = request.path.rstrip(b"/")
        if path == b"/metrics":
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return metrics(self.proxy).encode()
        if path in (b"", b"/status"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(status(self.proxy, self.publisher, self.apps), indent=2).encode() + b"\n"
        request.setResponseCode(404)
        return b"try / (JSON status) or /metrics\n"


class _QuietSite(server.Site):
    """No access log: a metrics scraper asks every few seconds."""

    noisy = False

    def log(self, request):
        pass


def quiet_site(root: resource.Resource) -> server.Site:
    site = _QuietSite(root)
    site.displayTracebacks = False
    return site


def admin_site(proxy: ProxyFactory, publisher: LoadPublisher | None = None,
               apps: AppsSync | None = None) -> server.Site:
    return quiet_site(AdminResource(proxy, publisher, apps))
