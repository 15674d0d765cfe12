"""The backend side of dockpart-proxy: a persistent connection to one backend.

A backend connection goes back to the pool only when its response ended cleanly; where it is
in its life is explicit (:class:`Phase`, moved by :meth:`BackendConnection.transition`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from dockpart.http_parser import httptools  # or on PyPy its equivalent, http11
from dockpart.proxy_backends import MAX_IDLE, Backend
from dockpart.proxy_exchange import (Downstream, Exchange, Pipe, Reading, Reply, State, Throttle,
                                     direct_writer, no_delay)
from dockpart.proxy_framing import NO_BODY_STATUS, Refused, codings, end_to_end
from dockpart.proxy_retry import never_read


class _BadResponse(Exception):
    """A response head the proxy will not pass on (502)."""


class Phase(State):
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


class BackendConnection(Reading, protocol.Protocol):
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
        self.parser: Any = None  # an httptools.HttpResponseParser once a request was sent
        self.throttle = Throttle(self)
        self.pipe: Pipe | None = None  # flow control with the client of the exchange lent
        self.tunnel: Downstream | None = None  # the client, after a 101
        self._reason = b""
        self._headers: list = []
        self.got_bytes = False
        self.until_close = False
        self.keep = False  # the settling response allows another on this connection
        self.stray = False  # bytes came after the end of a response
        # What one read of the backend produced for the client, written at once.
        self.out: list[bytes] = []
        self.out_to: Downstream | None = None
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
        no_delay(self.transport)  # small requests leave at once
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
        self.pipe = Pipe(client, self)
        if exchange.has_body and not exchange.request_done:
            self.pipe.request_flows()
        client.resume_reading("no backend yet")
        exchange.started = self.proxy.clock.seconds()
        # The answer is awaited from the end of the request (see on_message_complete);
        # until then the body must keep coming (see on_body).
        limits = self.proxy.limits
        client.deadline = exchange.started + (
            self.proxy.tries.first_wait() if exchange.request_done else limits.idle_timeout)

    # Receiving.

    def dataReceived(self, data):
        phase = self.phase
        if phase is Phase.TUNNEL:
            assert self.tunnel is not None
            return self.tunnel.write(data)
        if phase is not Phase.AWAITING and phase is not Phase.BODY:
            # An idle connection has nothing to say; whatever it is, it cannot be reused.
            return self.drop()
        self.got_bytes = True
        if phase is Phase.BODY:
            # Every read from the backend restarts its time limit, mid-body too.
            exchange = self.exchange
            assert exchange is not None  # lent in AWAITING and BODY
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
            assert self.out_to is not None  # set when the request was sent
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
        assert exchange is not None  # lent in AWAITING
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
        head_only = exchange.head_only
        no_body = head_only or status in NO_BODY_STATUS or status == 101
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
        backend.timed(now - exchange.started, now)
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
            exchange.end_try()
            self.flush()
            client.start_tunnel(self)
            if exchange.early:
                self.write(b"".join(exchange.early))
                exchange.early.clear()
        elif head_only:
            # The parser cannot be told the response to HEAD has no body: it would wait for
            # the one the head announces, so this connection serves no other request.
            self._response_complete(keep=False)
        else:
            self.transition(Phase.BODY)

    def on_body(self, body):
        if self.phase is not Phase.BODY:
            self.stray = True
            return
        exchange = self.exchange
        assert exchange is not None  # lent in BODY
        if exchange.chunked_out:
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
        exchange = self.exchange
        assert exchange is not None  # lent in BODY
        if exchange.chunked_out:
            self.out.append(b"0\r\n\r\n")
        self._response_complete(keep=self.parser.should_keep_alive())

    def _response_complete(self, keep: bool) -> None:
        """The response ended in this read; :meth:`_settle` finishes once the read is parsed."""
        self.transition(Phase.SETTLING)
        self.keep = keep
        exchange = self.exchange
        assert exchange is not None  # lent until SETTLING ends
        exchange.reply_moves(Reply.DONE)
        self.backend.answered()
        exchange.end_try()

    def _settle(self) -> None:
        """After the read that ended a response: pool the connection or close it, then let
        the client go on."""
        self.flush()
        exchange = self._let_go()
        assert exchange is not None  # lent until SETTLING ends
        client = exchange.client
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
        exchange = self._let_go()
        self.drop()
        if exchange is not None:
            self.log.warn("backend {url}: {why}", url=self.backend.url, why=why)
            self.backend.erred()
            exchange.end_try()
            exchange.client.fail_exchange(exchange, 502, "the backend's response could not "
                                                         "be passed on\n")

    # Endings.

    def _let_go(self) -> Exchange | None:
        """The exchange lent is no longer this connection's: their pipe closes."""
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.conn = None
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            pipe.close()
        return exchange

    def give_up(self) -> None:
        """The client side gave up on this try (its time ran out): close without a word."""
        self._let_go()
        self.drop()

    def drop(self) -> None:
        if self.phase is not Phase.CLOSED:
            self.transition(Phase.CLOSED)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
                tunnel.close()
            return
        exchange = self.exchange
        if exchange is None or exchange.response_done:
            self.exchange = None
            return
        self._let_go()
        exchange.end_try()
        client = exchange.client
        if client.closed:
            return
        if phase is Phase.BODY:
            if self.until_close:
                # A body without length or chunks: the close is its end.
                if exchange.chunked_out:
                    client.write(b"0\r\n\r\n")
                exchange.reply_moves(Reply.DONE)
                backend.answered()
                client.exchange_done(exchange)
            else:
                backend.erred()
                client.abort()
            return
        # No answer at all: a pooled connection closed under us, or the backend died.
        # Sent again only if the backend cannot have read it (dockpart.proxy_retry).
        backend.erred()
        if never_read(exchange.has_body, self.got_bytes, reason):
            self.proxy.stats.retries += 1
            self.proxy.retry(exchange, backend, stale=not self.got_bytes)
        else:
            client.fail_exchange(exchange, 502, "the backend closed the connection "
                                                "before answering\n")
