"""A listening port as a service that says when it is up and fails loudly when it cannot be."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

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
