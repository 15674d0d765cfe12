"""dockpart-web: the course's web app (cache, recent sites, image queue, scaling requests).

Run it with ``twistd -n dockpart-web``.  Every route but ``/`` needs Redis; when
Redis is away they answer 503 and the connection comes back by itself.  Pages
sent to clients never name Redis keys or addresses (the log does).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import random
import time
from html import escape

from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from dockpart import keys, tier
from dockpart.tier import FIRST_PORT, MAX_PORT, instance_url
from dockpart.listening import Listener, server_endpoint, with_backlog
from dockpart.redisconn import RedisOptions, RedisService, RedisUnavailable
from dockpart.routes import TOKEN_PARAM, CoroutineResource, Reply, without_token
from dockpart.website import BoundedSite, site_limits, site_listener, site_options

MESSAGE = "this message will self-destruct in 10 seconds"
MESSAGE_TTL = 10
DEFAULT_KEY = "message"
RECENT_COUNT = 5
MAX_KEY_LENGTH = 200
#: Longest /work?ms=N, in milliseconds.
MAX_WORK_MS = 10000
#: Autoscaler decisions /listservers shows.
DECISIONS_SHOWN = 10
#: Routes that take one more path segment, a user's cache key.
KEYED_ROUTES = {"set", "get"}
#: Where --scale-token comes from when the option is not given.
SCALE_TOKEN_ENV = "DOCKPART_SCALE_TOKEN"

#: Leading bytes of the image formats a browser shows, and their types.
IMAGE_MAGIC = [
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
]

_RECORD = """
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
"""

# KEYS: the image queue; ARGV: the entry, the cap.  The new length, or -1 when full.
_QUEUE_IMAGE = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""


def sniff_image(data: bytes) -> str | None:
    """The image type that ``data`` starts with, or None if it is no image we know."""
    for magic, mime in IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def page(title: str, body_html: str, code: int = 200) -> Reply:
    return Reply(code, f"<!doctype html>\n<html><head><meta charset=\"utf-8\">"
                       f"<title>{escape(title)}</title></head>\n"
                       f"<body><h1>{escape(title)}</h1>\n{body_html}\n</body></html>\n")


def message(title: str, text: str, code: int = 200) -> Reply:
    return page(title, f"<p>{escape(text)}</p>", code)


class WebApp(CoroutineResource):
    """All routes; each handler returns a :class:`Reply`."""

    log = Logger()

    def __init__(self, redis: RedisService, advertise_host: str, first_port: int,
                 max_instances: int, max_upload: int, max_queued_images: int = 20,
                 scale_token: str | None = None, *, reactor):
        super().__init__()
        self.redis = redis
        self.reactor = reactor  # /work's timer
        self.advertise_host = advertise_host
        self.first_port = first_port
        self.max_instances = max_instances
        self.max_upload = max_upload
        self.max_queued_images = max_queued_images
        self.scale_token = scale_token.encode() if scale_token else None
        self.url = ""  # known once listening
        self.routes = {
            ("GET", ""): self.index,
            ("GET", "set"): self.set,
            ("GET", "get"): self.get,
            ("GET", "recent"): self.recent,
            ("POST", "upload"): self.upload,
            ("GET", "meow"): self.meow,
            ("GET", "spawn"): self.spawn,
            ("GET", "destroy"): self.destroy,
            ("GET", "listservers"): self.listservers,
            ("GET", "work"): self.work,
        }

    def internal_error(self) -> Reply:
        return message("Internal error", "Something went wrong; the error is in the log.", 500)

    async def dispatch(self, request) -> Reply:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD":
            method = "GET"
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return message("Bad request", "The path is not UTF-8.", 400)
        if segments and segments[-1] == "":
            segments.pop()
        name, args = (segments[0], segments[1:]) if segments else ("", [])
        try:
            await self.record(request)
            return await self.route(request, method, name, args)
        except RedisUnavailable as e:
            if name == "":
                return await self.index(request)
            self.log.warn("Redis unavailable: {error}", error=e)
            return message("Service unavailable",
                           "The cache (Redis) cannot be reached right now; try again shortly.", 503)

    async def route(self, request, method: str, name: str, args: list[str]) -> Reply:
        handler = self.routes.get((method, name))
        if handler is None:
            allowed = [m for m, route in self.routes if route == name]
            if allowed:
                return Reply(405, "Method not allowed\n", "text/plain; charset=utf-8",
                             {"allow": ", ".join(allowed)})
            return message("Not found", f"No page at {request.path.decode('utf-8', 'replace')}.", 404)
        if len(args) > (1 if name in KEYED_ROUTES else 0):
            return message("Not found", f"/{name} takes no such path.", 404)
        return await handler(request, *args)

    async def record(self, request) -> None:
        host = ((request.getHeader(b"host") or b"").decode("utf-8", "replace")
                or (self.url or "").removeprefix("http://"))
        url = f"http://{host}{without_token(request.uri).decode('utf-8', 'replace')}"
        await self.redis.eval(_RECORD, [keys.RECENT], [url, RECENT_COUNT])

    async def index(self, request) -> Reply:
        return page("dockpart web app",
                    f"<p>Served by the instance at <b>{escape(self.url or '')}</b>.</p>")

    def _user_key(self, key: str) -> str:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"a key has 1 to {MAX_KEY_LENGTH} characters")
        return keys.user_key(key)

    async def set(self, request, key: str = DEFAULT_KEY) -> Reply:
        try:
            redis_key = self._user_key(key)
        except ValueError as e:
            return message("Bad key", str(e), 400)
        await self.redis.call("SET", redis_key, MESSAGE, "EX", MESSAGE_TTL)
        return message("Stored", f"Stored under {key!r} for {MESSAGE_TTL} seconds: {MESSAGE}")

    async def get(self, request, key: str = DEFAULT_KEY) -> Reply:
        try:
            redis_key = self._user_key(key)
        except ValueError as e:
            return message("Bad key", str(e), 400)
        value = await self.redis.call("GET", redis_key)
        if value is None:
            return message("Expired", f"Nothing under {key!r}: it has expired or was never set "
                                      f"(visit /set first).", 404)
        return message("Cached message", value)

    async def recent(self, request) -> Reply:
        urls = await self.redis.call("LRANGE", keys.RECENT, 0, RECENT_COUNT - 1)
        items = "\n".join(f"<li>{escape(u)}</li>" for u in urls)
        return page("Recently visited", f"<ol>\n{items}\n</ol>")

    async def upload(self, request) -> Reply:
        files = request.args.get(b"image")
        if not files or not files[0]:
            return message("No image", "Send the image as the multipart field 'image', "
                                       "e.g. curl -F image=@cat.jpg HOST/upload", 400)
        data = files[0]
        mime = sniff_image(data)
        if mime is None:
            return message("Not an image", "The upload is not a JPEG, PNG, GIF, BMP or WebP image.", 415)
        entry = json.dumps({"type": mime, "data": base64.b64encode(data).decode("ascii")})
        length = await self.redis.eval(_QUEUE_IMAGE, [keys.IMAGES],
                                       [entry, self.max_queued_images])
        if length == -1:
            return message("Queue full", f"{self.max_queued_images} images already wait for "
                                         f"/meow; view some there, then upload again.", 503)
        return message("Queued", f"Image queued ({len(data)} bytes, {mime}); "
                                 f"{length} in the queue. See it at /meow.", 201)

    async def meow(self, request) -> Reply:
        entry = await self.redis.call("LPOP", keys.IMAGES)
        if entry is None:
            return message("No image", "The image queue is empty; upload one at /upload first.", 404)
        image = json.loads(entry)
        src = f"data:{image['type']};base64,{image['data']}"
        return page("Meow", f'<img src="{escape(src)}" alt="the most recent upload">')

    def _may_scale(self, request) -> bool:
        """Whether /spawn and /destroy may run: no token set, or the right one given
        (``?token=`` or ``Authorization: Bearer``), compared in constant time."""
        if self.scale_token is None:
            return True
        # Headers as bytes: a value that is not UTF-8 is a wrong token, not an error.
        scheme, _, credentials = (request.getHeader(b"authorization") or b"").partition(b" ")
        given = [*request.args.get(TOKEN_PARAM, [])]
        if scheme.lower() == b"bearer":
            given.append(credentials.strip())
        return any(hmac.compare_digest(token, self.scale_token) for token in given)

    @staticmethod
    def _forbidden() -> Reply:
        return Reply(403, "Forbidden: this route needs the scale token (?token=TOKEN or "
                          "the header Authorization: Bearer TOKEN).\n",
                     "text/plain; charset=utf-8")

    async def spawn(self, request) -> Reply:
        if not self._may_scale(request):
            return self._forbidden()
        try:
            url = await tier.request_spawn(self.redis, self.advertise_host, self.first_port,
                                              self.max_instances)
        except (tier.InstancesFull, tier.NoPortLeft) as e:
            return message("Too many instances", f"Not spawning: {e}.", 429)
        self.log.info("spawn requested for {url}", url=url)
        return message("Spawn requested", f"Requested a new instance at {url}; "
                                          f"it joins the rotation once it answers.", 202)

    async def destroy(self, request) -> Reply:
        if not self._may_scale(request):
            return self._forbidden()
        url = await tier.request_destroy(self.redis, self.first_port, random.getrandbits(31))
        if url is None:
            return message("Nothing to destroy",
                           "No instance other than the first is running or all are already "
                           "queued for removal.", 409)
        self.log.info("destroy requested for {url}", url=url)
        return message("Destroy requested", f"Requested removal of the instance at {url}.", 202)

    async def listservers(self, request) -> Reply:
        lists = await tier.snapshot(self.redis)
        live = lists[keys.SERVERS]
        spawning = lists[keys.SPAWN_QUEUE] + lists[keys.SPAWNING]
        destroying = lists[keys.DESTROY_QUEUE] + lists[keys.DESTROYING]
        autoscale = await self._autoscale()
        if b"application/json" in (request.getHeader(b"accept") or b""):
            body = json.dumps({"servers": live, "spawning": spawning, "destroying": destroying,
                               "autoscale": autoscale})
            return Reply(200, body + "\n", "application/json")
        sections = [("Instances", live), ("Being spawned", spawning),
                    ("Being destroyed", destroying)]
        html = "\n".join(
            f"<h2>{title}</h2>\n<ul>\n"
            + "\n".join(f"<li>{escape(u)}</li>" for u in urls)
            + "\n</ul>" for title, urls in sections)
        return page("Servers", html + _autoscale_html(autoscale))

    async def _autoscale(self) -> dict:
        """The autoscaler's desired size and last decisions (dockpart.infra_autoscale)."""
        desired = await self.redis.call("GET", keys.AUTOSCALE_DESIRED)
        raws = await self.redis.call("LRANGE", keys.AUTOSCALE_DECISIONS, 0, DECISIONS_SHOWN - 1)
        decisions = []
        for raw in raws:
            try:
                decisions.append(json.loads(raw))
            except ValueError:
                continue
        return {"desired": int(desired) if desired and desired.isdigit() else None,
                "decisions": decisions}

    async def work(self, request) -> Reply:
        """Stands for real work: answers after ``ms`` milliseconds without blocking."""
        raw = request.args.get(b"ms", [b"0"])[0].decode("ascii", "replace")
        if not raw.isdigit() or int(raw) > MAX_WORK_MS:
            return message("Bad request", f"ms must be a whole number from 0 to {MAX_WORK_MS}.",
                           400)
        await task.deferLater(self.reactor, int(raw) / 1000)
        return Reply(200, f"worked {raw} ms\n", "text/plain; charset=utf-8")


def _autoscale_html(autoscale: dict) -> str:
    if autoscale["desired"] is None and not autoscale["decisions"]:
        return ""
    items = "\n".join(
        f"<li>{escape(time.strftime('%H:%M:%S', time.localtime(d.get('time', 0))))} "
        f"<b>{escape(str(d.get('action')))}</b>: {escape(str(d.get('reason')))}</li>"
        for d in autoscale["decisions"])
    return (f"\n<h2>Autoscaler</h2>\n<p>Desired size: <b>{autoscale['desired']}</b></p>\n"
            f"<ol>\n{items}\n</ol>")


class FirstInstanceRegistration(Service):
    """Learns this instance's URL from its listener; the first instance keeps itself in ``servers``.

    No daemon starts the first instance, so no reconcile puts it back: it registers every
    ``interval`` seconds for as long as it runs.  Registering is idempotent (a listed URL is
    left alone and no change notice goes out), so an emptied list (a Redis restart, a
    FLUSHALL, a reconcile that unlisted it while it did not answer) has it back within one
    interval.  Redis being away is logged once per outage, not once per try.
    """

    log = Logger()

    def __init__(self, listener: Listener, app: WebApp, interval: float, *, reactor):
        self.listener = listener
        self.app = app
        self.interval = interval
        self.registration = LoopingCall(self._register)
        self.registration.clock = reactor
        self._registered_before = False
        self._failing = False

    def startService(self):
        super().startService()
        port = self.listener.port.getHost().port
        self.app.url = instance_url(self.app.advertise_host, port)
        if port == self.app.first_port:
            self.registration.start(self.interval)

    async def _register_once(self) -> None:
        added = await tier.register(self.app.redis, self.app.url)
        if added:
            self.log.info("first instance {url} {what} servers", url=self.app.url,
                          what="was missing from; added it back to" if self._registered_before
                          else "added to")
        elif not self._registered_before:
            self.log.info("first instance {url} already in servers", url=self.app.url)
        self._registered_before = True
        self._failing = False

    def _register(self):
        d = defer.ensureDeferred(self._register_once())
        d.addErrback(self._register_failed)
        return d

    def _register_failed(self, failure) -> None:
        """Logged, never raised: that would stop the LoopingCall for good."""
        if not self._failing:
            self._failing = True
            self.log.warn("cannot register {url} in servers now ({e}); retrying every "
                          "{interval:g} s", url=self.app.url, e=failure.getErrorMessage(),
                          interval=self.interval)

    def stopService(self):
        super().stopService()
        if self.registration.running:
            self.registration.stop()


def _size(option: str, value: str) -> int:
    """A positive size in bytes from ``512k``, ``5MiB``, ``100`` ...; UsageError otherwise."""
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        size = (int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units
                else int(text))
    except ValueError:
        raise usage.UsageError(f"--{option} {value!r} is not a size") from None
    if size <= 0:
        raise usage.UsageError(f"--{option} {value!r}: a size must be positive")
    return size


class Options(RedisOptions):
    synopsis = "[options]"
    longdesc = ("The course's web app. Port: --listen, else the environment variable "
                "start_port, else 3000; on 127.0.0.1 unless --listen names an interface.")
    optParameters = [
        ["listen", "l", None, "Endpoint to listen on (default tcp:$start_port:interface=127.0.0.1, "
                              "else tcp:3000:interface=127.0.0.1); TCP and UNIX listeners get "
                              "a backlog of 1024 unless it names one."],
        ["advertise-host", None, "127.0.0.1", "Host name that instance URLs use."],
        ["first-port", None, FIRST_PORT,
         "Port of the first instance: it registers itself and is never destroyed.", int],
        ["max-instances", None, 10, "Ceiling on instances, the first included.", int],
        ["max-upload", None, "5MiB", "Largest accepted upload (bytes, or with K/M/G)."],
        ["max-queued-images", None, 20, "Images that may wait for /meow; an upload past it "
                                        "gets 503 and changes nothing.", int],
        ["scale-token", None, None, f"When set (or env {SCALE_TOKEN_ENV}), /spawn and /destroy "
                                    f"answer 403 without it (?token= or Authorization: Bearer)."],
        ["register-interval", None, 1.0,
         "First instance: seconds between its checks that it is in servers.", float],
        *site_options(),
    ]
    optFlags = [
        ["no-access-log", None, "Log no line per request (errors are still logged)."],
    ]

    def postOptions(self):
        super().postOptions()
        if self["listen"] is None:
            port = os.environ.get("start_port", str(FIRST_PORT))
            if not port.isdigit():
                raise usage.UsageError(f"start_port={port!r} is not a port number")
            self["listen"] = f"tcp:{port}:interface=127.0.0.1"
        self["max-upload"] = _size("max-upload", self["max-upload"])
        self["scale-token"] = self["scale-token"] or os.environ.get(SCALE_TOKEN_ENV) or None
        if not 1 <= self["first-port"] <= MAX_PORT:
            raise usage.UsageError(f"--first-port {self['first-port']}: need 1 to {MAX_PORT}")
        if self["max-instances"] < 1:
            raise usage.UsageError("--max-instances must be at least 1")
        if self["max-queued-images"] < 1:
            raise usage.UsageError("--max-queued-images must be at least 1")
        if self["register-interval"] <= 0:
            raise usage.UsageError("--register-interval must be positive")
        # A body is limited before it is read: --max-upload on /upload, the default elsewhere.
        self["site"] = site_limits(self, route_bodies={b"/upload": self["max-upload"]})


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    top = MultiService()
    redis = RedisService(config["redis"], config["redis-timeout"], reactor)
    redis.setServiceParent(top)
    app = WebApp(redis, config["advertise-host"], config["first-port"],
                 config["max-instances"], config["max-upload"], config["max-queued-images"],
                 config["scale-token"], reactor=reactor)
    endpoint = server_endpoint(reactor, "listen", with_backlog(config["listen"]))
    site = BoundedSite(app, config["site"], access_log=not config["no-access-log"])
    listener = site_listener("dockpart-web", endpoint, site)
    listener.setServiceParent(top)
    FirstInstanceRegistration(listener, app, config["register-interval"],
                              reactor=reactor).setServiceParent(top)
    return top
