"""The client side of dockpart-proxy: one client connection, its requests in order.

A client connection (:class:`ClientConnection`) parses requests with httptools and hands each
to an :class:`~dockpart.proxy_exchange.Exchange`, which the factory
(:mod:`dockpart.proxy_dispatch`) sends to a backend connection
(:mod:`dockpart.proxy_upstream`).  A refused request stops the parser: nothing after it is read.
After a backend's ``101`` the two connections become a plain byte tunnel.  What the connection
does with the bytes it reads is explicit (:class:`Mode`, moved by
:meth:`ClientConnection.transition`).
"""

from __future__ import annotations

from collections import deque

from twisted.internet import protocol
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from dockpart.http_parser import httptools  # or on PyPy its equivalent, http11
from dockpart.proxy_exchange import (Exchange, Reading, Reply, State, Throttle, direct_writer,
                                     no_delay)
from dockpart.proxy_framing import REASONS, Refused, request_head


class _Refused(Exception):
    """Raised in a parser callback to stop it on a refused request (see ``refuse``)."""


class Mode(State):
    """What a client connection does with the bytes it reads; :meth:`ClientConnection.transition`
    moves it.  (Whether a request head is half read is the parser's: ``parsing``.)"""

    OPEN = "open"            # HTTP requests, read and answered in order
    REFUSING = "refusing"    # a request was refused: nothing more is read; its answer waits
    UPGRADING = "upgrading"  # an Upgrade request was read: bytes are held until the 101
    TUNNEL = "tunnel"        # after a 101: bytes both ways, no HTTP
    CLOSED = "closed"        # closing or closed


#: The moves a client connection may make; anything else is a bug, and closes it.
MODE_MOVES = {
    Mode.OPEN: {Mode.REFUSING, Mode.UPGRADING, Mode.CLOSED},
    Mode.REFUSING: {Mode.CLOSED},
    Mode.UPGRADING: {Mode.TUNNEL, Mode.CLOSED},
    Mode.TUNNEL: {Mode.CLOSED},
    Mode.CLOSED: {Mode.CLOSED},
}


class ClientConnection(Reading, protocol.Protocol):
    """A client's connection: requests in order, one exchange at a time."""

    log = Logger()
    mode = Mode.OPEN
    #: ``mode is Mode.CLOSED``, kept by :meth:`transition` alone (read on every request).
    closed = False

    def transition(self, to: Mode) -> None:
        if to not in MODE_MOVES[self.mode]:
            self.log.error("client connection: no move from {old} to {new}",
                           old=self.mode.value, new=to.value)
            to = Mode.CLOSED
            if self.transport is not None:
                self.transport.loseConnection()
        self.mode = to
        self.closed = to is Mode.CLOSED

    def close(self) -> None:
        """Close once what was written is sent."""
        self.transition(Mode.CLOSED)
        self.transport.loseConnection()

    def connectionMade(self):
        factory = self.factory
        self.clock = factory.clock
        self.limits = factory.limits
        no_delay(self.transport)
        self.write = direct_writer(self.transport)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None
        self.parsing = False
        self.tunnel_to = None  # the backend connection, in TUNNEL
        self.pending_head = 0
        # In REFUSING: (code, text, head_only), answered after the requests before it.
        self.refusal: tuple[int, str, bool] | None = None
        self._head_request = False
        self._head_began = False
        self._url = b""
        self._headers: list = []
        self.throttle = Throttle(self)
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "").encode()
        self.proto = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
        self.deadline = self.clock.seconds() + self.limits.idle_timeout
        factory.clients.add(self)
        factory.stats.connections += 1

    # Reading.

    def dataReceived(self, data):
        mode = self.mode
        if mode is not Mode.OPEN:
            if mode is Mode.UPGRADING or mode is Mode.TUNNEL:
                self._tunnel_in(data)
            return
        self._head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.mode is not Mode.OPEN:
                return
            self.transition(Mode.UPGRADING)
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
        upgrade = parser.should_upgrade()
        try:
            out, host, has_body, chunked = request_head(method, url, version, self._headers,
                                                        upgrade, self.peer_ip, self.proto)
        except Refused as e:
            return self._refuse_head(e.code, f"{e}\n")
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
        exchange.body_bytes += len(body)
        if exchange.chunked_in:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        conn = exchange.conn
        if conn is not None and conn.exchange is exchange:
            if not exchange.responded:
                self.deadline = self.clock.seconds() + self.limits.idle_timeout
            conn.write(body)  # its pipe carries the body since the request was sent
        else:
            exchange.pending.append(body)
            if len(exchange.pending) > 8:
                self.pause_reading("no backend yet")

    def on_message_complete(self):
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is None or exchange.request_done:
            # A request without a body was done with its head: its answer is awaited since
            # it was sent (BackendConnection.send), nothing is left to do.
            return
        exchange.request_done = True
        conn = exchange.conn
        if conn is not None and conn.exchange is not exchange:
            conn = None  # not (or no longer) carrying this exchange
        if exchange.chunked_in:
            if conn is not None:
                conn.write(b"0\r\n\r\n")
            else:
                exchange.pending.append(b"0\r\n\r\n")
        if conn is not None and not exchange.responded:
            self.deadline = self.clock.seconds() + self.factory.tries.first_wait()

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
        if self.mode is not Mode.OPEN:
            return
        exchange = self.queue[-1] if self.queue else self.current
        if exchange is not None and not exchange.request_done and not exchange.upgrade:
            # Its body turned out malformed: the backend waits for the rest, so nothing
            # later would end this exchange but a timer.
            return self.cut_body(exchange, code, text)
        self.transition(Mode.REFUSING)
        self.refusal = (code, text, head_only)
        self.parsing = False
        self.pause_reading("refused")
        if self.current is None and not self.queue:
            self.answer(code, text, head_only=head_only)

    def cut_body(self, exchange: Exchange, code: int, text: str) -> None:
        """The request whose body is being read cannot go on: answer ``code`` (or cut the
        connection, if its answer began), give its backend connection and slot back, close."""
        if exchange is not self.current:
            self.queue.pop()  # never sent: the refusal is answered in its turn
            return self.refuse(code, text, head_only=exchange.head_only)
        if exchange.conn is not None:
            exchange.conn.give_up()
        exchange.end_try()
        exchange.close_after = True
        self.fail_exchange(exchange, code, text)

    def answer(self, code: int, text: str, close: bool = True, head_only: bool = False,
               extra: bytes = b"") -> None:
        """A response of our own (``extra``: header lines); closes the connection unless told
        otherwise."""
        if self.closed:
            return
        body = text.encode()
        self.factory.stats.responses[code] = self.factory.stats.responses.get(code, 0) + 1
        self.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s%s\r\n%s" % (
                code, REASONS.get(code, b"Error"), len(body), extra,
                b"Connection: close\r\n" if close else b"", b"" if head_only else body))
        if close:
            self.parsing = False
            self.close()

    def fail_exchange(self, exchange: Exchange, code: int, text: str, extra: bytes = b"") -> None:
        """The exchange ends in an answer of ours; keep the connection if the request is read."""
        if exchange.responded:
            return self.abort()
        exchange.reply_moves(Reply.DONE)
        self.factory.per_client.release(exchange)
        keep = exchange.request_done and not exchange.close_after and not exchange.upgrade
        self.answer(code, text, close=not keep, head_only=exchange.head_only, extra=extra)
        if keep:
            self.exchange_done(exchange)

    # Writing responses.

    def response_head(self, exchange: Exchange) -> None:
        """The backend's response head is about to be written: its body may stream."""
        exchange.reply_moves(Reply.STREAMING)
        conn = exchange.conn
        if exchange.slot is not None and conn is not None and not exchange.head_only:
            assert conn.pipe is not None  # made when the exchange was lent to it
            conn.pipe.response_flows()
        stats = self.factory.stats
        stats.responses[exchange.status] = stats.responses.get(exchange.status, 0) + 1

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is complete: next request, idle, or close."""
        if exchange is not self.current:
            return
        self.current = None  # the backend side closed the exchange's pipe before this
        self.factory.per_client.release(exchange)
        if self.closed:
            return
        if exchange.close_after or exchange.upgrade or not exchange.request_done:
            self.close()
            return
        self.resume_reading("no backend yet")
        if not self.queue and self.mode is Mode.REFUSING:
            assert self.refusal is not None  # set on the move to REFUSING
            code, text, head_only = self.refusal
            return self.answer(code, text, head_only=head_only)
        if self.queue:
            self.current = self.queue.popleft()
            self.factory.start(self.current)
            if not self.queue and not self.current.request_done:
                self.resume_reading("queued")
        else:
            self.resume_reading("queued")
            self.deadline = self.clock.seconds() + (
                self.limits.header_timeout if self.parsing else self.limits.idle_timeout)

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
        self.transition(Mode.TUNNEL)
        self.tunnel_to = conn
        self.factory.stats.tunnels += 1
        self.deadline = None
        self.resume_reading("queued")
        self.resume_reading("upgrading")
        conn.pipe.request_flows()

    # Time limits and endings.

    def expire(self, now: float) -> None:
        self.deadline = None
        exchange = self.current
        if exchange is None:
            if self.parsing:
                self.answer(408, "the request headers took too long\n")
            else:
                self.close()
            return
        conn = exchange.conn
        backend = exchange.backend
        if exchange.responded:
            if conn is not None and conn.pipe is not None and conn.pipe.client_behind:
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
        resend = False
        if not stalled and backend is not None:
            resend = self.factory.tries.resend(exchange, backend)
            if not resend:
                self.deadline = self.factory.tries.more_time(exchange, backend, now)
                if self.deadline is not None:
                    return
        if conn is not None:
            conn.give_up()
        exchange.end_try()
        if resend:
            self.factory.stats.retries += 1
            return self.factory.retry(exchange, backend, stale=False)
        if backend is not None:
            if not stalled:
                # Time-outs count as failures: a hung backend leaves the rotation.
                self.log.warn("backend {url} did not answer in time", url=backend.url)
                self.factory.backends.failed(backend)
        if stalled:
            self.fail_exchange(exchange, 408, "the request body stopped coming\n")
        else:
            self.fail_exchange(exchange, 504, "the backend did not answer in time\n")

    def abort(self) -> None:
        self.transition(Mode.CLOSED)
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.transition(Mode.CLOSED)
        self.factory.clients.discard(self)
        exchange, self.current = self.current, None
        if exchange is not None and exchange.held is not None:
            exchange.held.discard(exchange)  # a held request whose client left is dropped
        if exchange is not None:
            self.factory.per_client.release(exchange)
        if exchange is not None and exchange.conn is not None and not exchange.response_done:
            exchange.conn.drop()
        if self.tunnel_to is not None:
            self.tunnel_to.drop()
        self.queue.clear()
