"""The HTTP/1.1 reverse proxy protocol of dockpart-proxy, at the protocol level for speed.

A client connection (:class:`ClientConnection`) parses requests with httptools and hands each
to an :class:`Exchange`, which borrows a persistent connection to a backend
(:class:`BackendConnection`) from that backend's pool.  Bodies stream through in both
directions: each transport is registered as the producer of the other, as in
``twisted/protocols/portforward.py``, so a slow reader pauses the fast writer instead of
filling memory.  After a backend's ``101`` the two connections become a plain byte tunnel.

Framing is the point where a proxy gets smuggled through, so each message is framed from the
same view of its headers as what is forwarded (:func:`end_to_end`), anything ambiguous is
refused rather than guessed, a refused request stops the parser, and a backend connection goes
back to the pool only when its response ended cleanly (:class:`Phase`).  The states are
explicit: :class:`Phase` for a backend connection, :class:`Reply` for an exchange's answer.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass

from dockpart.http_parser import httptools  # httptools, or on PyPy its equivalent http11
from twisted.internet import defer, protocol, tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from dockpart.proxy_backends import MAX_IDLE, Backend, BackendSet

#: RFC 9110 7.6.1, plus the Proxy-* family (checked by prefix).
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade"])
#: Request headers the proxy sets itself (X-Forwarded-For is appended to).
OWN_HEADERS = frozenset([b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"])
#: Headers whose values the proxy needs (framing, forwarding).
WATCHED = frozenset([b"host", b"x-forwarded-for", b"content-length", b"transfer-encoding",
                     b"connection"])
#: Headers that decide where a message ends or where it goes: never dropped by Connection.
FRAMING = frozenset([b"content-length", b"transfer-encoding", b"host"])
#: Connection tokens that name no header.
CONNECTION_OPTIONS = frozenset([b"keep-alive", b"close", b"upgrade"])
NO_BODY_STATUS = frozenset([204, 304])
#: Methods a request may be sent again with (RFC 9110 9.2.2).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
#: A Host value: RFC 3986's reg-name / IP-literal characters and an optional port.
HOST_VALUE = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
#: Pooled connections idle longer are not reused: backends close theirs after a few seconds
#: (node's default is 5 s), and a request on a connection closing under it may be lost.
POOL_IDLE_TIME = 4.0

REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed",
           408: b"Request Timeout", 431: b"Request Header Fields Too Large",
           505: b"HTTP Version Not Supported",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


@dataclass
class Limits:
    """The answers a slow or greedy peer gets, in seconds and bytes."""
    max_header_size: int = 16384
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    connect_timeout: float = 3.0
    backend_timeout: float = 30.0
    first_read_wait: float = 2.0
    #: Per try, for an idempotent request without a body: past it with no byte of an answer,
    #: the request is sent once to another backend (None: no such retry).
    try_timeout: float | None = None


class Stats:
    """Counters for the admin listener."""

    def __init__(self):
        self.requests = 0
        self.responses: dict[int, int] = {}
        self.connections = 0
        self.retries = 0
        self.tunnels = 0


class Refused(Exception):
    """A message the proxy will not forward: its framing or routing is ambiguous."""


def end_to_end(headers, out: list, skip=frozenset(), upgrade: bool = False) -> dict:
    """Append the headers to forward to ``out`` as ``Name: value`` lines.

    Hop-by-hop headers (and the ones ``Connection`` names) and those in ``skip`` stay behind;
    ``Upgrade`` and ``Connection`` go on when ``upgrade``.  Returns the values of the
    WATCHED headers by lower-case name (repeated ones joined with ", "), from the same view
    as what is forwarded: a header ``Connection`` names is neither forwarded nor returned.
    Raises :class:`Refused` for a second ``Host`` and for ``Connection`` naming a header that
    frames or routes the message (``Content-Length``, ``Transfer-Encoding``, ``Host``): the
    proxy would frame by a header the next hop never sees.
    """
    seen = {}
    start = len(out)
    append = out.append
    for name, value in headers:
        lname = name.lower()
        if lname in WATCHED:
            if lname in seen:
                if lname == b"host":
                    raise Refused("two Host headers")
                seen[lname] = seen[lname] + b", " + value
            else:
                seen[lname] = value
        if lname in HOP_BY_HOP or lname in skip or lname[:6] == b"proxy-":
            if upgrade and (lname == b"upgrade" or lname == b"connection"):
                append(name + b": " + value)
            continue
        append(name + b": " + value)
    connection = seen.get(b"connection")
    if connection is not None:
        named = {t.strip().lower() for t in connection.split(b",")} - CONNECTION_OPTIONS
        if named:
            if not named.isdisjoint(FRAMING):
                raise Refused("Connection names a header that frames or routes the message: "
                              + ", ".join(sorted(t.decode("latin-1") for t in named & FRAMING)))
            out[start:] = [line for line in out[start:]
                           if line.split(b":", 1)[0].lower() not in named]
            for lname in named & WATCHED:
                seen.pop(lname, None)
    return seen


def codings(value: bytes) -> list[bytes]:
    """The transfer codings of a ``Transfer-Encoding`` value, lower-cased, in order."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def direct_writer(transport):
    """``transport.write`` that sends at once when nothing is queued.

    Twisted's TCP transport queues every write until the next reactor turn, which costs two
    epoll changes and a loop iteration per response; a proxy forwarding small messages
    spends most of its time there.  Whatever the socket does not take goes through the
    ordinary ``write`` (and so through flow control).  Other transports (TLS) are left alone.

    Twisted has no public "is anything queued?": this reads ``tcp.Connection``'s private
    ``_tempDataLen``, ``dataBuffer`` and ``_writeDisconnected``, which is why pyproject.toml
    pins Twisted's range and ``test_direct_writer_finds_the_twisted_internals_it_reads``
    fails loudly when they move.
    """
    if not isinstance(transport, tcp.Connection) or ISSLTransport.providedBy(transport):
        return transport.write
    write = transport.write
    sock = transport.socket

    def send(data: bytes) -> None:
        if transport._tempDataLen or transport.dataBuffer or not transport.connected \
                or transport.disconnecting or transport._writeDisconnected:
            return write(data)
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return write(data)  # its doWrite reports the error and closes
        if sent < len(data):
            write(data[sent:])

    return send


def _no_delay(transport) -> None:
    """Small responses leave at once (no Nagle delay), on transports that have the option."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def _produce(transport, producer) -> None:
    """Register ``producer`` as the streaming producer feeding ``transport`` (once)."""
    current = transport.producer
    if current is not producer:
        if current is not None:
            transport.unregisterProducer()
        transport.registerProducer(producer, True)


class _Throttle:
    """The producer registered on a peer's transport: its full buffer pauses our reading."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def pauseProducing(self):
        self.conn.pause_reading("peer")

    def resumeProducing(self):
        self.conn.resume_reading("peer")

    def stopProducing(self):
        pass


class _Reading:
    """Pausing reads for several reasons at once (peer full, request queued, ...)."""

    transport = None
    _paused: set = frozenset()

    def pause_reading(self, reason: str) -> None:
        if not self._paused:
            self._paused = {reason}
            if self.transport is not None:
                self.transport.pauseProducing()
        else:
            self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None:
                self.transport.resumeProducing()


class Reply(enum.Enum):
    """How far the answer to an exchange has gone; :meth:`Exchange.reply_moves` moves it."""

    AWAITED = "awaited"      # nothing written to the client yet: it may still be retried
    STREAMING = "streaming"  # a response head went to the client; its body may follow
    DONE = "done"            # the answer is complete (the backend's, or one of ours)


#: AWAITED -> DONE is an answer of our own (502, 503, 504, 408) or a response without a body.
REPLY_MOVES = {Reply.AWAITED: {Reply.STREAMING, Reply.DONE}, Reply.STREAMING: {Reply.DONE},
               Reply.DONE: set()}


class Exchange:
    """One request and its response, from the first attempt to the last byte."""

    __slots__ = ("client", "head", "version", "upgrade", "chunked_in",
                 "has_body", "pending", "request_done", "backend", "conn", "tried", "sent_body",
                 "status", "chunked_out", "close_after", "reply",
                 "started", "head_only", "host", "reread", "early", "idempotent", "retried",
                 "client_slow")

    def __init__(self, client, method, head, version, keep_alive, upgrade, chunked_in, has_body,
                 host):
        self.client = client
        self.head = head  # request line and headers to send, without the final CRLF
        self.version = version
        self.upgrade = upgrade
        self.chunked_in = chunked_in
        self.has_body = has_body
        self.host = host
        self.pending: list[bytes] = []  # request bytes waiting for a backend connection
        self.request_done = False
        self.backend: Backend | None = None
        self.conn: BackendConnection | None = None
        self.tried: list = []
        self.sent_body = False
        self.status = 0
        self.chunked_out = False
        self.close_after = not keep_alive
        self.reply = Reply.AWAITED
        self.started = 0.0
        self.head_only = method == b"HEAD"
        self.reread = False  # the list was read again before answering 503
        self.early: list[bytes] = []  # bytes after an Upgrade head, held until a 101
        # Without a body, sending it again cannot do twice what the client asked once.
        self.idempotent = method in IDEMPOTENT and not has_body
        self.retried = False  # sent again after its try timed out
        self.client_slow = False  # the client was given time to read a stalled response

    @property
    def responded(self) -> bool:
        """Something of the answer went to the client: it can no longer be retried."""
        return self.reply is not Reply.AWAITED

    @property
    def response_done(self) -> bool:
        return self.reply is Reply.DONE

    def reply_moves(self, to: Reply) -> None:
        if to not in REPLY_MOVES[self.reply]:
            raise AssertionError(f"an exchange's reply cannot go from {self.reply} to {to}")
        self.reply = to


class ClientConnection(_Reading, protocol.Protocol):
    """A client's connection: requests in order, one exchange at a time."""

    log = Logger()

    def connectionMade(self):
        factory = self.factory
        self.clock = factory.clock
        self.limits = factory.limits
        _no_delay(self.transport)
        self.write = direct_writer(self.transport)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None
        self.parsing = False
        self.tunnel_to = None  # the backend connection once upgraded
        self.upgraded = False
        self.closed = False
        self.pending_head = 0
        self.refusal = None  # (code, text, head_only) of a request refused behind others
        self._head_request = False
        self._head_began = False
        self._url = b""
        self._headers: list = []
        self._throttle = _Throttle(self)
        self._producing_for = None
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "").encode()
        self.proto = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
        self.deadline = self.clock.seconds() + self.limits.idle_timeout
        factory.clients.add(self)
        factory.stats.connections += 1

    # Reading.

    def dataReceived(self, data):
        if self.closed or self.refusal is not None:
            return
        if self.upgraded:
            return self._tunnel_in(data)
        self._head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            rest = data[e.args[0]:]
            if rest:
                self._tunnel_in(rest)
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Refused):
                return  # refuse() stopped the parser: nothing after that head is read
            self.log.failure("handling a request")
            return self.abort()
        except httptools.HttpParserError as e:
            try:  # an answer to HEAD has no body, even this one
                head = self.parser.get_method() == b"HEAD"
            except httptools.HttpParserError:
                head = False
            return self.refuse(400, f"malformed request: {e}\n", head_only=head)
        if self.parsing and not self.closed:
            # A head begun in this read counts from its start, not from the read's (the read
            # may hold the body of a request before it); one that goes on counts every byte.
            self.pending_head = (self._head_size if self._head_began
                                 else self.pending_head + len(data))
            if self.pending_head > self.limits.max_header_size:
                self.refuse(431, "request headers are too large\n")

    def on_message_begin(self):
        self.parsing = True
        self._head_began = True
        self.pending_head = 0
        self._url = b""
        self._headers = []
        self._head_size = 0
        if self.current is None:
            self.deadline = self.clock.seconds() + self.limits.header_timeout

    def on_url(self, url):
        self._url += url
        self._head_size += len(url)

    def on_header(self, name, value):
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.limits.max_header_size:
            self.refuse(431, "request headers are too large\n")
            raise _Refused()

    def on_headers_complete(self):
        self.parsing = False
        if self.closed:
            return
        parser = self.parser
        method = parser.get_method()
        self._head_request = method == b"HEAD"
        url = self._url
        if method == b"CONNECT":
            return self._refuse_head(405, "CONNECT is not served: this is not a forward proxy\n")
        if not url.startswith(b"/") and url != b"*":
            try:
                parts = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                return self._refuse_head(400, "malformed request target\n")
            here = self.transport.getHost()
            port = parts.port or (443 if parts.schema == b"https" else 80)
            own_host = getattr(here, "host", "").encode()
            if parts.host not in (own_host, b"localhost") or port != getattr(here, "port", None):
                return self._refuse_head(403, "dockpart-proxy only serves its own backends; "
                                        "it is not a forward proxy\n")
            url = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            return self._refuse_head(505, "only HTTP/1.0 and HTTP/1.1 are served\n")
        upgrade = parser.should_upgrade()
        out = [method + b" " + url + b" HTTP/1.1"]
        append = out.append
        try:
            seen = end_to_end(self._headers, out, OWN_HEADERS, upgrade)
        except Refused as e:
            return self._refuse_head(400, f"{e}\n")
        host = seen.get(b"host")
        if host is None:
            if version == "1.1":
                return self._refuse_head(400, "an HTTP/1.1 request needs a Host header\n")
        elif not HOST_VALUE.fullmatch(host):
            return self._refuse_head(400, "the Host header is not a valid host[:port]\n")
        forwarded_for = seen.get(b"x-forwarded-for")
        coded = seen.get(b"transfer-encoding")
        chunked = coded is not None
        has_body = chunked or seen.get(b"content-length", b"0").strip() != b"0"
        if upgrade and has_body:
            # The parser takes what follows an Upgrade head as the new protocol's bytes.
            return self._refuse_head(400, "an Upgrade request cannot carry a body here\n")
        if chunked:
            # The parser accepts only codings that end in one chunked; the others go on.
            append(b"Transfer-Encoding: " + b", ".join(codings(coded)))
        peer_ip = self.peer_ip  # empty on a UNIX socket
        if forwarded_for or peer_ip:
            append(b"X-Forwarded-For: " + (forwarded_for + b", " + peer_ip
                                            if forwarded_for and peer_ip
                                            else forwarded_for or peer_ip))
        append(b"X-Forwarded-Proto: " + self.proto)
        if host is not None:
            append(b"X-Forwarded-Host: " + host)
        exchange = Exchange(self, method, out, version, parser.should_keep_alive(), upgrade,
                            chunked, has_body, host)
        # A request without a body is complete with its headers: an answer of ours (503)
        # may then keep the connection open.
        exchange.request_done = not has_body and not upgrade
        self.factory.stats.requests += 1
        if self.current is None:
            self.current = exchange
            self.factory.start(exchange)
        else:
            self.queue.append(exchange)
            self.pause_reading("queued")

    def on_body(self, body):
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is None:
            return
        if exchange.chunked_in:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        conn = exchange.conn
        if conn is not None and conn.exchange is exchange:
            if not exchange.responded:
                self.deadline = self.clock.seconds() + self.limits.idle_timeout
            if not exchange.sent_body:
                exchange.sent_body = True
                _produce(conn.transport, self._throttle)
                self._producing_for = conn
            conn.write(body)
        else:
            exchange.pending.append(body)
            if len(exchange.pending) > 8:
                self.pause_reading("no backend yet")

    def on_message_complete(self):
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is None:
            return
        exchange.request_done = True
        conn = exchange.conn
        attached = conn is not None and conn.exchange is exchange
        if exchange.chunked_in:
            if attached:
                conn.write(b"0\r\n\r\n")
            else:
                exchange.pending.append(b"0\r\n\r\n")
        if attached and not exchange.responded:
            self.deadline = self.clock.seconds() + self.factory.answer_wait(exchange)

    # Answers of the proxy itself.

    def _refuse_head(self, code: int, text: str):
        """Refuse the request whose head was just parsed, and stop the parser on it."""
        self.refuse(code, text, head_only=self._head_request)
        raise _Refused()

    def refuse(self, code: int, text: str, head_only: bool = False) -> None:
        """Answer ``code`` and close, once the requests before this one are answered.

        Nothing the client sent after the refused request is read: its body could be
        anything, including what looks like further requests.
        """
        if self.refusal is not None or self.closed:
            return
        self.refusal = (code, text, head_only)
        self.parsing = False
        self.pause_reading("refused")
        if self.current is None and not self.queue:
            self.answer(code, text, head_only=head_only)

    def answer(self, code: int, text: str, close: bool = True, head_only: bool = False) -> None:
        """A response of our own; closes the connection unless told otherwise."""
        if self.closed:
            return
        body = text.encode()
        self.factory.stats.responses[code] = self.factory.stats.responses.get(code, 0) + 1
        self.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (
                code, REASONS.get(code, b"Error"), len(body),
                b"Connection: close\r\n" if close else b"", b"" if head_only else body))
        if close:
            self.closed = True
            self.parsing = False
            self.transport.loseConnection()

    def fail_exchange(self, exchange: Exchange, code: int, text: str) -> None:
        """The exchange ends in an answer of ours; keep the connection if the request is read."""
        if exchange.responded:
            return self.abort()
        exchange.reply_moves(Reply.DONE)
        keep = exchange.request_done and not exchange.close_after and not exchange.upgrade
        self.answer(code, text, close=not keep, head_only=exchange.head_only)
        if keep:
            self.exchange_done(exchange)

    # Writing responses.

    def response_head(self, exchange: Exchange) -> None:
        """The backend's response head is about to be written: its body may stream."""
        exchange.reply_moves(Reply.STREAMING)
        if exchange.backend is not None and exchange.conn is not None:
            conn = exchange.conn
            if not exchange.head_only:
                _produce(self.transport, conn.throttle)
                conn.producing_for_client = True
        stats = self.factory.stats
        stats.responses[exchange.status] = stats.responses.get(exchange.status, 0) + 1

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is complete: next request, idle, or close."""
        if exchange is not self.current:
            return
        self.current = None
        if self._producing_for is not None:
            conn, self._producing_for = self._producing_for, None
            if conn.transport is not None and conn.transport.producer is self._throttle:
                conn.transport.unregisterProducer()
            self.resume_reading("peer")
        if self.closed:
            return
        if exchange.close_after or exchange.upgrade or not exchange.request_done:
            self.closed = True
            self.transport.loseConnection()
            return
        self.resume_reading("no backend yet")
        if not self.queue and self.refusal is not None:
            return self.answer(*self.refusal[:2], head_only=self.refusal[2])
        if self.queue:
            self.current = self.queue.popleft()
            self.factory.start(self.current)
            if not self.queue and not self.current.request_done:
                self.resume_reading("queued")
        else:
            self.resume_reading("queued")
            self.deadline = self.clock.seconds() + (
                self.limits.header_timeout if self.parsing else self.limits.idle_timeout)

    def detach_producer(self, conn) -> None:
        """``conn`` stops feeding this transport (its response ended or it went away)."""
        if self.transport.producer is conn.throttle:
            self.transport.unregisterProducer()

    # Tunnels (after a 101).

    def _tunnel_in(self, data):
        exchange = self.queue[-1] if self.queue else self.current
        tunnel = self.tunnel_to
        if tunnel is not None:
            tunnel.write(data)
        elif exchange is not None and exchange.upgrade:
            # Not the backend's yet: it may refuse to switch, and then these bytes are no
            # part of any request it was sent (the connection closes after its answer).
            exchange.early.append(data)
            self.pause_reading("upgrading")
        # Anything else after an upgrade request that was refused is dropped with the close.

    def start_tunnel(self, conn) -> None:
        self.tunnel_to = conn
        self.factory.stats.tunnels += 1
        self.deadline = None
        self.resume_reading("queued")
        self.resume_reading("upgrading")
        if self._producing_for is None:
            _produce(conn.transport, self._throttle)
            self._producing_for = conn

    # Time limits and endings.

    def expire(self, now: float) -> None:
        self.deadline = None
        exchange = self.current
        if exchange is None:
            if self.parsing:
                self.answer(408, "the request headers took too long\n")
            else:
                self.closed = True
                self.transport.loseConnection()
            return
        conn = exchange.conn
        backend = exchange.backend
        if exchange.responded:
            if conn is not None and "peer" in conn._paused:
                # The backend waits for this client to read: the client's own limit applies.
                if not exchange.client_slow:
                    exchange.client_slow = True
                    self.deadline = now + self.limits.idle_timeout
                    return
            elif backend is not None and conn is not None:
                self.log.warn("backend {url} stalled in the middle of a response",
                              url=backend.url)
                self.factory.backends.failed(backend)
            return self.abort()
        stalled = not exchange.request_done
        if conn is not None:
            conn.exchange = exchange.conn = None
            conn.drop()
        if backend is not None:
            backend.active -= 1
            exchange.backend = None
            if not stalled:
                # Time-outs count as failures: a hung backend leaves the rotation.
                self.log.warn("backend {url} did not answer in time", url=backend.url)
                self.factory.backends.failed(backend)
        if stalled:
            self.fail_exchange(exchange, 408, "the request body stopped coming\n")
        elif not self.factory.try_elsewhere(exchange):
            self.fail_exchange(exchange, 504, "the backend did not answer in time\n")

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        self.closed = True
        self.factory.clients.discard(self)
        exchange, self.current = self.current, None
        if exchange is not None and exchange.conn is not None and not exchange.response_done:
            exchange.conn.drop()
        if self.tunnel_to is not None:
            self.tunnel_to.drop()
        self.queue.clear()


class Phase(enum.Enum):
    """Where a backend connection is in its life; :meth:`BackendConnection.transition` moves it."""

    IDLE = "idle"            # connected, no exchange: pooled or about to be
    AWAITING = "awaiting"    # a request sent (its body may still stream), no final head yet
    BODY = "body"            # the response head went to the client, its body streams
    SETTLING = "settling"    # the response ended inside the read being parsed
    TUNNEL = "tunnel"        # after a 101: bytes both ways, no HTTP
    CLOSED = "closed"        # closing or closed: never lent again


#: The moves a backend connection may make; anything else is a bug, and closes it.
MOVES = {
    Phase.IDLE: {Phase.AWAITING, Phase.CLOSED},
    Phase.AWAITING: {Phase.BODY, Phase.SETTLING, Phase.TUNNEL, Phase.CLOSED},
    Phase.BODY: {Phase.SETTLING, Phase.CLOSED},
    Phase.SETTLING: {Phase.IDLE, Phase.CLOSED},
    Phase.TUNNEL: {Phase.CLOSED},
    Phase.CLOSED: {Phase.CLOSED},
}


class BackendConnection(_Reading, protocol.Protocol):
    """A persistent connection to one backend, lent to one exchange at a time.

    A response that ends inside a read is settled only once the whole read is parsed
    (:attr:`Phase.SETTLING`): bytes after its end (a body after ``HEAD``, ``204`` or ``304``,
    a second response) mean the backend and the proxy disagree on framing, and the
    connection is closed rather than lent to the next request.
    """

    log = Logger()

    def __init__(self, backend: Backend, factory):
        self.backend = backend
        self.proxy = factory
        self.phase = Phase.IDLE
        self.exchange: Exchange | None = None
        self.parser = None
        self.throttle = _Throttle(self)
        self.producing_for_client = False
        self.tunnel = None
        self._reason = b""
        self._headers: list = []
        self.got_bytes = False
        self.until_close = False
        self.keep = False  # the settling response allows another on this connection
        self.stray = False  # bytes came after the end of a response
        # What one read of the backend produced for the client, written at once.
        self.out: list[bytes] = []
        self.out_to = None
        self.idle_since = 0.0

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def transition(self, to: Phase) -> None:
        if to not in MOVES[self.phase]:
            self.log.error("backend connection: no move from {old} to {new}",
                           old=self.phase.value, new=to.value)
            to = Phase.CLOSED
        self.phase = to
        if to is Phase.CLOSED and self.transport is not None:
            self.transport.loseConnection()

    def connectionMade(self):
        _no_delay(self.transport)  # small requests leave at once
        self.write = direct_writer(self.transport)
        connector, self.factory = self.factory, None
        if connector is not None:
            self.proxy.connected(self, connector.exchange)

    # Sending.

    def send(self, exchange: Exchange) -> None:
        self.transition(Phase.AWAITING)
        self.exchange = exchange
        exchange.conn = self
        self.got_bytes = False
        self.stray = False
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)
        self.out_to = exchange.client
        head = exchange.head
        if exchange.host is None:
            head = head + [b"Host: " + self.backend.authority]
        data = b"\r\n".join(head) + b"\r\n\r\n"
        if exchange.pending:
            data += b"".join(exchange.pending)
            exchange.pending.clear()
        self.write(data)
        client = exchange.client
        exchange.sent_body = exchange.has_body
        if exchange.has_body and not exchange.request_done:
            _produce(self.transport, client._throttle)
            client._producing_for = self
        client.resume_reading("no backend yet")
        exchange.started = self.proxy.clock.seconds()
        # The answer is awaited from the end of the request (see on_message_complete);
        # until then the body must keep coming (see on_body).
        limits = self.proxy.limits
        client.deadline = exchange.started + (
            self.proxy.answer_wait(exchange) if exchange.request_done else limits.idle_timeout)

    # Receiving.

    def dataReceived(self, data):
        phase = self.phase
        if phase is Phase.TUNNEL:
            return self.tunnel.write(data)
        if phase is not Phase.AWAITING and phase is not Phase.BODY:
            # An idle connection has nothing to say; whatever it is, it cannot be reused.
            return self.drop()
        self.got_bytes = True
        if phase is Phase.BODY:
            # Every read from the backend restarts its time limit, mid-body too.
            exchange = self.exchange
            exchange.client_slow = False
            exchange.client.deadline = self.proxy.clock.seconds() + \
                self.proxy.limits.backend_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.flush()
            rest = data[e.args[0]:]
            if self.tunnel is not None and rest:
                self.tunnel.write(rest)
        except httptools.HttpParserCallbackError as e:
            self.out = []
            if self.phase is Phase.SETTLING:
                self.stray = True
            elif isinstance(e.__context__, _BadResponse):
                self.bad_response(str(e.__context__))
            else:
                self.log.failure("handling a response from {url}", url=self.backend.url)
                self.bad_response("the proxy failed handling the backend's response")
        except httptools.HttpParserError as e:
            if self.phase is Phase.SETTLING:
                self.stray = True  # what follows the response is not even HTTP
            else:
                self.out = []
                self.bad_response(f"malformed response: {e}")
        if self.out:
            self.flush()
        if self.phase is Phase.SETTLING:
            self._settle()

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.out_to.write(out[0] if len(out) == 1 else b"".join(out))

    def on_message_begin(self):
        if self.phase is Phase.SETTLING:
            self.stray = True

    def on_status(self, reason):
        self._reason += reason

    def on_header(self, name, value):
        self._headers.append((name, value))

    def on_headers_complete(self):
        if self.phase is not Phase.AWAITING:
            self.stray = True
            return
        exchange = self.exchange
        parser = self.parser
        status = parser.get_status_code()
        client = exchange.client
        now = self.proxy.clock.seconds()
        backend = self.backend
        if status < 200 and status != 101:
            # An interim answer (100 Continue): passed on; the final one follows.
            self.out.append(b"HTTP/1.1 %d %s\r\n\r\n" % (status, self._reason))
            self._reason = b""
            self._headers = []
            return
        headers = self._headers
        self._headers = []
        out = [b"HTTP/1.1 %d %s" % (status, self._reason)]
        self._reason = b""
        append = out.append
        try:
            seen = end_to_end(headers, out, upgrade=status == 101)
        except Refused as e:
            raise _BadResponse(str(e)) from None
        no_body = exchange.head_only or status in NO_BODY_STATUS or status == 101
        length = b"content-length" in seen
        coded = seen.get(b"transfer-encoding")
        chunked_in = False
        others: list = []
        if coded is not None:
            them = codings(coded)
            chunked_in = them[-1] == b"chunked"
            others = them[:-1] if chunked_in else them
            if b"chunked" in others:
                raise _BadResponse("chunked applied twice")
        # With codings other than chunked and no final chunked, the close ends the body.
        self.until_close = not (no_body or length or chunked_in)
        if no_body or (length and not coded):
            pass
        elif others:
            # The sender's own codings (gzip, ...) go on; only chunked is ours to redo.
            if exchange.version != "1.1":
                raise _BadResponse("transfer codings an HTTP/1.0 client cannot take")
            if chunked_in:
                exchange.chunked_out = True
                append(b"Transfer-Encoding: " + b", ".join(others) + b", chunked")
            else:
                exchange.close_after = True
                append(b"Transfer-Encoding: " + b", ".join(others))
        elif exchange.version == "1.1":
            exchange.chunked_out = True
            append(b"Transfer-Encoding: chunked")
        else:
            exchange.close_after = True
        backend.timed(now - exchange.started)
        client.deadline = now + self.proxy.limits.backend_timeout
        exchange.status = status
        if status == 101:
            self.tunnel = client
        elif exchange.close_after or exchange.upgrade or not exchange.request_done:
            exchange.close_after = True
            append(b"Connection: close")
        elif exchange.version != "1.1":
            append(b"Connection: keep-alive")
        client.response_head(exchange)
        self.out.append(b"\r\n".join(out) + b"\r\n\r\n")
        if status == 101:
            self.transition(Phase.TUNNEL)
            self.exchange = None
            backend.active -= 1
            self.flush()
            client.start_tunnel(self)
            if exchange.early:
                self.write(b"".join(exchange.early))
                exchange.early.clear()
        elif exchange.head_only:
            # The parser cannot be told the response to HEAD has no body: it would wait for
            # the one the head announces, so this connection serves no other request.
            self._response_complete(keep=False)
        else:
            self.transition(Phase.BODY)

    def on_body(self, body):
        if self.phase is not Phase.BODY:
            self.stray = True
            return
        if self.exchange.chunked_out:
            self.out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def on_message_complete(self):
        phase = self.phase
        if phase is Phase.AWAITING:
            return  # the end of an interim (1xx) answer
        if phase is not Phase.BODY:
            if phase is Phase.SETTLING:
                self.stray = True
            return
        if self.exchange.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self._response_complete(keep=self.parser.should_keep_alive())

    def _response_complete(self, keep: bool) -> None:
        """The response ended in this read; :meth:`_settle` finishes once the read is parsed."""
        self.transition(Phase.SETTLING)
        self.keep = keep
        exchange = self.exchange
        exchange.reply_moves(Reply.DONE)
        backend = self.backend
        backend.requests += 1
        backend.active -= 1

    def _settle(self) -> None:
        """After the read that ended a response: pool the connection or close it, then let
        the client go on."""
        self.flush()
        exchange, self.exchange = self.exchange, None
        exchange.conn = None
        client = exchange.client
        if self.producing_for_client:
            self.producing_for_client = False
            client.detach_producer(self)
        self.resume_reading("peer")
        if client._producing_for is self:
            client._producing_for = None
            if self.transport.producer is client._throttle:
                self.transport.unregisterProducer()
            client.resume_reading("peer")
        backend = self.backend
        if self.stray:
            self.log.warn("backend {url} sent bytes after the end of a response; "
                          "connection closed", url=backend.url)
        if (self.keep and not self.stray and exchange.request_done and not exchange.upgrade
                and backend.listed and len(backend.idle) < MAX_IDLE):
            self.transition(Phase.IDLE)
            self.idle_since = self.proxy.clock.seconds()
            backend.idle.append(self)
        else:
            self.drop()
        client.exchange_done(exchange)

    def bad_response(self, why: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.drop()
        if exchange is not None:
            self.log.warn("backend {url}: {why}", url=self.backend.url, why=why)
            self.backend.errors += 1
            self.backend.active -= 1
            exchange.conn = None
            exchange.client.fail_exchange(exchange, 502, "the backend's response could not "
                                                         "be passed on\n")

    # Endings.

    def drop(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.transition(Phase.CLOSED)

    def connectionLost(self, reason):
        phase = self.phase
        self.phase = Phase.CLOSED
        backend = self.backend
        try:
            backend.idle.remove(self)
        except ValueError:
            pass
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            if not tunnel.closed:
                tunnel.closed = True
                tunnel.transport.loseConnection()
            return
        exchange, self.exchange = self.exchange, None
        if exchange is None or exchange.response_done:
            return
        backend.active -= 1
        exchange.conn = None
        client = exchange.client
        if client._producing_for is self:
            client._producing_for = None
            client.resume_reading("peer")
        if self.producing_for_client:
            client.detach_producer(self)
        if client.closed:
            return
        if phase is Phase.BODY:
            if self.until_close:
                # A body without length or chunks: the close is its end.
                if exchange.chunked_out:
                    client.write(b"0\r\n\r\n")
                exchange.reply_moves(Reply.DONE)
                backend.requests += 1
                client.exchange_done(exchange)
            else:
                backend.errors += 1
                client.abort()
            return
        # No answer at all: a pooled connection closed under us, or the backend died.
        # Safe to try again elsewhere while no body byte has left the client's hands.
        backend.errors += 1
        if not exchange.sent_body:
            self.proxy.stats.retries += 1
            self.proxy.retry(exchange, backend, stale=not self.got_bytes)
        else:
            client.fail_exchange(exchange, 502, "the backend closed the connection "
                                                "before answering\n")


class _Refused(Exception):
    """Raised in a parser callback to stop it on a refused request (see ``refuse``)."""


class _BadResponse(Exception):
    """A response head the proxy will not pass on (502)."""


class _Connector(protocol.ClientFactory):
    """One connection attempt for one exchange."""

    noisy = False

    def __init__(self, proxy, backend: Backend, exchange: Exchange):
        self.proxy = proxy
        self.backend = backend
        self.exchange = exchange

    def buildProtocol(self, addr):
        conn = BackendConnection(self.backend, self.proxy)
        conn.factory = self
        return conn

    def clientConnectionFailed(self, connector, reason):
        self.proxy.connect_failed(self.exchange, self.backend)


class ProxyFactory(protocol.Factory):
    """Client connections share the backends, the limits and the figures."""

    protocol = ClientConnection
    noisy = False
    log = Logger()

    def __init__(self, backends: BackendSet, reactor, limits: Limits | None = None):
        self.backends = backends
        self.reactor = reactor
        self.clock = reactor
        self.limits = limits or Limits()
        self.stats = Stats()
        self.clients: set[ClientConnection] = set()

    def drain(self, timeout: float, poll: float = 0.05, idle_grace: float = 1.0
              ) -> defer.Deferred:
        """Finish what is in flight, take nothing new; fires with the number of connections cut.

        Called once the listener stopped accepting.  Every ``poll`` seconds: a busy connection
        is marked to close after a response that has not begun (``Connection: close``), one
        that stayed idle for ``idle_grace`` seconds is closed (a request a client is about to
        send on a connection it just opened or just used is answered, not cut), and after
        ``timeout`` seconds whatever is left is cut.  Polling keeps this apart from the
        exchange's own state handling.
        """
        done = defer.Deferred()
        give_up = self.clock.seconds() + timeout
        idle_since: dict[ClientConnection, tuple] = {}

        def tick() -> None:
            cut = 0
            now = self.clock.seconds()
            for client in list(self.clients):
                if client.closed:
                    continue
                exchange = client.current
                if now >= give_up:
                    cut += 1
                    client.abort()
                elif exchange is not None:
                    if not exchange.responded:
                        # Its response head says so; one already on its way did not, and
                        # the client may send its next request: it is answered, then closed.
                        exchange.close_after = True
                elif not client.parsing:
                    # Its idle deadline is set anew when a response ends: unchanged, nothing
                    # happened on the connection since it was first seen idle.
                    deadline, since = idle_since.get(client, (None, None))
                    if since is None or deadline != client.deadline:
                        idle_since[client] = (client.deadline, now)
                    elif now - since >= idle_grace:
                        client.closed = True
                        client.transport.loseConnection()
            if now >= give_up or not self.clients:
                done.callback(cut)
            else:
                self.reactor.callLater(poll, tick)

        tick()
        return done

    def sweep(self) -> None:
        """Enforce every deadline (header, idle, backend answer); called about twice a second."""
        now = self.clock.seconds()
        for client in list(self.clients):
            deadline = client.deadline
            if deadline is not None and deadline < now and not client.closed:
                try:
                    client.expire(now)
                except Exception:
                    client.log.failure("enforcing a time limit")
                    client.abort()

    # Sending an exchange somewhere.

    def start(self, exchange: Exchange) -> None:
        backends = self.backends
        if exchange.client.closed:
            return
        if not backends.known:
            # Just started: the first read of the list is a moment away, or Redis is down.
            if not exchange.started:
                exchange.started = self.clock.seconds()
            if self.clock.seconds() - exchange.started < self.limits.first_read_wait:
                self.reactor.callLater(0.05, self.start, exchange)
                return
        if backends.shared:
            backends.pick_shared(self._picked, exchange)
        else:
            self._picked(backends.pick(), exchange)

    def _picked(self, backend: Backend | None, exchange: Exchange) -> None:
        client = exchange.client
        if client.closed:
            return
        if backend is None:
            if exchange.tried:
                # Backend addresses go to the log and the admin listener, not to clients.
                self.log.warn("every backend failed for a request: {urls}",
                              urls=", ".join(b.url for b in exchange.tried))
                client.fail_exchange(exchange, 502, "every backend failed\n")
            elif self.backends.known and not exchange.reread and not self.backends.shared:
                # Empty as far as we know; a notice of a first backend may be on its way.
                # A 503 should be true when said, so read the list once more first.
                exchange.reread = True
                self.backends.reread().addBoth(lambda _: self._picked(self.backends.pick(),
                                                                      exchange))
            elif self.backends.known:
                client.fail_exchange(exchange, 503, "no backend is available\n")
            else:
                client.fail_exchange(exchange, 503, "no backend is known yet\n")
            return
        exchange.backend = backend
        exchange.tried.append(backend)
        backend.active += 1
        idle = backend.idle
        if idle:
            too_old = self.clock.seconds() - POOL_IDLE_TIME
            while idle:
                conn = idle.pop()
                if conn.idle_since < too_old:
                    conn.drop()
                elif not conn.closed:
                    conn.send(exchange)
                    return
        self.reactor.connectTCP(backend.host, backend.port, _Connector(self, backend, exchange),
                                timeout=self.limits.connect_timeout)
        client.deadline = self.clock.seconds() + self.limits.connect_timeout + \
            self.answer_wait(exchange)

    def connected(self, conn: BackendConnection, exchange: Exchange) -> None:
        if exchange.backend is not conn.backend or exchange.conn is not None:
            conn.drop()  # the exchange ended (timeout) while connecting
        elif exchange.client.closed:
            exchange.backend = None
            conn.backend.active -= 1
            conn.drop()
        else:
            conn.send(exchange)

    def connect_failed(self, exchange: Exchange, backend: Backend) -> None:
        if exchange.backend is not backend or exchange.conn is not None:
            return
        backend.active -= 1
        exchange.backend = None
        self.backends.failed(backend)
        if exchange.client.closed:
            return
        self.stats.retries += 1
        self._picked(self.backends.pick(exchange.tried), exchange)

    def answer_wait(self, exchange: Exchange) -> float:
        """How long the answer to a fully sent request is waited for on this try."""
        limits = self.limits
        if limits.try_timeout is not None and exchange.idempotent and not exchange.retried:
            return min(limits.try_timeout, limits.backend_timeout)
        return limits.backend_timeout

    def try_elsewhere(self, exchange: Exchange) -> bool:
        """After a try timed out without a byte of an answer: send it once to another backend.

        False when the request may not be sent again or no other backend is left.
        """
        if self.limits.try_timeout is None or not exchange.idempotent or exchange.retried:
            return False
        backend = self.backends.pick(exchange.tried)
        if backend is None:
            return False
        exchange.retried = True
        self.stats.retries += 1
        self._picked(backend, exchange)
        return True

    def retry(self, exchange: Exchange, backend: Backend, stale: bool) -> None:
        """Send again after a connection died before answering; a dead backend is left out."""
        exchange.backend = None
        if len(exchange.tried) > len(self.backends.ring) + 2:
            return exchange.client.fail_exchange(exchange, 502, "every backend failed\n")
        tried = exchange.tried
        if stale and tried.count(backend) < 2:
            # A pooled connection the backend had closed: the same backend, a new connection.
            while backend.idle:
                backend.idle.pop().drop()
            self._picked(backend, exchange)
            return
        self._picked(self.backends.pick(tried), exchange)
