"""RedisService against a real redis-server: first connection waited for, later outages not."""

import pytest
import pytest_twisted

from dockpart.redisconn import RedisAddress, RedisService, RedisUnavailable
from helpers import free_port


@pytest_twisted.ensureDeferred
async def test_a_command_sent_at_start_waits_for_the_first_connection(redis_server, redis_db):
    redis = RedisService(RedisAddress("127.0.0.1", redis_server.port, 0), timeout=5)
    redis.startService()  # no reactor turn yet: not connected
    try:
        assert not redis.connected
        assert await redis.call("SET", "k", "v") == "OK"
        assert redis_db.get("k") == "v"
    finally:
        await redis.stopService()


@pytest_twisted.ensureDeferred
async def test_no_server_gives_unavailable_after_the_timeout():
    redis = RedisService(RedisAddress("127.0.0.1", free_port(), 0), timeout=0.3)
    redis.startService()
    try:
        with pytest.raises(RedisUnavailable):
            await redis.call("PING")
    finally:
        await redis.stopService()
