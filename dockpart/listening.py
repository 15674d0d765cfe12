"""Listening: endpoint strings, ports several processes share, and a listening port as a
service that says when it is up and fails loudly when it cannot be."""

from __future__ import annotations

import socket

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import UNIXServerEndpoint, clientFromString, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

#: The accept queue a listener gets unless its endpoint names one: a burst of a few hundred
#: new connections waits in it instead of being dropped (Twisted's default is 50).
DEFAULT_BACKLOG = 1024


def server_endpoint(reactor, option: str, description: str):
    """The listening endpoint an ``--OPTION`` string names, or a UsageError a person can read."""
    try:
        return serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """A TCP or UNIX listening endpoint string with ``backlog=`` added unless it has one."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "unix", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def client_endpoint(reactor, option: str, description: str):
    """The connecting endpoint an ``--OPTION`` string names, or a UsageError a person can read."""
    try:
        return clientFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--{option} {description!r}: {e}") from None


def endpoint_parts(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint string's kind, positional and keyword arguments (``\\:`` is a colon)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        name, equals, value = part.partition("=")
        if equals:
            kwargs[name] = value
        else:
            args.append(part)
    return parts[0].lower(), args, kwargs


def tcp_address(description: str, option: str = "listen") -> tuple[str, int]:
    """(interface, port) of a tcp: or tcp6: endpoint string; UsageError for any other kind.

    Port sharing needs TCP: a UNIX socket has no SO_REUSEPORT to share it by.
    """
    server_endpoint(None, option, description)  # the usual errors for a malformed string
    kind, args, kwargs = endpoint_parts(description)
    if kind not in ("tcp", "tcp6"):
        raise usage.UsageError(f"--{option} {description!r}: --workers above 1 needs a tcp: "
                               "listener (the workers share its port with SO_REUSEPORT)")
    port = kwargs.get("port", args[0] if args else "")
    interface = kwargs.get("interface", args[1] if len(args) > 1 else
                           ("::" if kind == "tcp6" else ""))
    return interface, int(port)


def _reuse_port_socket(interface: str, port: int) -> socket.socket:
    """A TCP socket bound to ``interface:port`` that other processes may bind too."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own ports
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except OSError as e:
        sock.close()
        raise error.CannotListenError(interface, port, e) from None
    return sock


def check_bind(interface: str, port: int) -> None:
    """Raise the reason (port taken by another program, no such address) before any worker."""
    _reuse_port_socket(interface, port).close()


@implementer(IStreamServerEndpoint)
class SharedPortEndpoint:
    """A TCP port other processes of the same user may listen on too (``SO_REUSEPORT``).

    The socket is made, bound and put to listen here, then handed to the reactor with
    ``adoptStreamPort`` (which takes a copy of it).
    """

    def __init__(self, reactor, interface: str, port: int, backlog: int):
        self.reactor = reactor
        self.interface = interface
        self.port = port
        self.backlog = backlog

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        sock = _reuse_port_socket(self.interface, self.port)
        try:
            sock.listen(self.backlog)
            sock.setblocking(False)
            return self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
        finally:
            sock.close()


def shared_port_endpoint(reactor, option: str, description: str,
                         backlog: int = DEFAULT_BACKLOG):
    """The endpoint ``--OPTION`` names, with ``backlog`` for its listen queue; a TCP one shares
    its port (:class:`SharedPortEndpoint`)."""
    endpoint = server_endpoint(reactor, option, description)
    kind, args, kwargs = endpoint_parts(description)
    if kind in ("tcp", "tcp6"):
        return SharedPortEndpoint(reactor, *tcp_address(description, option), backlog)
    if kind == "unix":
        return UNIXServerEndpoint(reactor, kwargs.get("address", args[0] if args else ""),
                                  backlog, int(kwargs.get("mode", "666"), 8),
                                  bool(int(kwargs.get("lockfile", "1"))))
    return endpoint


class ConnectionCap:
    """At most ``limit`` connections at once (HAProxy's ``maxconn``, socat's ``max-children``).

    At the limit the listening port stops accepting: further clients wait in its listen queue
    until one ends, and the daemon's file descriptors stay bounded.  A protocol calls
    :meth:`admit` when it connects (False: a burst accepted at once went past the limit; close
    it) and :meth:`release` when an admitted connection is lost.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.port = None  # set by the Listener that owns the port

    def admit(self) -> bool:
        self.active += 1
        if self.active > self.limit:
            self.active -= 1
            return False
        if self.active == self.limit:
            self._port_reading(False)
        return True

    def release(self) -> None:
        self.active -= 1
        if self.active == self.limit - 1:
            self._port_reading(True)

    def _port_reading(self, on: bool) -> None:
        if self.port is not None and self.port.connected:
            self.port.startReading() if on else self.port.stopReading()


class Listener(Service):
    """Listens on ``endpoint`` with ``factory``; logs "NAME listening on HOST:PORT" once up.

    A port that cannot be bound raises in ``privilegedStartService``, so ``twistd`` exits with
    the reason instead of running on without its port.  With a ``cap``, the port stops
    accepting while the cap is full.
    """

    log = Logger()

    def __init__(self, name: str, endpoint, factory, cap: ConnectionCap | None = None):
        self.name = name
        self.endpoint = endpoint
        self.factory = factory
        self.cap = cap
        self.port: Any = None  # the IListeningPort (tcp.Port's own attributes are read too)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        # TCP and UNIX endpoints bind synchronously, so the outcome is already known here.
        if outcome and isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0] if outcome else None
        if self.cap is not None:
            self.cap.port = self.port
        if self.port is not None:
            host = self.port.getHost()
            self.log.info("{name} listening on {host}:{port}", name=self.name,
                          host=getattr(host, "host", host), port=getattr(host, "port", ""))

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if self.cap is not None:
            self.cap.port = None
        if port is not None:
            return port.stopListening()
