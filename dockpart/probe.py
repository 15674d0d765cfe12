""""Does it answer?": the one HTTP probe every dockpart daemon uses (and "is the port taken?").

The proxy's active health checks, infra's spawn gate and reconcile, and deploy's
health check all ask the same question the same way: one ``GET PATH`` on a fresh
connection, the status line read, the connection closed.  A small protocol rather
than an HTTP client: a probe every 50 ms must cost no pool, no log line and no body.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

#: Longest status line we wait for before calling the answer malformed.
_MAX_LINE = 1024


def healthy_status(code: int) -> bool:
    """What "healthy" means for every check dockpart makes (the proxy's active checks, infra's
    spawn gate and reconcile, deploy's release gate): 2xx or 3xx, as HAProxy's ``httpchk``,
    Traefik's health checks and Kubernetes' HTTP probes read it; a 4xx or 5xx is not."""
    return 200 <= code < 400


class NotHTTP(Exception):
    """Something answered, but not with an HTTP status line."""


class _StatusLine(Protocol):
    """Sends one request; ``status`` fires with the response's status code."""

    transport: ITCPTransport  # a TCP client's connection (None until connected)

    def __init__(self, request: bytes):
        self.request = request
        self.status: defer.Deferred = defer.Deferred()
        self._buffer = b""

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.status.called:
            return
        self._buffer += data
        line, found, _ = self._buffer.partition(b"\r\n")
        if not found and len(self._buffer) < _MAX_LINE:
            return
        parts = line.split(b" ", 2)
        if found and len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            self.status.callback(int(parts[1]))
        else:
            self.status.errback(NotHTTP(f"not an HTTP answer: {line[:80]!r}"))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone):
        if not self.status.called:
            self.status.errback(reason)


class _ProbeFactory(Factory):
    """Hands out one given protocol, without a log line per connection (probes are frequent)."""

    noisy = False

    def __init__(self, protocol: Protocol):
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def status(reactor, host: str, port: int, path: str = "/", timeout: float = 1.0,
           user_agent: str = "dockpart probe") -> defer.Deferred:
    """Fires with the status code of ``GET path`` on ``host:port``; fails on no answer in time.

    The failure is ``defer.TimeoutError`` when nothing answered within ``timeout`` (connect
    and status line together), the connection's error when it was refused or cut, and
    :class:`NotHTTP` when the peer spoke something else.
    """
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: {user_agent}\r\n"
               f"Connection: close\r\n\r\n").encode()
    protocol = _StatusLine(request)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(_ProbeFactory(protocol))

    def connected(_):
        return protocol.status

    def give_up(failure):  # the attempt itself is over: addTimeout cancelled it, or it failed
        if protocol.transport is not None:
            protocol.transport.abortConnection()
        return failure

    d.addCallback(connected)
    d.addTimeout(timeout, reactor)
    d.addErrback(give_up)
    return d


def answers(reactor, host: str, port: int, path: str = "/", timeout: float = 1.0,
            healthy=healthy_status, user_agent: str = "dockpart probe") -> defer.Deferred:
    """Fires with True when ``GET path`` answers in time with a healthy status, else False."""
    d = status(reactor, host, port, path, timeout, user_agent)
    d.addCallbacks(healthy, lambda _: False)
    return d


def accepts(reactor, host: str, port: int, timeout: float = 1.0) -> defer.Deferred:
    """Fires with whether anything accepts a TCP connection on ``host:port`` (closed at once).

    For "is this port taken?", where the listener need not speak HTTP.
    """
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    d = endpoint.connect(_ProbeFactory(Protocol()))

    def connected(protocol):
        protocol.transport.abortConnection()
        return True
    d.addCallbacks(connected, lambda _: False)
    return d
