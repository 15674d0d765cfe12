"""One request and its answer (:class:`Exchange`, :class:`Reply`), and the write fast path.

Bodies stream through in both directions: each transport is registered as the producer of
the other, as in ``twisted/protocols/portforward.py``, so a slow reader pauses the fast
writer instead of filling memory: one :class:`Pipe` per pairing of a client connection and a
backend connection owns that both ways.
The exchange names the connections it is carried on through :class:`Upstream` and
:class:`Downstream`, so this module imports neither side.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport

if TYPE_CHECKING:
    from dockpart.proxy_backends import Backend, BackendSet, Slot


class _Reader(Protocol):
    """A connection whose reading a :class:`Pipe` pauses and resumes."""

    transport: Any
    throttle: Throttle

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...

    def reading_paused(self, reason: str) -> bool: ...

    def write(self, data: bytes) -> None: ...


class Upstream(_Reader, Protocol):
    """What an exchange and the client need of the backend connection carrying it."""

    exchange: Exchange | None
    pipe: Pipe | None

    def give_up(self) -> None: ...

    def drop(self) -> None: ...


class Downstream(_Reader, Protocol):
    """What an exchange and the backend side need of the client connection it came from."""

    deadline: float | None

    @property
    def closed(self) -> bool: ...

    def response_head(self, exchange: Exchange) -> None: ...

    def fail_exchange(self, exchange: Exchange, code: int, text: str,
                      extra: bytes = b"") -> None: ...

    def exchange_done(self, exchange: Exchange) -> None: ...

    def start_tunnel(self, conn: Upstream) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


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


def no_delay(transport) -> None:
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


class Throttle:
    """The producer a connection registers on a peer's transport (through a :class:`Pipe`):
    the peer's full buffer pauses this connection's reading.  One per connection."""

    __slots__ = ("conn",)

    def __init__(self, conn):
        self.conn = conn

    def pauseProducing(self):
        self.conn.pause_reading("peer")

    def resumeProducing(self):
        self.conn.resume_reading("peer")

    def stopProducing(self):
        pass


class Reading:
    """Pausing reads for several reasons at once (peer full, request queued, ...)."""

    transport: Any = None
    _paused: set = frozenset()  # type: ignore[assignment]  # shared empty default; a set once used

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

    def reading_paused(self, reason: str) -> bool:
        return reason in self._paused


class Pipe:
    """Flow control both ways between a client connection and the backend connection lent to
    its exchange: a side whose write buffer fills pauses the other side's reading.

    As in ``twisted/protocols/portforward.py``, each side is registered as the streaming
    producer of the other's transport.  This object alone registers and takes back those
    producers and the "peer" pauses they cause, so neither connection touches the other's.
    """

    __slots__ = ("client", "upstream", "_up", "_down")

    def __init__(self, client: Downstream, upstream: Upstream):
        self.client = client
        self.upstream = upstream
        self._up = client.throttle  # on the backend's transport: it pauses the client
        self._down = upstream.throttle  # on the client's transport: it pauses the backend

    def request_flows(self) -> None:
        """Request bytes (a body, a tunnel's) go up: a full backend buffer pauses the client."""
        _produce(self.upstream.transport, self._up)

    def response_flows(self) -> None:
        """A response body goes down: a full client buffer pauses the backend."""
        _produce(self.client.transport, self._down)

    @property
    def client_behind(self) -> bool:
        """The backend waits for the client to read what it was sent (no fault of the backend)."""
        return self.upstream.reading_paused("peer")

    def close(self) -> None:
        """The connections part: each producer this pipe registered is taken back, each side
        reads again (once a transport is gone, Twisted has already dropped its producer)."""
        client, upstream = self.client, self.upstream
        if client.transport is not None and client.transport.producer is self._down:
            client.transport.unregisterProducer()
        upstream.resume_reading("peer")
        if upstream.transport is not None and upstream.transport.producer is self._up:
            upstream.transport.unregisterProducer()
        client.resume_reading("peer")


class State(enum.Enum):
    """An enum of states whose members hash by identity, as they compare.

    Each move of a connection or an answer looks its tables of allowed moves up, several
    times per request; ``enum.Enum``'s own ``__hash__`` is a Python call each time (twelve
    per proxied request), ``object.__hash__`` is not.
    """

    __hash__ = object.__hash__


class Reply(State):
    """How far the answer to an exchange has gone; :meth:`Exchange.reply_moves` moves it."""

    AWAITED = "awaited"      # nothing written to the client yet: it may still be retried
    STREAMING = "streaming"  # a response head went to the client; its body may follow
    DONE = "done"            # the answer is complete (the backend's, or one of ours)


#: AWAITED -> DONE is an answer of our own (502, 503, 504, 408) or a response without a body.
REPLY_MOVES = {Reply.AWAITED: {Reply.STREAMING, Reply.DONE}, Reply.STREAMING: {Reply.DONE},
               Reply.DONE: set()}


class Exchange:
    """One request and its response, from the first attempt to the last byte.

    Stored: what the request is and how far it has gone; what can be derived from that
    (``backend``, ``responded``) is a property, except ``head_only``, fixed by the method and
    read several times on every answer, so kept once.
    """

    __slots__ = ("client", "method", "head_only", "head", "version", "upgrade", "chunked_in",
                 "has_body", "pending", "request_done", "slot", "conn", "tried",
                 "status", "chunked_out", "close_after", "reply",
                 "started", "host", "reread", "early", "suspected_at", "resent", "client_slow",
                 "body_from", "body_bytes", "backends", "held")

    def __init__(self, client: Downstream, method, head, version, keep_alive, upgrade,
                 chunked_in, has_body, host):
        self.client = client
        self.method = method
        self.head_only = method == b"HEAD"  # the answer is a head alone
        self.head = head  # request line and headers to send, without the final CRLF
        self.version = version
        self.upgrade = upgrade
        self.chunked_in = chunked_in
        self.has_body = has_body
        self.host = host
        self.pending: list[bytes] = []  # request bytes waiting for a backend connection
        self.request_done = False
        self.slot: Slot | None = None  # this try's place on its backend
        self.conn: Upstream | None = None
        self.tried: list = []
        self.status = 0
        self.chunked_out = False
        self.close_after = not keep_alive
        self.reply = Reply.AWAITED
        self.started = 0.0
        self.reread = False  # the list was read again before answering 503
        self.early: list[bytes] = []  # bytes after an Upgrade head, held until a 101
        self.suspected_at = 0.0  # when its try timed out (dockpart.proxy_retry)
        self.resent = False  # sent elsewhere after a try timed out (dockpart.proxy_retry)
        self.client_slow = False  # the client was given time to read a stalled response
        self.body_from = 0.0  # when its body began to be read (dockpart.proxy_limits)
        self.body_bytes = 0
        # The BackendSet its Host routes to (dockpart.proxy_routes), set when it starts.
        self.backends: BackendSet = None  # type: ignore[assignment]
        self.held = None  # the dockpart.proxy_hold.Hold it waits in for an app's first instance

    @property
    def target(self) -> bytes:
        """The request target as sent on (origin form: path and query)."""
        return self.head[0].split(b" ", 2)[1]

    @property
    def backend(self) -> Backend | None:
        """The backend of the try in progress."""
        slot = self.slot
        return slot.backend if slot is not None else None

    def try_on(self, backend: Backend, now: float) -> None:
        """A try begins on ``backend``: it holds one of its in-flight slots until :meth:`end_try`."""
        self.slot = backend.take(now)
        self.tried.append(backend)

    def end_try(self) -> None:
        """The try is over (answered, failed or given up): its slot goes back, once."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()

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
