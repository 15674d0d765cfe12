"""HTTP routes answered by coroutines, for dockpart's two sites: the web app and infra's dashboard.

``Resource.render`` must answer at once, but both sites' handlers wait on Redis.  This base
runs ``dispatch`` as a coroutine, logs what it did not expect and answers 500 for it (never a
traceback to the client), and writes nothing to a client that has hung up.

Both sites share three rules, kept here once:

- the route table (:class:`Routes`): which handler a method and path reach, 404 and 405 with
  ``Allow``, and HEAD, which runs a GET handler only when that route changes nothing (the web
  app's ``/meow`` and ``/spawn`` change state on GET: HEAD on them is a 405, never a spawn);
- the token rule (:func:`credential`): a request carries at most one token, in the query
  (``?token=``, read as Twisted reads a query: ``;`` separates too, names are unquoted) or in
  ``Authorization: Bearer``; two or more are a 400, not a guess at which one counts;
- a token never reaches the log or /recent (:func:`without_token`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from dockpart.website import combined_log_line

#: The query parameter that may carry a site's token.
TOKEN_PARAM = b"token"
#: Seconds a client is told to wait (``Retry-After``) when Redis is away.
RETRY_AFTER = 2


class TooManyCredentials(ValueError):
    """A request that carries more than one token: refused with 400 whatever their values."""


def _query_items(uri: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``uri``'s path and its query as (name as Twisted decodes it, raw item) pairs.

    The same split as ``twisted.web.http.parse_qs``, which fills ``request.args``: items end at
    ``&`` or ``;``, and a name is percent- and ``+``-decoded, so ``%74oken`` is ``token``.
    """
    path, _, query = uri.partition(b"?")
    items = [item for part in query.split(b"&") for item in part.split(b";") if item]
    return path, [(unquote_to_bytes(item.partition(b"=")[0].replace(b"+", b" ")), item)
                  for item in items]


def without_token(uri: bytes) -> bytes:
    """``uri`` without the query items that Twisted would read as ``token``: not for logs or
    /recent, however the name was spelled."""
    if b"?" not in uri:  # most requests: nothing to split (this runs twice per request)
        return uri
    path, items = _query_items(uri)
    kept = [raw for name, raw in items if name != TOKEN_PARAM]
    return path + (b"?" + b"&".join(kept) if kept else b"")


def credential(request) -> bytes | None:
    """The one token ``request`` carries (query or bearer header), or None.

    Raises :class:`TooManyCredentials` for two or more: several ``token`` items however
    spelled, several Authorization headers, or a query token beside a header.
    """
    _, items = _query_items(request.uri)
    given: list[bytes | None] = [unquote_to_bytes(raw.partition(b"=")[2].replace(b"+", b" "))
                                 for name, raw in items if name == TOKEN_PARAM]
    for header in request.requestHeaders.getRawHeaders(b"authorization", []):
        scheme, _, value = header.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            given.append(value.strip())
        else:
            given.append(None)  # an Authorization of another kind is a credential too
    if len(given) > 1:
        raise TooManyCredentials(f"{len(given)} credentials in one request; send one token, "
                                 f"as ?token= or as Authorization: Bearer")
    return given[0] if given else None


def same_token(given: bytes | None, expected: bytes) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given, expected)


def access_log_line(timestamp: str, request) -> str:
    """Twisted's combined access log line (a Site's ``logFormatter``), with no token in it."""
    return combined_log_line(timestamp, request, without_token(request.uri))


@dataclass
class Reply:
    code: int
    body: str | bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict = field(default_factory=dict)


class NoRoute(Exception):
    """No handler for this method and path: 404, or 405 with the methods that ``allow``."""

    def __init__(self, code: int, path: str, allow: list[str]):
        super().__init__(f"no page at /{path}" if code == 404
                         else f"/{path} takes {' or '.join(allow)}")
        self.code = code
        self.allow = allow

    @property
    def headers(self) -> dict:
        return {"allow": ", ".join(self.allow)} if self.allow else {}


class Routes:
    """A site's route table: (method, path) to handler; ``changes_state`` marks a GET that HEAD
    must not run."""

    def __init__(self):
        self._handlers: dict[tuple[str, str], object] = {}
        self._unsafe: set[str] = set()

    def add(self, method: str, path: str, handler, *, changes_state: bool = False) -> None:
        self._handlers[(method, path)] = handler
        if changes_state and method == "GET":
            self._unsafe.add(path)

    def allowed(self, path: str) -> list[str]:
        methods = [m for m, p in self._handlers if p == path]
        if "GET" in methods and path not in self._unsafe:
            methods.append("HEAD")
        return methods

    def find(self, method: str, path: str):
        """The handler, or :class:`NoRoute`.  HEAD runs GET's handler unless it changes state."""
        if method == "HEAD" and path not in self._unsafe:
            method = "GET"
        handler = self._handlers.get((method, path))
        if handler is None:
            allow = self.allowed(path)
            raise NoRoute(405 if allow else 404, path, allow)
        return handler


class CoroutineResource(Resource):
    """Every path under it goes to :meth:`dispatch`, a coroutine returning a :class:`Reply`."""

    isLeaf = True
    log = Logger()
    #: Headers every answer carries (a reply's own headers come after them and win).
    default_headers: dict[str, str] = {}

    async def dispatch(self, request) -> Reply:
        raise NotImplementedError

    def internal_error(self) -> Reply:
        """What a client sees when a handler raised: nothing of the error itself."""
        return Reply(500, "Internal error: the error is in the log.", "text/plain; charset=utf-8")

    def render(self, request):
        gone = []  # the client hung up: nothing to write
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self.dispatch(request))
        d.addErrback(self._failed, request)
        d.addCallback(self._write, request, gone)
        return server.NOT_DONE_YET

    def _failed(self, failure, request) -> Reply:
        self.log.failure("answering {uri}", failure,
                         uri=without_token(request.uri).decode("utf-8", "replace"))
        return self.internal_error()

    def _write(self, reply: Reply, request, gone: list) -> None:
        if gone or request.finished:
            return
        request.setResponseCode(reply.code)
        request.setHeader("content-type", reply.content_type)
        for name, value in {**self.default_headers, **reply.headers}.items():
            request.setHeader(name, value)
        body = reply.body.encode("utf-8") if isinstance(reply.body, str) else reply.body
        request.setHeader("content-length", str(len(body)))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
