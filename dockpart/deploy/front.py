"""The front route: which slice ``dockpart-proxy --servers-key dockpart:deploy:live`` sends to.

A switch replaces the list with the chosen slice's URL in one Redis script and announces it
on the list's change channel, so every proxy moves at once; requests already sent to the
old slice finish there, since both slices keep running.  A push never calls this.

The ``dockpart deploy`` command is a blocking program, so it speaks to Redis with redis-py's
blocking client (a Twisted reactor runs only once per process: a second call would fail); the
script is :func:`dockpart.tier.replace`'s, the one the daemons run.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from dockpart import keys, tier
from dockpart.redisconn import RedisAddress, RedisUnavailable

if TYPE_CHECKING:
    import redis


class Scripts:
    """A redis-py client behind the ``eval(script, keys, args)`` that tier's scripts call."""

    def __init__(self, client: "redis.Redis"):
        self.client = client

    def eval(self, script: str, keys=(), args=()):
        return self.client.eval(script, len(keys), *keys, *args)


@contextmanager
def connected(address: RedisAddress, timeout: float) -> Iterator["redis.Redis"]:
    """A blocking client to ``address``; any Redis failure inside is a RedisUnavailable."""
    import redis  # here, not above: every push runs this program and never needs Redis (0.15 s)

    client = redis.Redis(host=address.host, port=address.port, db=address.db,
                         username=address.username, password=address.password,
                         socket_timeout=timeout,
                         socket_connect_timeout=timeout, decode_responses=True)
    try:
        yield client
    except redis.RedisError as e:
        raise RedisUnavailable(f"{address}: {e}") from None
    finally:
        client.close()


def switch(address: RedisAddress, timeout: float, url: str, list_key: str = keys.DEPLOY_LIVE) -> None:
    """Make the front route ``url`` alone, and tell the proxies."""
    with connected(address, timeout) as client:
        tier.replace(Scripts(client), [url], list_key)  # type: ignore[arg-type]  # same eval()


def live(address: RedisAddress, timeout: float, list_key: str = keys.DEPLOY_LIVE) -> list[str]:
    """The URLs the front route sends to now."""
    with connected(address, timeout) as client:
        return client.lrange(list_key, 0, -1)  # type: ignore[return-value]  # decode_responses
