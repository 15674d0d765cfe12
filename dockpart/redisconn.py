"""One way for every daemon to reach Redis: the ``--redis`` option and a service.

txredisapi queues a command forever while the server is away; a person waiting
for an answer deserves an error instead, so :meth:`RedisService.call` fails at
once when no connection is up and gives up after a timeout otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python import usage

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
REDIS_ENV = "DOCKPART_REDIS"
#: Longest wait, in seconds, between two tries to reach Redis again after it left.
RECONNECT_MAX = 2
URL_FORM = "redis://HOST:PORT/DB (with [USER]:PASSWORD@ before HOST when Redis wants one)"


class RedisUnavailable(Exception):
    """Redis could not answer in time; the caller should say so, not wait."""


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


class RedisService(Service):
    """A reconnecting Redis connection owned by the service tree."""

    log = Logger()

    def __init__(self, address: RedisAddress, timeout: float = 2.0, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.address = address
        self.timeout = timeout
        self.reactor = reactor
        self._factory: txredisapi.RedisFactory | None = None
        self._was_connected = False

    def startService(self) -> None:
        """Connect through txredisapi's public factory API (``startConnecting``), which keeps
        reconnecting, never more than RECONNECT_MAX seconds apart."""
        super().startService()
        address = self.address
        factory = txredisapi.RedisFactory(
            str(address), address.db, 1, isLazy=True, handler=txredisapi.ConnectionHandler,
            password=address.password, username=address.username, convertNumbers=False)
        factory.maxDelay = RECONNECT_MAX
        factory.startConnecting(HostnameEndpoint(self.reactor, address.host, address.port,
                                                 timeout=self.timeout))
        self._factory = factory

    def stopService(self):
        super().stopService()
        factory, self._factory = self._factory, None
        if factory is not None:
            return factory.disconnect()

    @property
    def connected(self) -> bool:
        return self._factory is not None and self._factory.size > 0

    def call(self, command: str, *args) -> defer.Deferred:
        """Run one Redis command; fail with RedisUnavailable instead of waiting.

        Only the very first connection is waited for (up to the timeout), so that a request
        arriving while the daemon is still connecting is answered, not refused.
        """
        if self.connected:
            self._was_connected = True
            return self._send(command, *args)
        if self._was_connected or self._factory is None:
            return defer.fail(RedisUnavailable(f"no connection to {self.address}"))
        return defer.ensureDeferred(self._send_once_connected(command, *args))

    async def _send_once_connected(self, command: str, *args):
        deadline = self.reactor.seconds() + self.timeout
        while not self.connected:
            if self.reactor.seconds() >= deadline:
                raise RedisUnavailable(f"no connection to {self.address} yet")
            await task.deferLater(self.reactor, 0.05)
        self._was_connected = True
        return await self._send(command, *args)

    def _send(self, command: str, *args) -> defer.Deferred:
        assert self._factory is not None  # called once connected
        d = self._factory.handler.execute_command(command, *args)
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._unavailable)
        return d

    def eval(self, script: str, keys=(), args=()) -> defer.Deferred:
        return self.call("EVAL", script, len(keys), *keys, *args)

    def _unavailable(self, failure):
        if failure.check(defer.TimeoutError, txredisapi.ConnectionError, error.ConnectionLost,
                         error.ConnectionDone):
            raise RedisUnavailable(f"{self.address} did not answer: {failure.getErrorMessage()}")
        if failure.check(txredisapi.ResponseError) \
                and str(failure.value).startswith(_TRANSIENT):
            raise RedisUnavailable(f"{self.address} cannot serve now: {failure.getErrorMessage()}")
        return failure
