"""dockpart-infra's live dashboard (``--dashboard ENDPOINT``): the tier at a glance.

One page (tables drawn on the server, charts by the bundled uPlot), a JSON API, and three
buttons that queue work exactly as ``/spawn`` and ``/destroy`` do.  What it shows comes from
:class:`dockpart.dashboard_state.TierWatch`; how it looks, from :mod:`dockpart.dashboard_page`.

Safety: with ``--dashboard-token`` every request needs the token (a cookie set by the login
form, ``?token=``, or ``Authorization: Bearer``).  A POST must come from the page itself: a
cross-site ``Origin`` or ``Sec-Fetch-Site`` is refused, and the page's CSRF token (form field
``csrf`` or header ``X-CSRF-Token``) is required unless the request carries the token in an
``Authorization`` header, which no other site can make a browser send.  A standby infra (no
lease) serves the page read-only.
"""

import hashlib
import hmac
import json
import secrets
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from twisted.application.service import MultiService

from dockpart import apps, dashboard_page, keys, tier
from dockpart.dashboard_state import TierWatch
from dockpart.listening import server_endpoint
from dockpart.redisconn import RedisUnavailable
from dockpart.routes import CoroutineResource, Reply
from dockpart.website import BoundedSite, site_listener

COOKIE = "dockpart_dashboard"
#: Ceiling on instances for "spawn one" when the autoscaler's max is unset (dockpart-web's
#: ``--max-instances`` default).
DEFAULT_MAX_INSTANCES = 10
#: Largest POST body read.
MAX_BODY = 16 * 1024
STATIC = Path(__file__).with_name("dashboard_static")
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".png": "image/png"}


class Refused(Exception):
    """A request answered with a 4xx (or 503) and a message; nothing was changed."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


def json_answer(code: int, value) -> Reply:
    return Reply(code, (json.dumps(value) + "\n").encode(), "application/json")


def html_answer(code: int, text: str, headers: dict | None = None) -> Reply:
    return Reply(code, text.encode("utf-8"), "text/html; charset=utf-8", headers or {})


def _wants_json(request) -> bool:
    accept = request.getHeader("accept") or ""
    kind = request.getHeader("content-type") or ""
    return "application/json" in accept or kind.startswith("application/json")


class Dashboard(CoroutineResource):
    """Every route of the dashboard; handlers return an :class:`Reply` or raise Refused."""

    default_headers = {"cache-control": "no-store",
                       "x-frame-options": "DENY",  # no clickjacking of the buttons
                       "x-content-type-options": "nosniff"}

    def __init__(self, watch: TierWatch, token: str | None = None):
        super().__init__()
        self.watch = watch
        self.redis = watch.redis
        self.rules = watch.worker.rules
        self.token = token
        self.csrf = secrets.token_urlsafe(24)
        self.session = (hmac.new(token.encode(), b"dockpart dashboard session",
                                 hashlib.sha256).hexdigest() if token else None)
        self.static = {p.name: (p.read_bytes(), STATIC_TYPES[p.suffix])  # read once, here
                       for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}
        self.routes = {
            ("GET", ""): self.index,
            ("GET", "live"): self.live,
            ("GET", "api/state"): self.state,
            ("GET", "api/history"): self.history,
            ("POST", "api/spawn"): self.spawn,
            ("POST", "api/destroy"): self.destroy,
            ("POST", "api/limits"): self.limits,
            ("POST", "api/apps/scale"): self.scale_app,
        }

    def internal_error(self) -> Reply:
        return json_answer(500, {"error": "internal error; see dockpart-infra's log"})

    async def dispatch(self, request) -> Reply:
        method = request.method.decode("ascii", "replace")
        method = "GET" if method == "HEAD" else method
        path = "/".join(s.decode("utf-8", "replace") for s in request.postpath).strip("/")
        try:
            if path == "login":
                return await self.login(request, method)
            if not self._authorized(request):
                raise Refused(401, "this dashboard needs its token (--dashboard-token): "
                                   "log in, or send Authorization: Bearer TOKEN")
            if method == "GET" and path.startswith("static/"):
                return self.static_file(path.removeprefix("static/"))
            handler = self.routes.get((method, path))
            if handler is None:
                allowed = [m for m, p in self.routes if p == path]
                if allowed:
                    raise Refused(405, f"/{path} takes {' or '.join(allowed)}")
                raise Refused(404, f"no page at /{path}")
            if method == "POST":
                self._check_same_origin(request)
            answer = await handler(request)
        except Refused as e:
            return self._refusal(request, e)
        except RedisUnavailable as e:
            return self._refusal(request, Refused(503, f"Redis is unreachable: {e}"))
        if self.token and request.args.get(b"token"):
            answer.headers["set-cookie"] = self._cookie()
        return answer

    def _refusal(self, request, e: Refused) -> Reply:
        """JSON for programs; a page for a browser (the login form when the token is missing)."""
        if _wants_json(request) or "text/html" not in (request.getHeader("accept") or ""):
            return json_answer(e.code, {"error": str(e)})
        if e.code == 401:
            return html_answer(401, dashboard_page.login_html())
        return html_answer(e.code, dashboard_page.message_html(f"Refused ({e.code})", str(e)))

    # -- access

    def _given_token(self, request) -> str | None:
        auth = request.getHeader("authorization") or ""
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        query = request.args.get(b"token") if request.method in (b"GET", b"HEAD") else None
        return query[0].decode("utf-8", "replace") if query else None

    def _authorized(self, request) -> bool:
        if self.token is None:
            return True
        given = self._given_token(request)
        if given is not None:
            return hmac.compare_digest(given.encode(), self.token.encode())
        cookie = request.getCookie(COOKIE.encode())
        return cookie is not None and hmac.compare_digest(
            cookie, self.session.encode())  # type: ignore[union-attr]  # set with the token

    def _cookie(self) -> str:
        return f"{COOKIE}={self.session}; Path=/; HttpOnly; SameSite=Strict"

    def _refuse_cross_site(self, request) -> None:
        """A POST whose browser says it comes from another site (or origin) is refused."""
        if (request.getHeader("sec-fetch-site") or "same-origin") not in ("same-origin", "none"):
            raise Refused(403, "cross-site request refused")
        origin = request.getHeader("origin")
        host = request.getHeader("host")
        if origin is not None and (origin == "null" or urlsplit(origin).netloc != host):
            raise Refused(403, f"cross-site request refused (Origin {origin}, Host {host})")

    def _check_same_origin(self, request) -> None:
        """Cross-site POSTs are refused; the CSRF token proves the page sent the form."""
        self._refuse_cross_site(request)
        bearer = (request.getHeader("authorization") or "").lower().startswith("bearer ")
        if self.token and bearer:
            return  # a browser never adds our token to another site's request
        given = request.getHeader("x-csrf-token") or _first(request.args, "csrf")
        if not given or not hmac.compare_digest(given.encode(), self.csrf.encode()):
            raise Refused(403, "missing or wrong CSRF token: post from the dashboard page, or "
                               "send the 'csrf' of GET /api/state as X-CSRF-Token")

    async def login(self, request, method: str) -> Reply:
        if self.token is None:
            return html_answer(303, "", {"location": "./"})
        if method == "GET":
            return html_answer(200, dashboard_page.login_html())
        if method != "POST":
            raise Refused(405, "/login takes GET or POST")
        self._refuse_cross_site(request)
        given = _first(request.args, "token") or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return html_answer(401, dashboard_page.login_html("That is not the token."))
        return html_answer(303, "", {"location": "./", "set-cookie": self._cookie()})

    # -- pages

    async def index(self, request) -> Reply:
        return html_answer(200, dashboard_page.page_html(self.watch.snapshot, self.csrf))

    async def live(self, request) -> Reply:
        return html_answer(200, dashboard_page.live_html(self.watch.snapshot, self.csrf))

    async def state(self, request) -> Reply:
        return json_answer(200, {**self.watch.snapshot, "csrf": self.csrf})

    async def history(self, request) -> Reply:
        raw = _first(request.args, "since") or "0"
        try:
            since = float(raw)
        except ValueError:
            raise Refused(400, f"since={raw!r}: expected seconds since the epoch") from None
        return json_answer(200, self.watch.history(since))

    def static_file(self, name: str) -> Reply:
        if name not in self.static:
            raise Refused(404, f"no static file {name!r}")
        body, content_type = self.static[name]
        return Reply(200, body, content_type, {"cache-control": "max-age=3600"})

    # -- buttons

    def _writable(self) -> None:
        if self.watch.snapshot.get("role") != "active":
            holder = self.watch.snapshot.get("lease_holder")
            raise Refused(409, f"this is the standby infra (read-only); use the dashboard of "
                               f"the lease holder {holder}")

    async def _done(self, request, code: int, value: dict) -> Reply:
        await self.watch.refresh()
        if _wants_json(request):
            return json_answer(code, value)
        return html_answer(303, "", {"location": "../"})

    async def spawn(self, request) -> Reply:
        self._body(request)
        self._writable()
        limits = await self.redis.call("HGET", keys.AUTOSCALE_LIMITS, "max")
        ceiling = int(limits) if limits and str(limits).isdigit() else DEFAULT_MAX_INSTANCES
        try:
            url = await tier.request_spawn(self.redis, self.rules.host, self.rules.first_port,
                                           ceiling, self.rules.high)
        except (tier.InstancesFull, tier.NoPortLeft) as e:
            raise Refused(429, f"not spawning: {e}") from None
        self.log.info("dashboard: spawn requested for {url}", url=url)
        return await self._done(request, 202, {"queued": "spawn", "url": url})

    async def destroy(self, request) -> Reply:
        body = self._body(request)
        self._writable()
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise Refused(400, "say which instance to destroy: url=http://HOST:PORT")
        try:
            tier.parse_instance_url(url)
            await tier.request_destroy_url(self.redis, url, self.rules.first_port)
        except tier.BadInstanceURL as e:
            raise Refused(400, str(e)) from None
        except tier.CannotDestroy as e:
            raise Refused(404 if e.kind == "unknown" else 409, f"not destroying: {e}") from None
        self.log.info("dashboard: destroy requested for {url}", url=url)
        return await self._done(request, 202, {"queued": "destroy", "url": url})

    async def limits(self, request) -> Reply:
        body = self._body(request)
        self._writable()
        values = {}
        for name in ("min", "max"):
            raw = body.get(name)
            try:
                values[name] = int(raw)  # type: ignore[arg-type]  # None: TypeError, below
            except (TypeError, ValueError):
                raise Refused(400, f"{name}={raw!r}: expected a whole number") from None
        if not 1 <= values["min"] <= values["max"]:
            raise Refused(400, f"need 1 <= min <= max (got min {values['min']}, "
                               f"max {values['max']})")
        await self.redis.call("HSET", keys.AUTOSCALE_LIMITS, "min", values["min"],
                              "max", values["max"])
        self.log.info("dashboard: autoscaling limits set to {min}-{max}", **values)
        return await self._done(request, 200, values)

    async def scale_app(self, request) -> Reply:
        """An app's fixed number of instances, as ``dockpart apps scale NAME N``."""
        body = self._body(request)
        self._writable()
        name, raw = body.get("name"), body.get("count")
        try:
            count = int(str(raw))
        except (TypeError, ValueError):
            raise Refused(400, f"count={raw!r}: expected a whole number") from None
        try:
            await apps.scale(self.redis, str(name), count)
        except apps.BadApp as e:
            raise Refused(404 if "no app" in str(e) else 400, str(e)) from None
        self.log.info("dashboard: app {name} scaled to {count}", name=name, count=count)
        return await self._done(request, 200, {"app": name, "desired": count})

    def _body(self, request) -> dict:
        """The POST's fields: a JSON object, or a form."""
        kind = request.getHeader("content-type") or ""
        if kind.startswith("application/json"):
            raw = request.content.read(MAX_BODY + 1)
            if len(raw) > MAX_BODY:
                raise Refused(413, f"the body is larger than {MAX_BODY} bytes")
            try:
                body = json.loads(raw or b"{}")
            except ValueError as e:
                raise Refused(400, f"the body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise Refused(400, "the body must be a JSON object")
            return body
        return {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
                for k, v in request.args.items() if v}


def _first(args: dict, name: str) -> str | None:
    values = args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def make_dashboard(config, redis, worker, reactor) -> MultiService:
    """The dashboard's services: the watcher and the listener on ``--dashboard``."""
    top = MultiService()
    watch = TierWatch(redis, worker, reactor=reactor)
    watch.setServiceParent(top)
    # Every body is limited to MAX_BODY before it is read, and before the token is checked.
    site = BoundedSite(Dashboard(watch, config["dashboard-token"]),
                       replace(config["dashboard-site"], max_body=MAX_BODY))
    # A poll a second per browser would flood the log:
    site.log = lambda request: None  # type: ignore[method-assign]
    site_listener("dockpart-infra dashboard", server_endpoint(reactor, "dashboard",
                                                              config["dashboard"]),
                  site).setServiceParent(top)
    return top
