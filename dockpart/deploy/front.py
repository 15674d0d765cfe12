"""The front route: which slice ``dockpart-proxy --servers-key dockpart:deploy:live`` sends to.

A switch replaces the list with the chosen slice's URL in one Redis script and announces it
on the list's change channel, so every proxy moves at once; requests already sent to the
old slice finish there, since both slices keep running.  A push never calls this.
"""

from twisted.internet import defer, task

from dockpart import keys, tier
from dockpart.redisconn import RedisAddress, RedisService, RedisUnavailable


async def _with_redis(reactor, address: RedisAddress, timeout: float, action):
    redis = RedisService(address, timeout, reactor)
    redis.startService()
    try:
        for _ in range(int(timeout / 0.05)):  # the connection comes up by itself; wait for it
            if redis.connected:
                break
            await task.deferLater(reactor, 0.05)
        if not redis.connected:
            raise RedisUnavailable(f"no connection to {address} within {timeout:g} s")
        return await action(redis)
    finally:
        await redis.stopService()


def run(address: RedisAddress, timeout: float, action):
    """Run ``action(redis)`` (async) from blocking code; return its result or raise its error.

    It runs the reactor once, so it is for a command-line program's single Redis step.
    """
    outcome = {}

    async def main(reactor):
        try:
            outcome["value"] = await _with_redis(reactor, address, timeout, action)
        except Exception as e:
            outcome["error"] = e

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit:
        pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def switch(redis: RedisService, url: str, list_key: str = keys.DEPLOY_LIVE) -> None:
    await tier.replace(redis, [url], list_key)


async def live(redis: RedisService, list_key: str = keys.DEPLOY_LIVE) -> list[str]:
    return await redis.call("LRANGE", list_key, 0, -1)
