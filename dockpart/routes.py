"""HTTP routes answered by coroutines, for dockpart's two sites: the web app and infra's dashboard.

``Resource.render`` must answer at once, but both sites' handlers wait on Redis.  This base
runs ``dispatch`` as a coroutine, logs what it did not expect and answers 500 for it (never a
traceback to the client), and writes nothing to a client that has hung up.  Both sites take a
``?token=`` (scale token, dashboard token): it never reaches the log or /recent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

#: The query parameter that may carry a site's token.
TOKEN_PARAM = b"token"


def without_token(uri: bytes) -> bytes:
    """``uri`` without its ``token`` query parameters: a token is not for logs or /recent."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    kept = [p for p in query.split(b"&") if p.partition(b"=")[0] != TOKEN_PARAM]
    return path + (b"?" + b"&".join(kept) if kept else b"")


@dataclass
class Reply:
    code: int
    body: str | bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict = field(default_factory=dict)


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
