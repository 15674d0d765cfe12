"""One way for every daemon to reach Redis: the ``--redis`` option and a service.

txredisapi queues a command forever while the server is away; a person waiting
for an answer deserves an error instead, so :meth:`RedisService.call` fails at
once when no connection is up and gives up after a timeout otherwise.
"""

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.python import usage

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
REDIS_ENV = "DOCKPART_REDIS"


class RedisUnavailable(Exception):
    """Redis could not answer in time; the caller should say so, not wait."""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError as e:
            raise usage.UsageError(f"--redis {url!r}: {e}") from None
        if parts.scheme != "redis" or not parts.hostname:
            raise usage.UsageError(f"--redis {url!r}: expected redis://HOST:PORT/DB")
        path = parts.path.strip("/") or "0"
        if not path.isdigit():
            raise usage.UsageError(f"--redis {url!r}: the database must be a number, not {path!r}")
        return cls(parts.hostname, port, int(path), parts.password)

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class RedisOptions(usage.Options):
    """Mix-in for daemon options: ``--redis`` with ``DOCKPART_REDIS`` as fallback."""

    optParameters = [
        ["redis", None, None,
         f"Redis URL redis://HOST:PORT/DB (env {REDIS_ENV}, default {DEFAULT_REDIS})."],
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
        self._handler = None
        self._was_connected = False

    def startService(self) -> None:
        super().startService()
        self._handler = txredisapi.lazyConnection(
            self.address.host, self.address.port, dbid=self.address.db,
            password=self.address.password, reconnect=True, convertNumbers=False,
            connectTimeout=self.timeout,
        )
        self._handler._factory.maxDelay = 2

    def stopService(self):
        super().stopService()
        handler, self._handler = self._handler, None
        if handler is not None:
            return handler.disconnect()

    @property
    def connected(self) -> bool:
        return self._handler is not None and bool(self._handler._factory.size)

    def call(self, command: str, *args) -> defer.Deferred:
        """Run one Redis command; fail with RedisUnavailable instead of waiting.

        Only the very first connection is waited for (up to the timeout), so that a request
        arriving while the daemon is still connecting is answered, not refused.
        """
        if self.connected:
            self._was_connected = True
            return self._send(command, *args)
        if self._was_connected or self._handler is None:
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
        d = self._handler.execute_command(command, *args)
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._unavailable)
        return d

    def eval(self, script: str, keys=(), args=()) -> defer.Deferred:
        return self.call("EVAL", script, len(keys), *keys, *args)

    def _unavailable(self, failure):
        if failure.check(defer.TimeoutError, txredisapi.ConnectionError, error.ConnectionLost,
                         error.ConnectionDone):
            raise RedisUnavailable(f"{self.address} did not answer: {failure.getErrorMessage()}")
        return failure
