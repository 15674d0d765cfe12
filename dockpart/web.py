"""dockpart-web: the course's web app (cache, recent sites, image queue, scaling requests).

Run it with ``twistd -n dockpart-web``.  Every route but ``/`` needs Redis; when
Redis is away they answer 503 and the connection comes back by itself.  Pages
sent to clients never name Redis keys or addresses (the log does).
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from html import escape

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python import usage

from dockpart import keys, records, tier
from dockpart.tier import FIRST_PORT, MAX_PORT, instance_url
from dockpart.listening import DEFAULT_BACKLOG, Listener, server_endpoint, with_backlog
from dockpart.periodic import Outage, Periodic
from dockpart.redisconn import RedisOptions, RedisService, RedisUnavailable
from dockpart.routes import (RETRY_AFTER, CoroutineResource, NoRoute, Reply, Routes,
                             TooManyCredentials, access_log_line, credential, same_token,
                             without_token)
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


def message(title: str, text: str, code: int = 200, headers: dict | None = None) -> Reply:
    reply = page(title, f"<p>{escape(text)}</p>", code)
    reply.headers.update(headers or {})
    return reply


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
        self._visits_unrecorded = False
        self.routes = Routes()
        for name, handler in (("", self.index), ("get", self.get), ("recent", self.recent),
                              ("listservers", self.listservers), ("work", self.work)):
            self.routes.add("GET", name, handler)
        # The seed's routes that change state on GET: HEAD must not run them.
        for name, handler in (("set", self.set), ("meow", self.meow), ("spawn", self.spawn),
                              ("destroy", self.destroy)):
            self.routes.add("GET", name, handler, changes_state=True)
        self.routes.add("POST", "upload", self.upload)

    def internal_error(self) -> Reply:
        return message("Internal error", "Something went wrong; the error is in the log.", 500)

    async def dispatch(self, request) -> Reply:
        method = request.method.decode("ascii", "replace")
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            return message("Bad request", "The path is not UTF-8.", 400)
        if segments and segments[-1] == "":
            segments.pop()
        name, args = (segments[0], segments[1:]) if segments else ("", [])
        try:
            if method != "HEAD":  # HEAD changes nothing, not even /recent
                await self._record_visit(request, needed=name != "")
            return await self.route(request, method, name, args)
        except RedisUnavailable as e:
            self.log.warn("Redis unavailable: {error}", error=e)
            return message("Service unavailable",
                           "The cache (Redis) cannot be reached right now; try again shortly.",
                           503, {"retry-after": str(RETRY_AFTER)})

    async def route(self, request, method: str, name: str, args: list[str]) -> Reply:
        try:
            handler = self.routes.find(method, name)
        except NoRoute as e:
            if e.code == 405:
                return Reply(405, "Method not allowed\n", "text/plain; charset=utf-8", e.headers)
            return message("Not found", f"No page at {request.path.decode('utf-8', 'replace')}.", 404)
        if len(args) > (1 if name in KEYED_ROUTES else 0):
            return message("Not found", f"/{name} takes no such path.", 404)
        return await handler(request, *args)

    async def _record_visit(self, request, needed: bool) -> None:
        """Record the visit for /recent.  The page ``/`` needs no Redis: its visit is recorded
        without waiting, and goes unrecorded (said once) while Redis is away or restarting."""
        if needed:
            await self.record(request)
            return
        self.record(request).addCallbacks(self._visit_recorded, self._visit_unrecorded)

    def _visit_recorded(self, _) -> None:
        self._visits_unrecorded = False

    def _visit_unrecorded(self, failure) -> None:
        if not self._visits_unrecorded:
            self.log.warn("visits to / go unrecorded while Redis does not answer: {e}",
                          e=failure.getErrorMessage())
        self._visits_unrecorded = True

    def record(self, request) -> defer.Deferred:
        """Push the visit's URL onto /recent's list (a Deferred, not a coroutine: one fewer
        per request to ``/``)."""
        host = ((request.getHeader(b"host") or b"").decode("utf-8", "replace")
                or (self.url or "").removeprefix("http://"))
        url = f"http://{host}{without_token(request.uri).decode('utf-8', 'replace')}"
        return self.redis.eval(_RECORD, [keys.RECENT], [url, RECENT_COUNT])

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
        entry = records.QueuedImage(mime, base64.b64encode(data).decode("ascii")).encode()
        length = await self.redis.eval(_QUEUE_IMAGE, [keys.IMAGES],
                                       [entry, self.max_queued_images])
        if length == -1:
            return message("Queue full", f"{self.max_queued_images} images already wait for "
                                         f"/meow; view some there, then upload again.", 503)
        return message("Queued", f"Image queued ({len(data)} bytes, {mime}); "
                                 f"{length} in the queue. See it at /meow.", 201)

    async def meow(self, request) -> Reply:
        image = None
        while image is None:  # a row no web app wrote is taken off and skipped
            entry = await self.redis.call("LPOP", keys.IMAGES)
            if entry is None:
                return message("No image", "The image queue is empty; upload one at /upload "
                                           "first.", 404)
            image = next(iter(records.decode_each([entry], records.QueuedImage.decode,
                                                  "queued image")), None)
        src = f"data:{image.type};base64,{image.data}"
        return page("Meow", f'<img src="{escape(src)}" alt="the most recent upload">')

    def _scale_refusal(self, request) -> Reply | None:
        """None when /spawn and /destroy may run: no token set, or the one token given
        (``?token=`` or ``Authorization: Bearer``, :func:`dockpart.routes.credential`) is it."""
        if self.scale_token is None:
            return None
        try:
            given = credential(request)
        except TooManyCredentials as e:
            return Reply(400, f"Bad request: {e}.\n", "text/plain; charset=utf-8")
        if same_token(given, self.scale_token):
            return None
        return Reply(403, "Forbidden: this route needs the scale token (?token=TOKEN or "
                          "the header Authorization: Bearer TOKEN).\n",
                     "text/plain; charset=utf-8")

    async def spawn(self, request) -> Reply:
        if refused := self._scale_refusal(request):
            return refused
        try:
            url = await tier.request_spawn(self.redis, self.advertise_host, self.first_port,
                                              self.max_instances)
        except (tier.InstancesFull, tier.NoPortLeft) as e:
            return message("Too many instances", f"Not spawning: {e}.", 429)
        self.log.info("spawn requested for {url}", url=url)
        return message("Spawn requested", f"Requested a new instance at {url}; "
                                          f"it joins the rotation once it answers.", 202)

    async def destroy(self, request) -> Reply:
        if refused := self._scale_refusal(request):
            return refused
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
                               "autoscale": {**autoscale, "decisions": [
                                   d.shown() for d in autoscale["decisions"]]}})
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
        return {"desired": await records.read_desired(self.redis),
                "decisions": await records.read_decisions(self.redis, DECISIONS_SHOWN)}

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
        f"<li>{escape(time.strftime('%H:%M:%S', time.localtime(d.time)))} "
        f"<b>{escape(d.action)}</b>: {escape(d.reason)}</li>"
        for d in autoscale["decisions"])
    return (f"\n<h2>Autoscaler</h2>\n<p>Desired size: <b>{autoscale['desired']}</b></p>\n"
            f"<ol>\n{items}\n</ol>")


class FirstInstanceRegistration(Periodic):
    """Learns this instance's URL from its listener; the first instance keeps itself in ``servers``.

    No daemon starts the first instance, so no reconcile puts it back: it registers every
    ``interval`` seconds for as long as it runs.  Registering is idempotent (a listed URL is
    left alone and no change notice goes out), so an emptied list (a Redis restart, a
    FLUSHALL, a reconcile that unlisted it while it did not answer) has it back within one
    interval.  Redis being away is logged once per outage, not once per try.
    """

    def __init__(self, listener: Listener, app: WebApp, interval: float, *, reactor):
        super().__init__(interval, reactor, now=True)
        self.listener = listener
        self.app = app
        self._registered_before = False
        self._outage = Outage(self.log, "cannot register {url} in servers now ({error}); "
                                        "retrying every {interval:g} s", interval=interval)

    def startService(self):
        port = self.listener.port.getHost().port
        self.app.url = instance_url(self.app.advertise_host, port)
        if port == self.app.first_port:
            super().startService()

    async def _register_once(self) -> None:
        added = await tier.register(self.app.redis, self.app.url)
        if added:
            self.log.info("first instance {url} {what} servers", url=self.app.url,
                          what="was missing from; added it back to" if self._registered_before
                          else "added to")
        elif not self._registered_before:
            self.log.info("first instance {url} already in servers", url=self.app.url)
        self._registered_before = True
        self._outage.ok()

    def tick(self):
        d = defer.ensureDeferred(self._register_once())
        d.addErrback(lambda f: self._outage.failed(f.getErrorMessage(), url=self.app.url))
        return d


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
                              f"else tcp:3000:interface=127.0.0.1); TCP and UNIX listeners get "
                              f"a backlog of {DEFAULT_BACKLOG} unless it names one."],
        ["advertise-host", None, "127.0.0.1", "Host name that instance URLs use."],
        ["first-port", None, FIRST_PORT,
         "Port of the first instance: it registers itself and is never destroyed.", int],
        ["max-instances", None, tier.DEFAULT_MAX_INSTANCES, "Ceiling on instances, the first included.", int],
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
    site = BoundedSite(app, config["site"], logFormatter=access_log_line,
                       access_log=not config["no-access-log"])
    listener = site_listener("dockpart-web", endpoint, site)
    listener.setServiceParent(top)
    FirstInstanceRegistration(listener, app, config["register-interval"],
                              reactor=reactor).setServiceParent(top)
    return top
