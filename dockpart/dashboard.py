"""dockpart-infra's live dashboard (``--dashboard ENDPOINT``): the tier at a glance.

One page (tables drawn on the server, charts by the bundled uPlot), a JSON API, and three
buttons that queue work exactly as ``/spawn`` and ``/destroy`` do.  What it shows comes from
:class:`dockpart.dashboard_state.TierWatch`; how it looks, from :mod:`dockpart.dashboard_page`.

Safety, as Jupyter's: locked by default (``--dashboard-token``; only ``--dashboard-no-token``
runs it open).  A request whose ``Host`` is not a loopback name, the address it reached, or a
``--dashboard-host`` is refused (DNS rebinding).  Browsing it as ``dashboard.localhost:PORT``
keeps its cookie from the apps on ``127.0.0.1`` (cookies are per host, not per port).  The token (``?token=``, ``Authorization:
Bearer``, or the login form) opens a session: a random id per login, kept here, that expires
and that logout revokes, in an HttpOnly, SameSite=Strict cookie named after the dashboard's
port and bound to it.  A POST must come from the page itself: a cross-site ``Origin`` or
``Sec-Fetch-Site`` is refused, and the page's CSRF token (form field ``csrf`` or header
``X-CSRF-Token``) is required unless the request carries the token in an ``Authorization``
header, which no other site can make a browser send.  A standby infra (no lease) serves the
page read-only.
"""

import hmac
import json
import secrets
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from twisted.application.service import MultiService

from dockpart import apps, dashboard_page, records, tier
from dockpart.dashboard_state import TierWatch
from dockpart.listening import server_endpoint
from dockpart.redisconn import RedisUnavailable
from dockpart.routes import (RETRY_AFTER, CoroutineResource, NoRoute, Reply, Routes,
                             TooManyCredentials, credential, same_token)
from dockpart.website import BoundedSite, site_listener

#: The session cookie's name, followed by the dashboard's port: cookies are per host, not per
#: port, so two dashboards (or an app) on one host never overwrite each other's.
COOKIE = "dockpart_dashboard_"
#: Seconds a login lasts.
SESSION_SECONDS = 8 * 3600
#: Sessions kept at most (the oldest go first): each needs the token, but memory is bounded.
MAX_SESSIONS = 1000
#: Host names every dashboard answers to: this machine's loopback names.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: Largest POST body read.
MAX_BODY = 16 * 1024
STATIC = Path(__file__).with_name("dashboard_static")
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".png": "image/png"}


class Refused(Exception):
    """A request answered with a 4xx (or 503) and a message; nothing was changed."""

    def __init__(self, code: int, text: str, headers: dict | None = None):
        super().__init__(text)
        self.code = code
        self.headers = headers or {}


def json_answer(code: int, value, headers: dict | None = None) -> Reply:
    return Reply(code, (json.dumps(value) + "\n").encode(), "application/json", headers or {})


def html_answer(code: int, text: str, headers: dict | None = None) -> Reply:
    return Reply(code, text.encode("utf-8"), "text/html; charset=utf-8", headers or {})


def _wants_json(request) -> bool:
    accept = request.getHeader("accept") or ""
    kind = request.getHeader("content-type") or ""
    return "application/json" in accept or kind.startswith("application/json")


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8080`` is ``::1``)."""
    if header.startswith("["):
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower() if ":" in header else header.lower()


class Dashboard(CoroutineResource):
    """Every route of the dashboard; handlers return an :class:`Reply` or raise Refused."""

    default_headers = {"cache-control": "no-store",
                       "x-frame-options": "DENY",  # no clickjacking of the buttons
                       "x-content-type-options": "nosniff"}

    def __init__(self, watch: TierWatch, token: str | None = None, *,
                 max_instances: int = tier.DEFAULT_MAX_INSTANCES, hosts=(),
                 session_seconds: float = SESSION_SECONDS, clock=None):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.watch = watch
        self.redis = watch.redis
        self.rules = watch.worker.rules
        self.token = token.encode() if token else None
        self.max_instances = max_instances
        self.hosts = LOOPBACK_HOSTS | {h.lower() for h in hosts}
        self.session_seconds = session_seconds
        self.clock = clock
        self.sessions: dict[str, tuple[float, int]] = {}  # id: (expiry, the dashboard's port)
        self.csrf = secrets.token_urlsafe(24)
        self.static = {p.name: (p.read_bytes(), STATIC_TYPES[p.suffix])  # read once, here
                       for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}
        self.routes = Routes()
        for path, handler in (("", self.index), ("live", self.live), ("api/state", self.state),
                              ("api/history", self.history)):
            self.routes.add("GET", path, handler)
        for path, handler in (("api/spawn", self.spawn), ("api/destroy", self.destroy),
                              ("api/limits", self.limits), ("api/apps/scale", self.scale_app),
                              ("logout", self.logout)):
            self.routes.add("POST", path, handler)

    def internal_error(self) -> Reply:
        return json_answer(500, {"error": "internal error; see dockpart-infra's log"})

    async def dispatch(self, request) -> Reply:
        method = request.method.decode("ascii", "replace")
        path = "/".join(s.decode("utf-8", "replace") for s in request.postpath).strip("/")
        new_session = None
        try:
            self._check_host(request)
            try:
                given = credential(request)
            except TooManyCredentials as e:
                raise Refused(400, str(e)) from None
            if path == "login":
                return await self.login(request, method, given)
            if not self._authorized(request, given):
                raise Refused(401, "this dashboard needs its token (--dashboard-token): "
                                   "log in, or send Authorization: Bearer TOKEN")
            if given is not None and method == "GET" and not _bearer(request):
                new_session = self._open_session(request)  # a link with ?token= logs in
            if method in ("GET", "HEAD") and path.startswith("static/"):
                answer = self.static_file(path.removeprefix("static/"))
            else:
                try:
                    handler = self.routes.find(method, path)
                except NoRoute as e:
                    raise Refused(e.code, str(e), e.headers) from None
                if method == "POST":
                    self._check_same_origin(request)
                answer = await handler(request)
        except Refused as e:
            return self._refusal(request, e)
        except RedisUnavailable as e:
            return self._refusal(request, Refused(503, f"Redis is unreachable: {e}",
                                                  {"retry-after": str(RETRY_AFTER)}))
        if new_session:
            answer.headers["set-cookie"] = new_session
        return answer

    def _refusal(self, request, e: Refused) -> Reply:
        """JSON for programs; a page for a browser (the login form when the token is missing)."""
        if _wants_json(request) or "text/html" not in (request.getHeader("accept") or ""):
            return json_answer(e.code, {"error": str(e)}, e.headers)
        if e.code == 401:
            return html_answer(401, dashboard_page.login_html(), e.headers)
        return html_answer(e.code, dashboard_page.message_html(f"Refused ({e.code})", str(e)),
                           e.headers)

    # -- access

    def _check_host(self, request) -> None:
        """DNS rebinding: a page of another site, its name pointed at this machine, sends its
        own name as Host.  Allowed: loopback names (``*.localhost`` too, which browsers resolve
        to loopback themselves, as Vite allows), the address reached, ``--dashboard-host``."""
        header = request.getHeader(b"host")
        if header is None:
            return  # HTTP/1.0 without Host: no browser, so no rebinding
        name = host_name(header.decode("ascii", "replace"))
        if not (name in self.hosts or name.endswith(".localhost")
                or name == request.getHost().host):
            raise Refused(403, f"Host {name!r} is not this dashboard's; add it with "
                               f"--dashboard-host if it names this machine")

    def _cookie_name(self, request) -> str:
        secure = request.isSecure()
        return ("__Host-" if secure else "") + COOKIE + str(request.getHost().port)

    def _open_session(self, request) -> str:
        """A new session for this dashboard's port; its Set-Cookie value."""
        now = self.clock.seconds()
        self.sessions = {k: v for k, v in self.sessions.items() if v[0] > now}
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        session = secrets.token_urlsafe(32)
        self.sessions[session] = (now + self.session_seconds, request.getHost().port)
        return (f"{self._cookie_name(request)}={session}; Path=/; Max-Age="
                f"{int(self.session_seconds)}; HttpOnly; SameSite=Strict"
                + ("; Secure" if request.isSecure() else ""))

    def _session(self, request) -> str | None:
        """The id of the live session this request's cookie names, if any."""
        cookie = request.getCookie(self._cookie_name(request).encode())
        if cookie is None:
            return None
        session = cookie.decode("ascii", "replace")
        expiry, port = self.sessions.get(session, (0.0, None))
        if expiry <= self.clock.seconds() or port != request.getHost().port:
            self.sessions.pop(session, None)
            return None
        return session

    def _authorized(self, request, given: bytes | None) -> bool:
        if self.token is None:
            return True
        if given is not None:
            return same_token(given, self.token)
        return self._session(request) is not None

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
        if self.token and _bearer(request):
            return  # a browser never adds our token to another site's request
        given = request.getHeader("x-csrf-token") or _first(request.args, "csrf")
        if not given or not hmac.compare_digest(given.encode(), self.csrf.encode()):
            raise Refused(403, "missing or wrong CSRF token: post from the dashboard page, or "
                               "send the 'csrf' of GET /api/state as X-CSRF-Token")

    async def login(self, request, method: str, given: bytes | None) -> Reply:
        if self.token is None:
            return html_answer(303, "", {"location": "./"})
        if method in ("GET", "HEAD"):
            return html_answer(200, dashboard_page.login_html())
        if method != "POST":
            raise Refused(405, "/login takes GET or POST", {"allow": "GET, HEAD, POST"})
        self._refuse_cross_site(request)
        # The form's field alone: Twisted's request.args lets a body field hide a query one.
        if given is not None:
            raise Refused(400, "POST /login takes the token in its form only, not in the "
                               "query or a header")
        form = request.args.get(b"token", [])
        if len(form) > 1:
            raise Refused(400, "several tokens in one request; send one")
        if not same_token(form[0] if form else None, self.token):
            return html_answer(401, dashboard_page.login_html("That is not the token."))
        return html_answer(303, "", {"location": "./", "set-cookie": self._open_session(request)})

    async def logout(self, request) -> Reply:
        """Ends this browser's session here (the cookie alone no longer opens anything)."""
        session = self._session(request)
        if session is not None:
            del self.sessions[session]
        gone = f"{self._cookie_name(request)}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        if _wants_json(request):
            return json_answer(200, {"logged_out": session is not None}, {"set-cookie": gone})
        return html_answer(303, "", {"location": "login", "set-cookie": gone})

    # -- pages

    async def index(self, request) -> Reply:
        return html_answer(200, dashboard_page.page_html(self.watch.snapshot, self.csrf,
                                                         logout=self.token is not None))

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
        ceiling = self.max_instances  # infra's --max-instances; a lower max set here wins
        limit = (await records.read_limits(self.redis)).max
        if limit is not None:
            ceiling = min(limit, ceiling)
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
        if not 1 <= values["min"] <= values["max"] <= self.max_instances:
            raise Refused(400, f"need 1 <= min <= max <= {self.max_instances} (dockpart-infra's "
                               f"--max-instances; got min {values['min']}, max {values['max']})")
        await records.write_limits(self.redis, values["min"], values["max"])
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


def _bearer(request) -> bool:
    return (request.getHeader("authorization") or "").lower().startswith("bearer ")


def _first(args: dict, name: str) -> str | None:
    values = args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def make_dashboard(config, redis, worker, reactor) -> MultiService:
    """The dashboard's services: the watcher and the listener on ``--dashboard``."""
    top = MultiService()
    watch = TierWatch(redis, worker, reactor=reactor)
    watch.setServiceParent(top)
    # Every body is limited to MAX_BODY before it is read, and before the token is checked.
    site = BoundedSite(Dashboard(watch, config["dashboard-token"],
                                 max_instances=config["max-instances"],
                                 hosts=config["dashboard-hosts"], clock=reactor),
                       replace(config["dashboard-site"], max_body=MAX_BODY))
    # A poll a second per browser would flood the log:
    site.log = lambda request: None  # type: ignore[method-assign]
    site_listener("dockpart-infra dashboard", server_endpoint(reactor, "dashboard",
                                                              config["dashboard"]),
                  site).setServiceParent(top)
    return top
