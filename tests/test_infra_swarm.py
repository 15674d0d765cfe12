"""dockpart-infra with the swarm driver, and the stack file, on a real one-node Docker Swarm.

The ``swarm`` fixture makes the engine a one-node swarm (``docker swarm init --advertise-addr
127.0.0.1``) unless it is one already, and leaves it at the end only if it made it, removing
every service, stack, volume and node label the module made first, even when a test fails.
Containers outside those services are never touched: a one-node swarm does not stop them.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests

from dockerkit import run_images
from deploykit import Registry
from dockpart import keys
from dockpart.drivers import instance_name
from dockpart.drivers.docker import LABEL_MANAGED, LABEL_PORT, LABEL_TIER
from dockpart.drivers.swarm import node_address
from helpers import (ROOT, Daemon, RedisProcess, entries, free_port, port_block, served_by,
                     wait_for)
# The Docker driver's module fixtures (engine, redis, db: its infra_daemon is this module's).
from test_infra_docker import HIGH, LOW, db, engine, free_test_port, redis, servers  # noqa: F401

pytestmark = [pytest.mark.docker, pytest.mark.swarm]

STACK_FILE = ROOT / "docker-stack.yml"
SERVED_PORT = re.compile(r"Served by the instance at <b>http://[^<]+:(\d+)</b>")


def _docker(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def swarm(engine):
    """The engine as a one-node swarm; its node's attributes."""
    ours = engine.info()["Swarm"]["LocalNodeState"] != "active"
    if ours:
        _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        yield engine.nodes.list()[0].attrs
    finally:
        if ours:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True,
                           timeout=120)


@pytest.fixture(scope="module")
def made(engine, swarm):
    """Tiers (Redis URLs) whose services the module's tests made; removed at the end."""
    tiers: list[str] = []
    yield tiers
    for tier in tiers:
        remove_services(engine, tier)


def remove_services(engine, tier: str) -> None:
    for service in engine.services.list(filters={"label": [f"{LABEL_MANAGED}=true",
                                                          f"{LABEL_TIER}={tier}"]}):
        try:
            service.remove()
        except docker.errors.NotFound:
            pass
    # Their containers go a moment later; wait, so that the ports are free again and their
    # image can be removed.
    wait_for(lambda: not engine.containers.list(all=True,
                                                filters={"label": f"{LABEL_TIER}={tier}"}),
             60, what=f"the containers of {tier} to go")


def swarm_infra(redis_url: str, *extra: str) -> Daemon:
    return Daemon("dockpart-infra", "--driver", "swarm", "--redis", redis_url,
                  "--image", "dockpart-web:latest", "--port-range", f"{LOW}-{HIGH}",
                  "--interval", "0.05", "--drain", "1.5", "--reconcile-interval", "1",
                  "--stop-timeout", "2", "--retry-max", "1", *extra,
                  ready="dockpart-infra started")


@pytest.fixture(scope="module")
def infra_daemon(redis, docker_images, made):
    made.append(redis.url)
    dash_port = free_port()
    daemon = swarm_infra(redis.url, "--spawn-timeout", "30",
                         "--dashboard", f"tcp:{dash_port}:interface=127.0.0.1",
                         "--dashboard-token", "swarm-dash").start()
    daemon.dashboard = f"http://127.0.0.1:{dash_port}"
    yield daemon
    daemon.stop()


def spawn(db) -> tuple[int, str]:
    port = free_test_port()
    url = f"http://127.0.0.1:{port}"
    db.lpush(keys.SPAWN_QUEUE, url)
    return port, url


def service_of(engine, port: int):
    found = engine.services.list(filters={"name": instance_name(port)})
    return next((s for s in found if s.name == instance_name(port)), None)


def test_each_instance_is_a_labelled_one_replica_host_network_service_at_its_node_address(
        db, redis, engine, swarm, infra_daemon):
    spawned = [spawn(db) for _ in range(2)]
    node_url = {port: f"http://{node_address(swarm)}:{port}" for port, _ in spawned}
    wait_for(lambda: set(node_url.values()) <= set(servers(db)), 90,
             what="two services in servers")
    assert node_address(swarm) == "127.0.0.1"  # --advertise-addr 127.0.0.1
    for port, url in spawned:
        service = service_of(engine, port)
        spec = service.attrs["Spec"]
        assert spec["Labels"] == {LABEL_MANAGED: "true", LABEL_PORT: str(port),
                                  LABEL_TIER: redis.url}
        assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
        template = spec["TaskTemplate"]
        assert template["ContainerSpec"]["Labels"] == spec["Labels"]
        assert f"start_port={port}" in template["ContainerSpec"]["Env"]
        assert f"DOCKPART_REDIS={redis.url}" in template["ContainerSpec"]["Env"]
        container, = engine.containers.list(filters={"label": f"{LABEL_PORT}={port}"})
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert template["RestartPolicy"]["Condition"] == "any"
        assert template["Placement"]["MaxReplicas"] == 1
        assert served_by(url + "/") == url
    assert db.llen(keys.SPAWNING) == 0 and db.llen(keys.DEAD_LETTERS) == 0
    for port, url in spawned:
        db.lpush(keys.DESTROY_QUEUE, url)
    wait_for(lambda: entries(db, keys.DESTROY_QUEUE, keys.DESTROYING) == 0, 60,
             what="the destroy requests to be done")
    assert servers(db) == []
    for port, _ in spawned:
        assert service_of(engine, port) is None
        wait_for(lambda: not engine.containers.list(all=True, filters={
            "label": f"{LABEL_PORT}={port}"}), 15, what="Swarm to remove the stopped container")


def test_a_destroyed_instance_leaves_servers_then_serves_through_the_drain(db, engine,
                                                                           infra_daemon):
    port, url = spawn(db)
    wait_for(lambda: url in servers(db), 60, what="the instance in servers")
    db.lpush(keys.DESTROY_QUEUE, url)
    wait_for(lambda: url not in servers(db), 10, interval=0.01, what="the url to leave servers")
    assert requests.get(url, timeout=2).status_code == 200  # --drain 1.5: still serving
    wait_for(lambda: service_of(engine, port) is None, 30, what="the service to be removed")
    done = f"destroyed service {instance_name(port)}"
    # Said once the request is off the processing list, a moment after the service went.

    def said():
        output = infra_daemon.output()
        return done in output and output
    output = wait_for(said, 10, what="infra to say the destroy is done")
    assert output.index(f"{url} left servers; draining") < output.index(done)


def test_a_service_dockpart_does_not_manage_is_left_alone(db, engine, swarm, infra_daemon):
    port = free_test_port()
    base = engine.images.get("dockpart-base:bookworm").id  # by ID: no registry lookup
    stranger = engine.services.create(base, ["sleep", "300"], name=instance_name(port))
    try:
        url = f"http://127.0.0.1:{port}"
        db.lpush(keys.SPAWN_QUEUE, url)
        db.lpush(keys.DESTROY_QUEUE, url)
        wait_for(lambda: db.llen(keys.DEAD_LETTERS) == 2, 30, what="two dead letters")
        for letter in map(json.loads, db.lrange(keys.DEAD_LETTERS, 0, -1)):
            assert "dockpart does not manage" in letter["reason"]
        time.sleep(1.5)  # a reconcile pass or more
        stranger.reload()
        assert stranger.attrs["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
        assert servers(db) == []
    finally:
        stranger.remove()


def test_reconcile_adds_back_running_services_and_drops_removed_ones(db, engine, infra_daemon):
    port, url = spawn(db)
    wait_for(lambda: url in servers(db), 60, what="the service in servers")
    db.lrem(keys.SERVERS, 0, url)
    wait_for(lambda: url in servers(db), 10, what="reconcile to add it back")
    service_of(engine, port).remove()
    wait_for(lambda: url not in servers(db), 10, what="reconcile to drop it")
    # The log line comes through the daemon's pipe a moment after the change in Redis.
    wait_for(lambda: f"removed {url} from servers" in infra_daemon.output(), 5,
             what="reconcile to say so")
    assert f"added {url} back" in infra_daemon.output()


def test_a_crashed_instance_comes_back_by_the_restart_policy_and_stays_in_servers(
        db, engine, infra_daemon):
    port, url = spawn(db)
    wait_for(lambda: url in servers(db), 60, what="the service in servers")
    service_id = service_of(engine, port).id
    crashed, = engine.containers.list(filters={"label": f"{LABEL_PORT}={port}"})
    crashed.kill()

    def replaced():
        running = engine.containers.list(filters={"label": f"{LABEL_PORT}={port}"})
        return [c for c in running if c.id != crashed.id]
    wait_for(replaced, 60, what="Swarm to start a new task")
    wait_for(lambda: served_by(url + "/") == url, 30, what="the new task to answer")
    wait_for(lambda: url in servers(db), 15, what="the url in servers (reconcile)")
    assert len(engine.containers.list(filters={"label": f"{LABEL_PORT}={port}"})) == 1
    # Swarm restarted it; infra neither removed nor replaced the service.
    assert service_of(engine, port).id == service_id
    assert f"{instance_name(port)} exited" not in infra_daemon.output()


def test_the_dashboard_shows_each_instance_with_its_service_and_node(db, engine, swarm,
                                                                     infra_daemon):
    port, url = spawn(db)
    wait_for(lambda: url in servers(db), 60, what="the service in servers")

    def row():
        state = requests.get(infra_daemon.dashboard + "/api/state", timeout=5,
                             headers={"Authorization": "Bearer swarm-dash"}).json()
        return next((r for r in state["instances"] if r["url"] == url
                     and r["state"] == "running"), None)
    seen = wait_for(row, 10, what="the instance's row on the dashboard")
    assert seen["node"] == node_address(swarm)
    assert seen["id"] == service_of(engine, port).short_id


def test_infra_killed_mid_spawn_and_restarted_leaves_exactly_one_service_registered(
        engine, docker_images, made):
    """Its own infra and Redis (one infra per Redis)."""
    own = RedisProcess().start()
    made.append(own.url)
    client = own.client()
    daemon = swarm_infra(own.url, "--lease", "1").start()
    try:
        port, url = spawn(client)
        wait_for(lambda: f"created service {instance_name(port)}" in daemon.output(), 30,
                 what="the service to be created")
        daemon.stop(signal.SIGKILL)
        assert client.lrange(keys.SPAWNING, 0, -1) == [url] and servers(client) == []
        daemon = swarm_infra(own.url, "--lease", "1").start()
        wait_for(lambda: url in servers(client), 60, what="the restarted infra to register it")
        assert servers(client) == [url] and client.llen(keys.SPAWNING) == 0
        assert len(engine.services.list(filters={"label": f"{LABEL_PORT}={port}"})) == 1
        assert "finishing 1 request(s)" in daemon.output()
        assert f"created service {instance_name(port)}" not in daemon.output()  # adopted
    finally:
        daemon.stop()
        client.close()
        own.stop()


def test_constraints_and_max_per_node_decide_where_instances_may_go(engine, swarm, made):
    """A node label the constraint asks for; a second instance past --max-per-node 1."""
    own = RedisProcess().start()
    made.append(own.url)
    client = own.client()
    label = f"dockpart-test-{uuid.uuid4().hex[:6]}"
    node = engine.nodes.get(swarm["ID"])
    daemon = swarm_infra(own.url, "--constraint", f"node.labels.{label}==web",
                         "--max-per-node", "1", "--spawn-timeout", "4").start()
    try:
        port, url = spawn(client)
        wait_for(lambda: client.llen(keys.DEAD_LETTERS) == 1, 30, what="an unplaceable spawn")
        letter = json.loads(client.lindex(keys.DEAD_LETTERS, 0))
        assert letter["entry"] == url and "was not placed" in letter["reason"]
        assert service_of(engine, port) is None  # removed, not left pending
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {**spec.get("Labels", {}), label: "web"}})
        port, url = spawn(client)
        wait_for(lambda: url in servers(client), 60, what="the spawn on the labelled node")
        port2, url2 = spawn(client)
        wait_for(lambda: client.llen(keys.DEAD_LETTERS) == 2, 30, what="a spawn past the limit")
        assert json.loads(client.lindex(keys.DEAD_LETTERS, 0))["entry"] == url2
        assert servers(client) == [url] and service_of(engine, port2) is None
    finally:
        daemon.stop()
        node.reload()
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {k: v for k, v in spec.get("Labels", {}).items()
                                        if k != label}})
        client.close()
        own.stop()


def test_scripts_images_push_tags_and_pushes_every_image_to_a_registry(engine, docker_images):
    registry = Registry(free_port()).start()
    where = f"127.0.0.1:{registry.port}"
    try:
        run_images("push", where)
        for tag in docker_images.values():
            repository = tag.partition(":")[0]
            listed = requests.get(f"http://{where}/v2/{repository}/tags/list", timeout=5).json()
            assert listed == {"name": repository, "tags": ["latest"]}
            pushed = engine.images.get(f"{where}/{tag}")
            assert pushed.id == engine.images.get(tag).id
            assert any(d.startswith(f"{where}/{repository}@") for d in pushed.attrs["RepoDigests"])
    finally:
        for tag in docker_images.values():
            try:
                engine.images.remove(f"{where}/{tag}")
            except docker.errors.ImageNotFound:
                pass
        registry.stop()


@pytest.fixture
def stack_images(engine, docker_images):
    """dockpart-NAME:TAG for the stack, each built from this checkout: the shared :latest
    images are rebuilt from whichever checkout ran scripts/images last."""
    tag = f"stack-test-{uuid.uuid4().hex[:6]}"
    made = []
    try:
        for name in ("web", "proxy", "infra", "redis"):
            engine.images.build(path=str(ROOT), dockerfile=f"Dockerfiles/{name}.Dockerfile",
                                tag=f"dockpart-{name}:{tag}", network_mode="host", rm=True,
                                buildargs={"BASE_IMAGE": "dockpart-base:bookworm"})
            made.append(f"dockpart-{name}:{tag}")
        yield tag
    finally:
        for image in made:
            # A task container of a removed service may linger a moment, holding its image
            # (by name: the image's ID may be :latest's, which other tests' containers run).
            wait_for(lambda image=image: not any(
                c.attrs["Image"].partition("@")[0] == image
                for c in engine.containers.list(all=True)), 60,
                what=f"the containers created from {image} to go")
            engine.images.remove(image)


@pytest.fixture
def stack(engine, swarm, stack_images):
    """docker-stack.yml deployed as a stack of its own, on free ports; removed at the end."""
    name = f"dockpart-test-{uuid.uuid4().hex[:6]}"
    web = port_block(3)
    env = {"DOCKPART_REDIS_PORT": str(free_port()), "DOCKPART_WEB_PORT": str(web),
           "DOCKPART_PROXY_PORT": str(free_port()), "DOCKPART_TAG": stack_images,
           "DOCKPART_REDIS_PASSWORD": uuid.uuid4().hex}
    redis_url = f"redis://127.0.0.1:{env['DOCKPART_REDIS_PORT']}/0"
    node = engine.nodes.get(swarm["ID"])
    spec = node.attrs["Spec"]
    added = {k: "true" for k in ("dockpart.redis", "dockpart.proxy")
             if k not in (spec.get("Labels") or {})}
    node.update({**spec, "Labels": {**(spec.get("Labels") or {}), **added}})
    try:
        done = subprocess.run(["docker", "stack", "deploy", "--resolve-image", "never",
                               "-c", str(STACK_FILE), name], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        yield name, env, redis_url
    finally:
        subprocess.run(["docker", "stack", "rm", name], capture_output=True, timeout=120)
        remove_services(engine, redis_url)  # what the stack's infra spawned
        wait_for(lambda: not engine.containers.list(
            all=True, filters={"label": f"com.docker.stack.namespace={name}"}), 60,
            what="the stack's containers to go")
        for volume in engine.volumes.list(filters={"label": f"com.docker.stack.namespace={name}"}):
            volume.remove(force=True)
        node.reload()
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {k: v for k, v in (spec.get("Labels") or {}).items()
                                        if k not in added}})


def test_the_stack_answers_through_the_proxy_in_rotation_with_a_spawned_instance(engine, stack):
    name, env, redis_url = stack
    proxy = f"http://127.0.0.1:{env['DOCKPART_PROXY_PORT']}/"
    first = f"http://127.0.0.1:{env['DOCKPART_WEB_PORT']}"
    wait_for(lambda: served_by(proxy) == first, 120, interval=0.5,
             what="the stack's proxy to answer from the first instance")
    reply = requests.get(first + "/spawn", timeout=10)
    assert reply.status_code == 202, reply.text
    spawned = f"http://127.0.0.1:{int(env['DOCKPART_WEB_PORT']) + 1}"
    wait_for(lambda: spawned in requests.get(first + "/listservers", timeout=5, headers={
        "accept": "application/json"}).json()["servers"], 90, interval=0.5,
        what="the stack's infra to spawn an instance")
    seen = [served_by(proxy) for _ in range(6)]
    assert set(seen) == {first, spawned} and seen[0] != seen[1], seen
    infra, = engine.services.list(filters={"name": f"{name}_infra"})
    assert infra.attrs["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == ["node.role==manager"]
    redis, = engine.services.list(filters={"name": f"{name}_redis"})
    assert redis.attrs["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [
        "node.labels.dockpart.redis==true"]
    assert service_of(engine, int(env["DOCKPART_WEB_PORT"]) + 1).attrs["Spec"]["Labels"][
        LABEL_TIER] == redis_url


class Engine:
    """A dockerd of its own in network namespace ``netns`` (its own data, exec root, socket)."""

    def __init__(self, netns: str, address: str):
        self.netns, self.address = netns, address
        # Short: containerd's socket lives under it, and a socket path has at most 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix=f"{netns}-"))
        self.socket = f"unix://{self.dir}/docker.sock"
        self.proc = None

    def enter(self) -> list[str]:
        """The argv prefix that runs a program inside the namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def start(self) -> "Engine":
        self.log = open(self.dir / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [*self.enter(), "dockerd", "--data-root", str(self.dir / "data"),
             "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "dockerd.pid"),
             "-H", self.socket, "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--ip-masq=false"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.docker("info", check=False), 60, interval=0.5,
                 what=f"the dockerd in {self.netns}")
        return self

    def docker(self, *args: str, check: bool = True, **kw):
        done = subprocess.run(["docker", "-H", self.socket, *args], capture_output=True,
                              text=True, timeout=120, **kw)
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.returncode == 0 and done.stdout

    def halt(self) -> None:
        """Stop the dockerd, keeping its state (it is still a swarm node when started again)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.log.close()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.docker("swarm", "leave", "--force", check=False)
        self.halt()
        # dockerd leaves mounts under its roots (its netns handle, the data root's bind mount).
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(
                f"{self.dir}/")]
        for point in sorted(points, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def two_nodes(tmp_path, docker_images):
    """Two engines in two network namespaces joined by a veth pair (10.77.0.1 and .2, which
    exist only inside them), one swarm: A the manager, B a worker; dockpart-web loaded in both."""
    tag = uuid.uuid4().hex[:5]
    a = Engine(f"dpA{tag}", "10.77.0.1")
    b = Engine(f"dpB{tag}", "10.77.0.2")
    made = []
    try:
        for engine, peer in ((a, f"vA{tag}"), (b, f"vB{tag}")):
            subprocess.run(["ip", "netns", "add", engine.netns], check=True)
            made.append(engine)
        subprocess.run(["ip", "link", "add", f"vA{tag}", "type", "veth", "peer", "name",
                        f"vB{tag}"], check=True)
        for engine, link in ((a, f"vA{tag}"), (b, f"vB{tag}")):
            ns = ["ip", "-n", engine.netns]
            subprocess.run(["ip", "link", "set", link, "netns", engine.netns], check=True)
            subprocess.run([*ns, "addr", "add", f"{engine.address}/24", "dev", link], check=True)
            subprocess.run([*ns, "link", "set", link, "up"], check=True)
            subprocess.run([*ns, "link", "set", "lo", "up"], check=True)
        image = tmp_path / "web.tar"
        _docker("save", "-o", str(image), docker_images["web"])
        for engine in (a, b):
            engine.start().docker("load", "-q", "-i", str(image))
        a.docker("swarm", "init", "--advertise-addr", a.address,
                 "--listen-addr", f"{a.address}:2377")
        token = a.docker("swarm", "join-token", "-q", "worker").strip()
        b.docker("swarm", "join", "--token", token, "--advertise-addr", b.address,
                 "--listen-addr", f"{b.address}:2377", f"{a.address}:2377")
        yield a, b
    finally:
        for engine in (b, a):
            engine.stop()  # leaving the swarm stops the services' tasks first
        for engine in made:
            subprocess.run(["ip", "netns", "del", engine.netns])


def test_two_nodes_get_an_instance_each_and_the_proxy_sends_to_both(two_nodes, tmp_path):
    """Redis, infra and proxy run in the manager's namespace; then its engine goes away and
    comes back while a destroy is in hand."""
    a, b = two_nodes
    sock = tmp_path / "redis.sock"
    redis_port = free_port()
    redis_url = f"redis://{a.address}:{redis_port}/0"
    redis = subprocess.Popen([*a.enter(), "redis-server", "--port", str(redis_port), "--bind",
                              a.address, "--unixsocket", str(sock), "--save", "",
                              "--appendonly", "no", "--protected-mode", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        import redis as redis_py
        db = redis_py.Redis(unix_socket_path=str(sock), decode_responses=True)
        wait_for(db.ping, 10, what="redis-server in the manager's namespace")
        proxy_port = free_port()
        for daemon in (
                Daemon("dockpart-infra", "--driver", "swarm", "--redis", redis_url,
                       "--image", "dockpart-web:latest", "--advertise-host", a.address,
                       "--port-range", f"{LOW}-{HIGH}", "--interval", "0.05", "--drain", "0.5",
                       "--retry-max", "1",
                       "--max-per-node", "1", "--instance-interface", "0.0.0.0",
                       ready="dockpart-infra started", env={"DOCKER_HOST": a.socket}),
                Daemon("dockpart-proxy", "--redis", redis_url,
                       "--listen", f"tcp:{proxy_port}:interface=127.0.0.1", ready="listening")):
            daemon.argv = [*a.enter(), *daemon.argv]
            started.append(daemon.start())
        ports = [free_test_port(), free_test_port()]
        for port in ports:
            db.lpush(keys.SPAWN_QUEUE, f"http://{a.address}:{port}")
        wait_for(lambda: db.llen(keys.SERVERS) == 2, 120, interval=0.2,
                 what=f"two instances in servers (dead letters: "
                      f"{db.lrange(keys.DEAD_LETTERS, 0, -1)})")
        hosts = {url.rpartition(":")[0] for url in db.lrange(keys.SERVERS, 0, -1)}
        assert hosts == {f"http://{a.address}", f"http://{b.address}"}

        def through_proxy() -> str:
            page = subprocess.run([*a.enter(), "curl", "-fsS", f"http://127.0.0.1:{proxy_port}/"],
                                  capture_output=True, text=True, timeout=10)
            assert page.returncode == 0, page.stderr
            # Each instance names --advertise-host with its own port (docs/swarm.md: known limits).
            return SERVED_PORT.search(page.stdout).group(1)
        wait_for(lambda: {int(through_proxy()) for _ in range(4)} == set(ports), 30,
                 what="the proxy to send to both nodes' instances")

        # The manager's engine goes away while a destroy is in hand: it waits, then is done.
        infra = started[0]
        on_b = next(url for url in db.lrange(keys.SERVERS, 0, -1) if b.address in url)
        a.halt()  # reconcile may say so before the destroy is queued: wait for both
        db.lpush(keys.DESTROY_QUEUE, on_b)
        wait_for(lambda: f"{on_b} left servers; draining" in infra.output(), 10,
                 what="the destroy to be in hand")
        wait_for(lambda: "engine is unreachable" in infra.output(), 30,
                 what="the infra to notice that the manager's engine is away")
        assert db.lrange(keys.DESTROYING, 0, -1) == [on_b] and db.llen(keys.DEAD_LETTERS) == 0
        a.start()
        wait_for(lambda: db.llen(keys.DESTROYING) == 0, 120, interval=0.2,
                 what="the destroy to be done once the engine is back")
        assert on_b not in db.lrange(keys.SERVERS, 0, -1) and db.llen(keys.DEAD_LETTERS) == 0
        assert instance_name(int(on_b.rpartition(":")[2])) not in a.docker(
            "service", "ls", "--format", "{{.Name}}")
        assert "engine is reachable again" in infra.output()
    finally:
        for daemon in started:
            daemon.stop()
        redis.terminate()
        redis.wait(10)
