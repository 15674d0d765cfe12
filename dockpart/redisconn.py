"""One way for every daemon to reach Redis: the ``--redis`` option, a service, and RESP.

A person waiting for an answer deserves an error rather than a command queued until Redis is
back, so :meth:`RedisService.call` fails at once when no connection is up and gives up after a
timeout otherwise.

The connection is dockpart's own (RESP, commands pipelined, each answered through one
Deferred) rather than txredisapi's: measured on dockpart-web's ``GET /``, txredisapi's
``execute_command`` (a pool lookup and three Deferreds a command) was about a quarter of the
CPU time of the request; and txredisapi imports ``twisted.internet.ssl`` (pyOpenSSL and
cryptography, about 13 MiB of memory) for the TLS that dockpart refuses anyway (``rediss://``).
"""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
REDIS_ENV = "DOCKPART_REDIS"
#: Longest wait, in seconds, between two tries to reach Redis again after it left.
RECONNECT_MAX = 2
URL_FORM = "redis://HOST:PORT/DB (with [USER]:PASSWORD@ before HOST when Redis wants one)"


class RedisUnavailable(Exception):
    """Redis could not answer in time; the caller should say so, not wait."""


class RedisError(Exception):
    """An error Redis answered (``WRONGTYPE ...``, a script's error): the caller's mistake,
    not an outage (except the transient ones, which :meth:`RedisService.call` turns into
    :class:`RedisUnavailable`)."""


# -- RESP


#: A reply that is not complete in the buffer yet.
INCOMPLETE = object()


def command(*parts: bytes) -> bytes:
    """One Redis command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def encode(arg) -> bytes:
    """A command argument as Redis takes it: text in UTF-8, numbers written out."""
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, float):
        return format(arg, "f").encode()
    return str(arg).encode()


def read_reply(buf: bytes | bytearray, pos: int):
    """The RESP reply starting at ``pos``: ``(value, end)``, or ``(INCOMPLETE, pos)``.

    Bulk and simple strings come back as ``str`` (bytes when not UTF-8), integers as ``int``,
    nil as None, errors as :class:`RedisError` (returned, not raised), arrays as lists.
    Raises ValueError on what is not RESP.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return INCOMPLETE, pos
    kind = buf[pos]
    if kind == 36:  # $: a bulk string, or nil
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        if len(buf) < end + 4 + n:
            return INCOMPLETE, pos
        data = bytes(buf[end + 2:end + 2 + n])
        try:
            return data.decode(), end + 4 + n
        except UnicodeDecodeError:
            return data, end + 4 + n
    if kind == 43:  # +simple string
        return buf[pos + 1:end].decode(), end + 2
    if kind == 58:  # :integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 45:  # -error
        return RedisError(buf[pos + 1:end].decode(errors="replace")), end + 2
    if kind == 42:  # *array
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        items = []
        at = end + 2
        for _ in range(n):
            item, after = read_reply(buf, at)
            if item is INCOMPLETE:
                return INCOMPLETE, pos
            items.append(item)
            at = after
        return items, at
    raise ValueError(f"not a RESP reply: {bytes(buf[pos:pos + 20])!r}")


def auth(address: "RedisAddress") -> bytes:
    """AUTH as the --redis URL says: with its user name (an ACL user) when it has one."""
    assert address.password is not None
    user = [address.username.encode()] if address.username else []
    return command(b"AUTH", *user, address.password.encode())


#: Errors Redis answers while it cannot serve yet (loading its data, a script running, no
#: master): the same "try again shortly" as no connection at all.
_TRANSIENT = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")


def _split_credentials(url: str) -> tuple[str, str, str]:
    """``url`` as (scheme, credentials, the rest): the credentials are whatever stands between
    ``://`` and the last ``@``, so a password holding ``/``, ``?``, ``#`` or ``@`` stays whole."""
    scheme, _, rest = url.partition("://")
    auth, at, where = rest.rpartition("@")
    return scheme, auth if at else "", where


def _hide_password(url: str) -> str:
    """``url`` fit for an error message: whatever stands before its last ``@`` is hidden."""
    scheme, auth, where = _split_credentials(url)
    return f"{scheme}://{'***@' if auth else ''}{where}"


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None = field(default=None, repr=False)  # never in a log or error
    username: str | None = None

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        """Read a Redis URL as redis-py's ``from_url`` does.

        ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?db=DB]``: the user and password
        percent-decoded (``p%40ss`` is ``p@ss``), the database from ``?db=`` else the path,
        host and port defaulting to localhost and 6379.  ``rediss://`` (TLS) and ``unix://``
        are refused with the reason rather than half supported.
        """
        shown = _hide_password(url)
        scheme = url.partition("://")[0]
        if scheme == "rediss":
            raise usage.UsageError(f"--redis {shown!r}: TLS (rediss://) is not supported; reach "
                                   f"Redis on loopback or through a TLS tunnel with redis://")
        if scheme == "unix":
            raise usage.UsageError(f"--redis {shown!r}: UNIX sockets are not supported; "
                                   f"use {URL_FORM}")
        if scheme != "redis":
            raise usage.UsageError(f"--redis {shown!r}: expected {URL_FORM}")
        _, auth, where = _split_credentials(url)
        try:
            parts = urlsplit(f"redis://{where}")
            port = parts.port or 6379
        except ValueError as e:
            raise usage.UsageError(f"--redis {shown!r}: {e}") from None
        query = parse_qs(parts.query)
        db = unquote(query["db"][0]) if query.get("db") else unquote(parts.path).replace("/", "")
        if not (db or "0").isdigit():
            raise usage.UsageError(f"--redis {shown!r}: the database must be a number, not {db!r}")
        username, colon, password = auth.partition(":")
        return cls(unquote(parts.hostname) if parts.hostname else "localhost", port,
                   int(db or 0), unquote(password) if colon and password else None,
                   unquote(username) if username else None)

    def url(self) -> str:
        """This address as a URL again, credentials included (for the instances' environment)."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"

    def __str__(self) -> str:
        """Without credentials: for logs, and the docker driver's tier label."""
        return f"redis://{self.host}:{self.port}/{self.db}"


class RedisOptions(usage.Options):
    """Mix-in for daemon options: ``--redis`` with ``DOCKPART_REDIS`` as fallback."""

    optParameters = [
        ["redis", None, None,
         f"Redis URL {URL_FORM}, read as redis-py reads it (env {REDIS_ENV}, "
         f"default {DEFAULT_REDIS})."],
        ["redis-timeout", None, 2.0, "Seconds to wait for a Redis answer.", float],
    ]

    def postOptions(self) -> None:
        url = self["redis"] or os.environ.get(REDIS_ENV) or DEFAULT_REDIS
        self["redis"] = RedisAddress.parse(url)
        if self["redis-timeout"] <= 0:
            raise usage.UsageError("--redis-timeout must be positive")


class _Connection(Protocol):
    """RedisService's connection: commands pipelined, answered in order, each through its
    Deferred.  It is offered to the service once Redis took its AUTH and SELECT."""

    log = Logger()
    transport: ITCPTransport  # set by the TCP connection before connectionMade

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.waiting: deque[defer.Deferred] = deque()
        self.buffer = bytearray()
        service: RedisService = self.factory.service
        address = service.address
        setup = []
        if address.password is not None:
            setup.append(self.send(auth(address)))
        if address.db:
            setup.append(self.send(command(b"SELECT", str(address.db).encode())))
        ready = defer.gatherResults(setup, consumeErrors=True)
        ready.addTimeout(service.timeout, service.reactor)  # a silent Redis: try again
        ready.addCallbacks(lambda _: service._connected(self), self._refused,
                           errbackArgs=(address,))

    def _refused(self, failure: Failure, address: RedisAddress) -> None:
        first = failure.value.subFailure if isinstance(failure.value, defer.FirstError) \
            else failure
        self.log.warn("{address} refused this connection: {error}", address=str(address),
                      error=first.getErrorMessage())
        self.transport.abortConnection()  # and the service connects again

    def send(self, data: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append(d)
        self.transport.write(data)
        return d

    def dataReceived(self, data):
        buf = self.buffer
        buf += data
        pos, size, waiting = 0, len(buf), self.waiting
        while pos < size:
            try:
                value, pos = read_reply(buf, pos)
            except ValueError:
                self.log.warn("not a Redis answer; reconnecting")
                self.transport.abortConnection()
                return
            if value is INCOMPLETE:
                break
            if not waiting:
                self.log.warn("Redis answered what nothing asked; reconnecting")
                self.transport.abortConnection()
                return
            d = waiting.popleft()
            if d.called:  # timed out: its answer goes nowhere
                continue
            if value.__class__ is RedisError:
                d.errback(value)
            else:
                d.callback(value)
        del buf[:pos]

    def connectionLost(self, reason: Failure = connectionDone):
        self.factory.service._lost(self)
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            if not d.called:
                d.errback(reason)


class RedisService(Service):
    """A reconnecting Redis connection owned by the service tree."""

    log = Logger()

    def __init__(self, address: RedisAddress, timeout: float = 2.0, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.address = address
        self.timeout = timeout
        self.reactor = reactor
        self._client: ClientService | None = None
        self._connection: _Connection | None = None
        self._was_connected = False

    def startService(self) -> None:
        """Connect, and keep connecting again whenever the connection is lost, never more
        than RECONNECT_MAX seconds apart."""
        super().startService()
        factory = Factory.forProtocol(_Connection)
        factory.noisy = False
        factory.service = self  # type: ignore[attr-defined]  # the connection's way back
        endpoint = HostnameEndpoint(self.reactor, self.address.host, self.address.port,
                                    timeout=self.timeout)
        # Twisted adds its jitter (up to a second) on top of maxDelay: a quarter second here.
        retry = backoffPolicy(0.25, RECONNECT_MAX - 0.25, jitter=lambda: random.random() / 4)
        self._client = ClientService(endpoint, factory, clock=self.reactor, retryPolicy=retry)
        self._client.startService()

    def stopService(self):
        super().stopService()
        client, self._client = self._client, None
        if client is not None:
            return client.stopService()

    def _connected(self, connection: _Connection) -> None:
        self._connection = connection

    def _lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def call(self, command: str, *args) -> defer.Deferred:
        """Run one Redis command; fail with RedisUnavailable instead of waiting.

        Only the very first connection is waited for (up to the timeout), so that a request
        arriving while the daemon is still connecting is answered, not refused.
        """
        if self._connection is not None:
            self._was_connected = True
            return self._send(self._connection, command, args)
        if self._was_connected or self._client is None:
            return defer.fail(RedisUnavailable(f"no connection to {self.address}"))
        return defer.ensureDeferred(self._send_once_connected(command, args))

    async def _send_once_connected(self, command: str, args: tuple):
        deadline = self.reactor.seconds() + self.timeout
        while self._connection is None:
            if self.reactor.seconds() >= deadline:
                raise RedisUnavailable(f"no connection to {self.address} yet")
            await task.deferLater(self.reactor, 0.05)
        self._was_connected = True
        return await self._send(self._connection, command, args)

    def _send(self, connection: _Connection, name: str, args: tuple) -> defer.Deferred:
        d = connection.send(command(name.encode(), *map(encode, args)))
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._unavailable)
        return d

    def eval(self, script: str, keys=(), args=()) -> defer.Deferred:
        return self.call("EVAL", script, len(keys), *keys, *args)

    def _unavailable(self, failure):
        if failure.check(defer.TimeoutError, error.ConnectionLost, error.ConnectionDone):
            raise RedisUnavailable(f"{self.address} did not answer: {failure.getErrorMessage()}")
        if failure.check(RedisError) and str(failure.value).startswith(_TRANSIENT):
            raise RedisUnavailable(f"{self.address} cannot serve now: {failure.getErrorMessage()}")
        return failure
