from __future__ import annotations

import pytest

from helpers import RedisProcess

# Fixtures kept beside their helpers: docker_images (tests marked docker),
# reserved_ports_restored (the deploy tests, which name it in their pytestmark).
pytest_plugins = ("dockerkit", "deploykit")


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the whole session."""
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server):
    """The session's Redis, emptied before each test; a redis-py client to it."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def own_redis():
    """A redis-server of the test's own, to restart, flush, count commands on, or give an
    infra of its own (one infra per Redis)."""
    server = RedisProcess().start()
    yield server
    server.stop()
