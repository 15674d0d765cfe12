"""The twisted.web site every dockpart HTTP daemon serves through (web app, dashboard, fileweb).

Plain twisted.web reads a whole request body (into a temporary file) before any resource sees
it, parses a multipart form with the ``email`` package on the reactor thread, times a
connection out only after it falls silent, keeps an answer the client never reads for as long
as the connection lasts, and accepts connections without bound.  :class:`BoundedSite` does what
nginx and HAProxy do instead:

- a ``Content-Length`` over the route's limit is answered 413 from the head, before any body
  byte is read and before any resource (so before authentication) runs; a chunked body is cut
  at the limit (nginx ``client_max_body_size``);
- a form has at most ``max_form_parts`` parts or fields (Werkzeug's ``max_form_parts``, Django's
  ``DATA_UPLOAD_MAX_NUMBER_FIELDS``) and is split by byte searches, not line by line, so even
  the largest allowed upload is parsed in milliseconds;
- a request head must be complete within ``header_timeout`` seconds of the connection (or of
  the previous answer): 408, or a silent close for an idle keep-alive connection (nginx
  ``client_header_timeout``, HAProxy ``timeout http-request`` / ``http-keep-alive``);
- an answer the client stops taking is dropped after ``send_timeout`` seconds (nginx
  ``send_timeout``; counted from the moment the send buffer fills until it is drained, since
  twisted.web's transport says no more);
- at ``max_connections`` the port stops accepting (HAProxy ``maxconn``).

An early refusal is written straight to the transport with ``Connection: close``; the channel
then half-closes and discards what the client still sends (nginx's lingering close: until
it falls silent for :data:`LINGER` s, at most :data:`LINGER_TIME` s), so that the client reads
the answer instead of a reset.
"""

from __future__ import annotations

import enum
import resource
from collections import defaultdict
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from typing import BinaryIO

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import http, server

from dockpart.listening import ConnectionCap, Listener

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_SEND_TIMEOUT = 60.0
#: Parts of a multipart form, or fields of a urlencoded one (Werkzeug's and Django's 1000).
MAX_FORM_PARTS = 1000
#: Largest urlencoded form decoded (Werkzeug's ``max_form_memory_size``).
MAX_URLENCODED = 500 * 1024
#: Largest header block of one multipart part.
MAX_PART_HEAD = 8 * 1024
#: While a refused client's body is discarded: seconds it may fall silent (nginx's
#: ``lingering_timeout``), and seconds in all (``lingering_time``), before it is cut off.
LINGER = 5.0
LINGER_TIME = 30.0
#: The access log is written every ACCESS_LOG_INTERVAL seconds, or once ACCESS_LOG_BATCH lines
#: wait, whichever comes first.
ACCESS_LOG_INTERVAL = 1.0
ACCESS_LOG_BATCH = 1000


def default_max_connections() -> int:
    """HAProxy's way: from the descriptor limit, a quarter of it (a connection may hold a
    second descriptor, as fileweb's fetch does, and the daemon needs its own), 16 to 1024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


DEFAULT_MAX_CONNECTIONS = default_max_connections()

REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}


@dataclass(frozen=True)
class SiteLimits:
    """What one site accepts; ``route_bodies`` maps a path (no query) to its own body limit."""

    max_body: int = DEFAULT_MAX_BODY
    route_bodies: dict[bytes, int] = field(default_factory=dict)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_form_parts: int = MAX_FORM_PARTS

    def body_limit(self, target: bytes) -> int:
        path = target.split(b"?", 1)[0].rstrip(b"/") or b"/"
        return self.route_bodies.get(path, self.max_body)


class Refused(Exception):
    """A request answered early with ``code``; nothing ran."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


# -- forms


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def content_type(value: bytes | None) -> Message:
    """A ``Content-Type`` value as a header whose ``get_content_type`` and params can be read."""
    header = Message()
    header["content-type"] = (value or b"").decode("latin-1")
    return header


def form_fields(body: bytes, type_value: bytes | None,
                max_parts: int = MAX_FORM_PARTS) -> dict[bytes, list[bytes]]:
    """A POST body's form fields as twisted.web's ``request.args`` has them, or Refused."""
    if not body or not type_value:
        return {}
    header = content_type(type_value)
    kind = header.get_content_type()
    if kind == "application/x-www-form-urlencoded":
        if len(body) > MAX_URLENCODED:
            raise Refused(413, f"a urlencoded form is limited to {MAX_URLENCODED} bytes")
        if body.count(b"&") + body.count(b";") >= max_parts:
            raise Refused(413, f"a form is limited to {max_parts} fields")
        return http.parse_qs(body, 1)
    if kind == "multipart/form-data":
        boundary = header.get_param("boundary")
        if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
            raise Refused(400, "a multipart form needs a boundary of 1 to 70 characters")
        return multipart_fields(body, boundary.encode("latin-1"), max_parts)
    return {}


def multipart_fields(body: bytes, boundary: bytes,
                     max_parts: int = MAX_FORM_PARTS) -> dict[bytes, list[bytes]]:
    """RFC 7578 ``multipart/form-data`` by byte searches: each named part's raw bytes.

    The part count is checked before anything is split, and only each part's short header
    block goes through the ``email`` parser.
    """
    delimiter = b"\r\n--" + boundary
    body = b"\r\n" + body  # the first delimiter then has its CRLF too
    if body.count(delimiter) > max_parts + 1:
        raise Refused(413, f"a form is limited to {max_parts} parts")
    pieces = body.split(delimiter)
    fields: dict[bytes, list[bytes]] = defaultdict(list)
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            return fields  # the close delimiter; what follows is the epilogue
        piece = piece.lstrip(b" \t")
        if not piece.startswith(b"\r\n"):
            raise Refused(400, "malformed multipart form: no line break after a boundary")
        if piece.startswith(b"\r\n\r\n"):
            head, payload = b"", piece[4:]
        else:
            head, sep, payload = piece[2:].partition(b"\r\n\r\n")
            if not sep:
                raise Refused(400, "malformed multipart form: a part has no end of headers")
        if len(head) > MAX_PART_HEAD:
            raise Refused(400, f"a part's headers are limited to {MAX_PART_HEAD} bytes")
        name = BytesHeaderParser().parsebytes(head).get_param("name",
                                                              header="content-disposition")
        if name:
            fields[collapse_rfc2231_value(name).encode("utf-8")].append(payload)
    raise Refused(400, "malformed multipart form: no closing boundary")


# -- the channel


class Phase(enum.Enum):
    HEAD = "head"          # waiting for a request head; the header deadline runs
    BODY = "body"          # reading the body, counted against the route's limit
    HANDLING = "handling"  # a resource has the request
    REFUSED = "refused"    # answered early: discarding input until the client closes


MOVES = {
    Phase.HEAD: {Phase.BODY, Phase.REFUSED},
    Phase.BODY: {Phase.HANDLING, Phase.REFUSED},
    Phase.HANDLING: {Phase.HEAD, Phase.REFUSED},
    Phase.REFUSED: set(),
}


class BoundedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that enforces its site's :class:`SiteLimits` (see the module)."""

    log = Logger()
    transport: ITCPTransport  # a TCP (or UNIX) listener's connection, set before connectionMade
    site: "BoundedSite"  # set by Site.buildProtocol
    phase = Phase.HEAD
    admitted = False
    _target: bytes | None = None
    _head_bytes = False
    _body_limit = 0
    _body_size = 0
    _deadline = None
    _send_timer = None
    _linger = None

    @property
    def limits(self) -> SiteLimits:
        return self.site.limits

    def transition(self, phase: Phase) -> None:
        if phase not in MOVES[self.phase]:
            raise RuntimeError(f"channel: {self.phase.value} -> {phase.value} is not a move")
        self.phase = phase

    # -- connection

    def connectionMade(self):
        super().connectionMade()
        self.admitted = self.site.connections.admit()
        if not self.admitted:
            self.transport.abortConnection()
            return
        self._await_head()

    def connectionLost(self, reason: Failure = connectionDone):
        for name in ("_deadline", "_send_timer", "_linger"):
            self._cancel(name)
        if self.admitted:
            self.admitted = False
            self.site.connections.release()
        super().connectionLost(reason)

    def loseConnection(self):
        self._cancel("_deadline")  # closing (twisted.web's own 400s too): no head is awaited
        super().loseConnection()

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    # -- the head

    def _await_head(self) -> None:
        self._target, self._head_bytes = None, False
        self._cancel("_deadline")
        self._deadline = self.callLater(self.limits.header_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.phase is not Phase.HEAD:
            return
        if self._head_bytes:
            self.refuse(408, f"the request head took more than "
                             f"{self.limits.header_timeout:g} s")
        else:  # an idle keep-alive connection: nobody waits for an answer
            self.loseConnection()

    def dataReceived(self, data):
        if self.phase is Phase.REFUSED:
            self.resetTimeout()  # lingering: the body of a refused request goes nowhere
            return
        if self.phase is Phase.HEAD:
            self._head_bytes = True
        super().dataReceived(data)

    def lineReceived(self, line):
        if self.phase is Phase.HEAD and self._target is None and line:
            parts = line.split(b" ")  # the request line, for the route's body limit
            self._target = parts[1] if len(parts) == 3 else b""
        super().lineReceived(line)

    def allHeadersReceived(self):
        self._cancel("_deadline")
        self._body_limit = self.limits.body_limit(self._target or b"")
        self._body_size = 0
        if self.length is not None and self.length > self._body_limit:
            self.refuse(413, f"the body is limited to {self._body_limit} bytes here")
            return
        self.transition(Phase.BODY)
        super().allHeadersReceived()

    # -- the body

    def body_received(self, size: int) -> bool:
        """Count ``size`` more body bytes; False (and a 413) once over the route's limit."""
        if self.phase is not Phase.BODY:
            return False
        self._body_size += size
        if self._body_size > self._body_limit:
            self.refuse(413, f"the body is limited to {self._body_limit} bytes here")
            return False
        return True

    def rawDataReceived(self, data):
        if self.phase is not Phase.REFUSED:
            super().rawDataReceived(data)

    def allContentReceived(self):
        if self.phase is Phase.REFUSED:
            return
        self.transition(Phase.HANDLING)
        super().allContentReceived()

    def requestDone(self, request):
        if self.persistent and self.phase is Phase.HANDLING:
            self.transition(Phase.HEAD)  # before the pipelined data already here is parsed
            self._await_head()
        super().requestDone(request)

    # -- answers

    def refuse(self, code: int, text: str) -> None:
        """Answer ``code`` at once and close: half-close, discard the rest for a while."""
        if self.phase is Phase.REFUSED:
            return
        self.transition(Phase.REFUSED)
        self._cancel("_deadline")
        self.setTimeout(LINGER)  # twisted.web's idle timer, now the lingering one
        self.log.info("{code} to {peer}: {text}", code=code, text=text,
                      peer=str(self.transport.getPeer()))
        body = f"{code} {REASONS[code]}: {text}\n".encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (code, REASONS[code].encode(), len(body), body))
        self._linger = self.callLater(LINGER_TIME, self.transport.abortConnection)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        (half_close or self.transport.loseConnection)()

    def timeoutConnection(self):
        if self.phase is Phase.REFUSED:
            self.transport.abortConnection()  # it had its answer; no 15 s grace for it
        else:
            super().timeoutConnection()

    def pauseProducing(self):
        """The transport's buffer is full: the client has ``send_timeout`` s to drain it."""
        super().pauseProducing()
        if self._send_timer is None:
            self._send_timer = self.callLater(self.limits.send_timeout, self._send_too_slow)

    def resumeProducing(self):
        self._cancel("_send_timer")
        super().resumeProducing()

    def _send_too_slow(self) -> None:
        self._send_timer = None
        self.log.info("{peer} left its answer unread for {timeout:g} s: dropping its answer",
                      peer=str(self.transport.getPeer()), timeout=self.limits.send_timeout)
        self.transport.abortConnection()


class BoundedRequest(server.Request):
    """Counts its body against the channel's limit and parses forms with :func:`form_fields`."""

    channel: BoundedChannel
    content: BinaryIO  # made by gotLength before any body byte
    _form: dict[bytes, list[bytes]] = {}

    def __init__(self, channel, *args, **kw):
        kw["parsePOSTFormSubmission"] = False  # form_fields does it, bounded
        super().__init__(channel, *args, **kw)

    def handleContentChunk(self, data):
        if self.channel.body_received(len(data)):
            super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        type_value = self.requestHeaders.getRawHeaders(b"content-type", [None])[0]
        if command == b"POST" and content_type(type_value).get_content_type() in FORM_TYPES:
            self.content.seek(0)
            try:
                self._form = form_fields(self.content.read(), type_value,
                                         self.channel.limits.max_form_parts)
            except Refused as e:
                self.channel.refuse(e.code, str(e))
                return
            self.content.seek(0, 2)  # where twisted.web expects it: at the end
        super().requestReceived(command, path, version)

    def process(self):
        self.args.update(self._form)  # as twisted.web's own parse: the body's fields win
        super().process()


# -- the access log


def _escaped(value: bytes) -> str:
    """``value`` as Twisted's combined log format writes it (``http._escape``), with the
    usual field, printable ASCII with no quote or backslash, taken as it is."""
    text = value.decode("latin-1")
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return http._escape(value)


def combined_log_line(timestamp: str, request, uri: bytes | None = None) -> str:
    """The line ``twisted.web.http.combinedLogFormatter`` writes for ``request`` (with ``uri``
    in place of its URI when given), built in about a third of its time."""
    address = request.getClientAddress()
    ip = address.host if isinstance(address, (IPv4Address, IPv6Address)) else "-"  # no escapes
    headers = request.requestHeaders
    referrer = headers.getRawHeaders(b"referer", (b"-",))[-1] or b"-"
    agent = headers.getRawHeaders(b"user-agent", (b"-",))[-1] or b"-"
    return (f'"{ip}" - - {timestamp} '
            f'"{_escaped(request.method)} {_escaped(request.uri if uri is None else uri)} '
            f'{_escaped(request.clientproto)}" {request.code:d} {request.sentLength or "-"} '
            f'"{_escaped(referrer)}" "{_escaped(agent)}"')


#: Not a class attribute: a Logger there would be named after the class; the log shows
#: ``[dockpart.access#info]``.
_access_log = Logger(namespace="dockpart.access")


class AccessLog:
    """Where a site's access log lines go: into twistd's log, many lines to one event.

    One log event per request cost about a third of the CPU time of dockpart-web's ``GET /``;
    the lines are kept and written together every ``interval`` seconds, once ``batch`` lines
    wait, and when the site stops (so a clean stop loses none).
    """

    def __init__(self, clock, interval: float = ACCESS_LOG_INTERVAL,
                 batch: int = ACCESS_LOG_BATCH):
        self._lines: list[str] = []
        self._batch = batch
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock
        self._loop.start(interval, now=False)

    def write(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            text, self._lines = "".join(self._lines).rstrip("\n"), []
            _access_log.info("{lines}", lines=text)

    def close(self) -> None:
        if self._loop.running:
            self._loop.stop()
        self.flush()


class BoundedSite(server.Site):
    """A Site whose channels and requests keep to ``limits``; ``connections`` is its cap.

    Its access log (unless ``access_log`` is False) is an :class:`AccessLog`, in Twisted's
    combined format (:func:`combined_log_line` unless ``logFormatter`` is given).
    """

    protocol = BoundedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 upgrade
    requestFactory = BoundedRequest

    def __init__(self, resource, limits: SiteLimits = SiteLimits(), access_log: bool = True,
                 **kw):
        kw.setdefault("logFormatter", combined_log_line)
        super().__init__(resource, **kw)
        self.limits = limits
        self.connections = ConnectionCap(limits.max_connections)
        self.noisy = False
        self.access_log = access_log

    def startFactory(self):
        super().startFactory()
        if self.access_log and not self.logPath:
            self.logFile = AccessLog(self.reactor)

    def log(self, request):
        """One line per request, unless turned off."""
        if self.access_log:
            super().log(request)


def site_listener(name: str, endpoint, site: BoundedSite) -> Listener:
    """The listening service for ``site``, its port paused while the connection cap is full."""
    return Listener(name, endpoint, site, site.connections)


# -- options


def site_options(prefix: str = "") -> list:
    """``--[PREFIX]max-connections``, ``header-timeout``, ``send-timeout`` for a daemon's Options."""
    return [
        [f"{prefix}max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "Connections at once at most; more wait in the listen queue (default: a quarter of "
         "the descriptor limit, at most 1024).", int],
        [f"{prefix}header-timeout", None, DEFAULT_HEADER_TIMEOUT,
         "Seconds a request head may take in all (also an idle keep-alive's lifetime).", float],
        [f"{prefix}send-timeout", None, DEFAULT_SEND_TIMEOUT,
         "Seconds a client has to take what fills the send buffer before its answer is "
         "dropped.", float],
    ]


def site_limits(config, prefix: str = "", **bodies) -> SiteLimits:
    """The SiteLimits that ``site_options(prefix)`` chose (UsageError for a bad value);
    ``bodies`` are SiteLimits' ``max_body`` and ``route_bodies``."""
    if config[f"{prefix}max-connections"] < 1:
        raise usage.UsageError(f"--{prefix}max-connections must be at least 1")
    for name in ("header-timeout", "send-timeout"):
        if not config[prefix + name] > 0:
            raise usage.UsageError(f"--{prefix}{name} must be a positive number of seconds")
    return SiteLimits(header_timeout=config[f"{prefix}header-timeout"],
                      send_timeout=config[f"{prefix}send-timeout"],
                      max_connections=config[f"{prefix}max-connections"], **bodies)
