"""dockpart-fileweb: each HTTP request answered with what a TCP source sends (the seed's port 8000).

The seed ran ``curl write:7000`` per request; here a Twisted TCP client reads the source until
it closes and the page is that text.  A source that cannot be reached, breaks off or sends too
much gives 502; one that accepts nothing or falls silent for ``--timeout`` seconds gives 504.
Run it with ``twistd -n dockpart-fileweb --listen tcp:8000 --source tcp:writer:7000``.
"""

from twisted.internet import defer, error
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from dockpart.listening import client_endpoint, server_endpoint
from dockpart.website import BoundedSite, site_limits, site_listener, site_options

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_SOURCE = "tcp:127.0.0.1:7000"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class SourceFailed(Exception):
    """The source gave no usable answer; ``code`` is the HTTP status that says so."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


class SourceReader(Protocol, TimeoutMixin):
    """Collects everything the source sends until it closes; ``done`` fires with the bytes."""

    transport: ITCPTransport  # a TCP client's connection

    def __init__(self, idle_timeout: float, max_bytes: int, clock):
        self.idle_timeout = idle_timeout
        self.max_bytes = max_bytes
        # TimeoutMixin's timer, on the injected clock:
        self.callLater = clock.callLater  # type: ignore[method-assign]
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(
            lambda _: self.transport.abortConnection())

    def connectionMade(self):
        self.setTimeout(self.idle_timeout)

    def dataReceived(self, data):
        self.resetTimeout()
        self.size += len(data)
        if self.size > self.max_bytes:
            self._fail(SourceFailed(502, f"the source sent more than {self.max_bytes} bytes"))
        else:
            self.chunks.append(data)

    def timeoutConnection(self):
        self._fail(SourceFailed(504, f"the source sent nothing for {self.idle_timeout:g} s "
                                     f"(after {self.size} bytes)"))

    def _fail(self, failure: SourceFailed) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone):
        self.setTimeout(None)
        if self.done.called:
            return
        if reason.check(error.ConnectionDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(SourceFailed(
                502, f"the source broke the connection after {self.size} bytes "
                     f"({reason.getErrorMessage()})"))


class SourcePage(Resource):
    """Every path and method: fetch the source afresh and answer with it as text."""

    isLeaf = True
    log = Logger()

    def __init__(self, endpoint, source: str, timeout: float, max_bytes: int, clock):
        super().__init__()
        self.endpoint = endpoint
        self.source = source
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.clock = clock

    def fetch(self) -> defer.Deferred:
        """The source's bytes, or a failure with a :class:`SourceFailed`."""
        reader = SourceReader(self.timeout, self.max_bytes, self.clock)
        d = connectProtocol(self.endpoint, reader)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(lambda _: reader.done, self._not_connected)
        return d

    def _not_connected(self, failure):
        if failure.check(defer.TimeoutError, defer.CancelledError,
                         error.ConnectingCancelledError):
            raise SourceFailed(504, f"the source accepted no connection within {self.timeout:g} s")
        raise SourceFailed(502, f"cannot reach the source: {failure.getErrorMessage()}")

    def render(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # The text is whatever the source sends: a browser must not guess it is HTML.
        request.setHeader(b"x-content-type-options", b"nosniff")
        d = self.fetch()
        d.addCallbacks(lambda body: (200, body), self._failure_answer, errbackArgs=(request,))
        d.addCallback(self._answer, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    def _failure_answer(self, failure, request) -> tuple[int, bytes] | None:
        if request.channel is None:
            return None  # the browser left, and its leaving cancelled the fetch
        if failure.check(SourceFailed):
            why = failure.value
            self.log.warn("{code} for {uri}: {why}", code=why.code, uri=request.uri, why=why)
        else:
            self.log.failure("fetching {source}", failure, source=self.source)
            why = SourceFailed(502, "unexpected error (see the log)")
        title = {502: "502 Bad Gateway", 504: "504 Gateway Timeout"}[why.code]
        return why.code, f"{title}: {why} (source {self.source}).\n".encode()

    def _answer(self, answer: tuple[int, bytes] | None, request) -> None:
        if answer is None or request.channel is None:
            return
        code, body = answer
        request.setResponseCode(code)
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()


class Options(usage.Options):
    synopsis = f"[--listen {DEFAULT_LISTEN}] [--source tcp:writer:7000] [--timeout 10]"
    longdesc = "Answer every HTTP request with the bytes a TCP source sends (the seed's port 8000)."
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Endpoint to listen on (loopback unless told otherwise)."],
        ["source", "s", DEFAULT_SOURCE, "Client endpoint of the source, e.g. tcp:writer:7000."],
        ["timeout", "t", DEFAULT_TIMEOUT,
         "Seconds the source may take to accept, and to stay silent, before a 504.", float],
        ["max-bytes", None, DEFAULT_MAX_BYTES, "Largest answer taken from the source.", int],
        *site_options(),
    ]

    def postOptions(self):
        if not self["timeout"] > 0:
            raise usage.UsageError("--timeout must be a positive number of seconds")
        if self["max-bytes"] < 0:
            raise usage.UsageError("--max-bytes cannot be negative")
        self["site"] = site_limits(self)
        from twisted.internet import reactor
        server_endpoint(reactor, "listen", self["listen"])  # bad ones: a usage error, not a traceback
        client_endpoint(reactor, "source", self["source"])


def makeService(config, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    listen = server_endpoint(reactor, "listen", config["listen"])
    source = client_endpoint(reactor, "source", config["source"])
    page = SourcePage(source, config["source"], config["timeout"], config["max-bytes"], reactor)
    return site_listener("dockpart-fileweb", listen, BoundedSite(page, config["site"]))
