"""The swarm driver's address design, in this process: the worker and a driver that places
instances on other hosts (no engine), and the driver's own pure parts.

The placed hosts (10.9.0.x) are never contacted: the probe is a fake that knows where each
instance runs.
"""

import pytest
import pytest_twisted
from docker.errors import APIError
from requests import Response
from twisted.internet import defer, reactor
from twisted.python import usage

from dockpart import infra, infra_worker, keys
from dockpart.drivers import DriverError, Instance, Status, ThreadPoolService, Unavailable
from dockpart.drivers.swarm import SwarmDriver, node_address
import test_infra_worker
from test_infra_worker import until

REQUEST = "http://127.0.0.1:4001"


class PlacingDriver:
    """Instances run on whichever host ``node`` names when they start."""

    name = "placing"

    def __init__(self):
        self.node = "10.9.0.2"
        self.running: dict[int, str | None] = {}  # port -> host, None while it restarts
        self.removed: list[int] = []

    def describe(self, port):
        return f"placed instance {port}"

    async def instances(self):
        return {port: Instance(port, Status.RUNNING, f"http://{host}:{port}") if host
                else Instance(port, Status.RESTARTING) for port, host in self.running.items()}

    async def start(self, port):
        self.running.setdefault(port, self.node)
        return f"http://{self.running[port]}:{port}"

    async def remove(self, port):
        self.removed.append(port)
        self.running.pop(port, None)


class Setup(test_infra_worker.Setup):
    """The worker with a placing driver; the probe answers only at the host it placed."""

    def __init__(self, redis_url: str):
        driver = PlacingDriver()
        self.probed = []

        def probe(_reactor, port, host):
            self.probed.append((host, port))
            return defer.succeed(driver.running.get(port) == host)
        super().__init__(redis_url, driver, probe,
                         infra_worker.EntryRules("127.0.0.1", 4001, 4999, 4000, any_host=True),
                         reconcile_interval=0.1, drain=0.05)

    async def lists(self):
        return {key: await self.redis.call("LRANGE", key, 0, -1)
                for key in (keys.SERVERS, keys.SPAWNING, keys.DESTROYING, keys.DEAD_LETTERS)}


@pytest_twisted.ensureDeferred
async def test_a_spawn_registers_the_url_where_the_driver_placed_the_instance(redis_db,
                                                                              redis_server):
    redis_db.lpush(keys.SPAWN_QUEUE, REQUEST)
    async with Setup(redis_server.url) as s:
        async def registered():
            return (await s.lists())[keys.SERVERS] == ["http://10.9.0.2:4001"]
        await until(registered)
        assert (await s.lists())[keys.SPAWNING] == []
        assert ("10.9.0.2", 4001) in s.probed and ("127.0.0.1", 4001) not in s.probed


@pytest_twisted.ensureDeferred
async def test_a_destroy_names_the_placed_url_and_removes_that_instance(redis_db, redis_server):
    """The destroy entry's host is the node's (as /destroy picks it from servers)."""
    async with Setup(redis_server.url) as s:
        s.driver.running[4001] = "10.9.0.2"
        redis_db.rpush(keys.SERVERS, "http://10.9.0.2:4001")
        redis_db.lpush(keys.DESTROY_QUEUE, "http://10.9.0.2:4001")

        async def done():
            return not s.driver.running and (await s.lists())[keys.DESTROYING] == []
        await until(done)
        lists = await s.lists()
        assert lists[keys.SERVERS] == [] and lists[keys.DEAD_LETTERS] == []


@pytest_twisted.ensureDeferred
async def test_reconcile_follows_an_instance_that_swarm_moved_to_another_node(redis_db,
                                                                             redis_server):
    async with Setup(redis_server.url) as s:
        s.driver.running[4001] = "10.9.0.2"
        redis_db.rpush(keys.SERVERS, "http://10.9.0.2:4001")
        s.driver.running[4001] = "10.9.0.3"  # its node left; Swarm started it elsewhere

        async def moved():
            return (await s.lists())[keys.SERVERS] == ["http://10.9.0.3:4001"]
        await until(moved)


@pytest_twisted.ensureDeferred
async def test_an_instance_swarm_restarts_leaves_servers_and_comes_back_without_a_respawn(
        redis_db, redis_server):
    """No address while its task restarts: unlisted, neither removed nor replaced."""
    async with Setup(redis_server.url) as s:
        s.driver.running[4001] = None
        redis_db.rpush(keys.SERVERS, "http://10.9.0.2:4001")

        async def unlisted():
            return (await s.lists())[keys.SERVERS] == []
        await until(unlisted)
        s.driver.running[4001] = "10.9.0.2"  # placed and up again

        async def back():
            return (await s.lists())[keys.SERVERS] == ["http://10.9.0.2:4001"]
        await until(back)
        assert s.driver.removed == [] and redis_db.lrange(keys.SPAWN_QUEUE, 0, -1) == []
        assert (await s.lists())[keys.DEAD_LETTERS] == []


def test_a_managers_address_comes_from_its_manager_status_when_status_reads_no_address():
    assert node_address({"Status": {"Addr": "10.1.2.3"}}) == "10.1.2.3"
    assert node_address({"Status": {"Addr": "0.0.0.0"},
                         "ManagerStatus": {"Addr": "10.1.2.4:2377"}}) == "10.1.2.4"
    assert node_address({"Status": {"Addr": "127.0.0.1"},
                         "ManagerStatus": {"Addr": "10.1.2.5:2377"}}) == "10.1.2.5"
    assert node_address({"Status": {"Addr": "127.0.0.1"},
                         "ManagerStatus": {"Addr": "127.0.0.1:2377"}}) == "127.0.0.1"


def _api_error(status: int) -> APIError:
    response = Response()
    response.status_code = status
    return APIError("boom", response, explanation="The swarm does not have a leader")


@pytest.mark.parametrize("status, sorted_as", [(503, Unavailable), (400, DriverError)])
@pytest_twisted.ensureDeferred
async def test_a_swarm_without_a_leader_is_waited_out_and_a_bad_request_is_not(status, sorted_as):
    pool = ThreadPoolService("test-swarm", reactor=reactor)
    pool.startService()
    driver = SwarmDriver(pool, "img", ".", "Dockerfile", {}, "redis://x", "redis://x",
                         client_factory=object, reactor=reactor)

    def fails(client):
        raise _api_error(status)
    try:
        with pytest.raises(sorted_as):
            await driver._call(fails)
    finally:
        await pool.stopService()


@pytest.mark.parametrize("args, message", [
    (["--driver", "swarm", "--constraint", "node.labels.dockpart"], "Swarm's syntax"),
    (["--driver", "swarm", "--max-per-node", "0"], "at least 1"),
    (["--driver", "docker", "--constraint", "node.role==manager"], "only apply to --driver swarm"),
    (["--driver", "process", "--max-per-node", "2"], "only apply to --driver swarm"),
])
def test_bad_swarm_options_are_refused_with_a_clear_message(args, message):
    with pytest.raises(usage.UsageError, match=message):
        infra.Options().parseOptions(args)


def test_swarm_options_reach_the_driver_and_any_node_host_is_accepted():
    config = infra.Options()
    config.parseOptions(["--driver", "swarm", "--constraint", "node.labels.dockpart==web",
                         "--constraint", "node.role!=manager", "--max-per-node", "3",
                         "--instance-interface", "0.0.0.0", "--spawn-timeout", "12"])
    driver = infra.make_driver(config, ThreadPoolService("test", reactor=reactor), reactor)
    assert isinstance(driver, SwarmDriver)
    assert driver.constraints == ["node.labels.dockpart==web", "node.role!=manager"]
    assert (driver.max_per_node, driver.interface, driver.place_timeout) == (3, "0.0.0.0", 12)
    service = infra.makeService(config, reactor)
    worker, = [s for s in service if isinstance(s, infra_worker.Worker)]
    assert worker.rules.check(infra_worker.DESTROY, "http://10.9.0.7:3005") == 3005


@pytest.mark.parametrize("max_per_node, waits", [(None, False), (1, True)])
@pytest_twisted.ensureDeferred
async def test_a_task_no_node_takes_holds_up_other_spawns_only_under_max_per_node(max_per_node,
                                                                                  waits):
    """Port 4001's task is never placed; 4002's is at once."""
    driver = SwarmDriver(None, "img", ".", "Dockerfile", {}, "redis://x", "redis://x",
                         client_factory=object, reactor=reactor, max_per_node=max_per_node,
                         place_timeout=2.0)
    placed = {4002: "http://10.9.0.2:4002"}

    async def ensure_image():
        return "img"
    driver.ensure_image = ensure_image

    calls = []

    def call(f, *args):
        port = args[1] if len(args) > 1 else None
        calls.append((f.__name__, port))
        answers = {"_thd_pinned": "img@sha256:x", "_thd_full_nodes": [], "_thd_create": True,
                   "_thd_node": "node-2" if port in placed else None,
                   "_thd_url": placed.get(port), "_thd_placement": (None, None, "no node")}
        return defer.succeed(answers[f.__name__])
    driver._call = call
    stuck = defer.ensureDeferred(driver.start(4001))
    assert await driver.start(4002) == "http://10.9.0.2:4002"
    with pytest.raises(DriverError, match="was not placed"):
        await stuck
    # Under the limit, 4002 is created only once 4001 stopped waiting for a node (many looks
    # later); without it, right after 4001's first look.
    created = calls.index(("_thd_create", 4002))
    looks = [name for name, port in calls[:created] if port == 4001 and name in ("_thd_node",
                                                                                  "_thd_url")]
    assert (len(looks) > 1) is waits
