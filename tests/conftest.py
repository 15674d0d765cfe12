from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import RedisProcess, pypy_gc_env

# The proxies these tests start on PyPy run with the GC settings scripts/up and the proxy image
# give them (scripts/test has exported them already; a plain pytest has not), or the user's own.
os.environ.update(pypy_gc_env())

# Fixtures kept beside their helpers: docker_images and docker_base (tests marked docker),
# reserved_ports_restored (the deploy tests, which name it in their pytestmark).
pytest_plugins = ("dockerkit", "deploykit")

#: The fast lane (`scripts/test --fast`, i.e. `pytest -m fast`): modules whose tests run in
#: memory or in process (Clock, MemoryReactor, StringTransport, StubTreq, at most the session's
#: redis-server), all of them in well under a minute. A module belongs here only if none of its
#: tests starts a daemon, a container or a browser; a name that matches no file is an error.
FAST_MODULES = frozenset({
    "test_apps_records.py",
    "test_apps_routes.py",
    "test_infra_apps.py",
    "test_releases_units.py",
    "test_rollover.py",
    "test_autoscale_policy.py",
    "test_autoscale_service.py",
    "test_dashboard_routes.py",
    "test_dashboard_units.py",
    "test_fileio_units.py",
    "test_infra_swarm_units.py",
    "test_infra_worker.py",
    "test_periodic.py",
    "test_records.py",
    "test_proxy_exchange.py",
    "test_proxy_hold.py",
    "test_proxy_ports.py",
    "test_probe.py",
    "test_proxy_units.py",
    "test_redisconn.py",
    "test_routes.py",
    "test_web_routes.py",
    "test_web_units.py",
    "test_website.py",
})


def pytest_configure(config):
    missing = sorted(name for name in FAST_MODULES if not (Path(__file__).parent / name).exists())
    if missing:
        raise pytest.UsageError(f"tests/conftest.py FAST_MODULES names no such file: {missing}")


def pytest_collection_modifyitems(items):
    """Mark every test of a FAST_MODULES module `fast`."""
    for item in items:
        if item.path.name in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def apps_dir(tmp_path, monkeypatch):
    """``dockpart apps create`` makes a git repository: in the test's own directory, never
    in the machine's default (/var/lib/dockpart/apps for root)."""
    path = tmp_path / "apps"
    monkeypatch.setenv("DOCKPART_APPS_DIR", str(path))
    return path


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
