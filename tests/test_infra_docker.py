"""dockpart-infra with the Docker driver, against the real engine.

The module's infra builds its own image tag from Dockerfiles/web.Dockerfile (the
"built once if missing" path; the layers are cached from the docker_images
fixture's build, so it takes seconds).  The engine-restart test stops and starts
dockerd exactly as scripts/lib.sh does: it runs an infra and a Redis of its own,
restores the engine even when it fails, and is marked ``engine_restart`` so that
it can be left out (``-m "not engine_restart"``) where others use the engine.
"""

import json
import os
import random
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import docker
import pytest
import requests

from dockerkit import docker_client
from dockpart import keys
from dockpart.drivers import instance_name
from dockpart.drivers.docker import LABEL_MANAGED, LABEL_PORT, LABEL_TIER
from helpers import ROOT, Daemon, RedisProcess, entries, wait_for

pytestmark = pytest.mark.docker

#: Test ports come from here: outside the kernel's ephemeral range that free_port() uses.
LOW, HIGH = 21000, 21999


def free_test_port() -> int:
    while True:
        port = random.randint(LOW, HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def engine():
    client = docker_client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine, docker_images):
    """A tag of our own that does not exist yet, so that the infra builds it."""
    tag = f"dockpart-web:infra-test-{uuid.uuid4().hex[:8]}"
    yield tag
    try:
        engine.images.remove(tag)
    except docker.errors.ImageNotFound:
        pass  # no test spawned from it


@pytest.fixture(scope="module")
def redis():
    server = RedisProcess().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ports(engine):
    """Ports the module's tests used; their containers are removed at the end."""
    used = []
    yield used
    for port in used:
        try:
            engine.containers.get(instance_name(port)).remove(force=True)
        except Exception:
            pass


@pytest.fixture(scope="module")
def infra_daemon(redis, image, docker_images, ports):
    base = docker_images["web"]
    daemon = Daemon("dockpart-infra", "--driver", "docker", "--redis", redis.url,
                    "--image", image, "--build-context", str(ROOT),
                    "--build-arg", "BASE_IMAGE=dockpart-base:bookworm",
                    "--port-range", f"{LOW}-{HIGH}", "--interval", "0.05", "--drain", "0.5",
                    "--reconcile-interval", "1", "--stop-timeout", "2", "--retry-max", "1",
                    "--spawn-timeout", "30", ready="dockpart-infra started")
    assert base  # the images (and the wheelhouse the build copies) exist
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def db(redis, infra_daemon):
    client = redis.client()
    client.flushall()
    yield client
    client.close()


def servers(db) -> list[str]:
    return db.lrange(keys.SERVERS, 0, -1)


def reconcile_passes(db) -> None:
    """Wait for one whole reconcile pass of the infra on ``db``: a ghost entry (a port with no
    container) leaves servers in each pass, so one pushed after the first left marks a pass."""
    for _ in range(2):
        ghost = url_of(free_test_port())
        db.rpush(keys.SERVERS, ghost)
        wait_for(lambda: ghost not in servers(db), 15, what="a reconcile pass")


def spawn(db, ports, port=None) -> tuple[int, str]:
    port = port or free_test_port()
    ports.append(port)
    db.lpush(keys.SPAWN_QUEUE, url_of(port))
    return port, url_of(port)


def test_spawn_builds_the_image_once_and_registers_a_labelled_host_network_container(
        db, redis, engine, ports, image, infra_daemon):
    spawned = [spawn(db, ports) for _ in range(2)]
    wait_for(lambda: {url for _, url in spawned} <= set(servers(db)), 90,
             what="two containers in servers")
    assert infra_daemon.output().count(f"built the image {image}") == 1
    for port, url in spawned:
        container = engine.containers.get(instance_name(port))
        assert container.status == "running"
        assert container.labels[LABEL_MANAGED] == "true" and container.labels[LABEL_PORT] == str(port)
        assert container.labels[LABEL_TIER] == redis.url
        config = container.attrs["HostConfig"]
        assert config["NetworkMode"] == "host"
        assert config["RestartPolicy"]["Name"] == "unless-stopped"
        assert f"start_port={port}" in container.attrs["Config"]["Env"]
        r = requests.get(url, timeout=5)
        assert r.status_code == 200 and url in r.text
    assert db.llen(keys.SPAWNING) == 0
    for port, url in spawned:
        db.lpush(keys.DESTROY_QUEUE, url)
    wait_for(lambda: entries(db, keys.DESTROY_QUEUE, keys.DESTROYING) == 0, 30,
             what="the destroy requests to be done")
    assert servers(db) == []
    for port, _ in spawned:
        assert not engine.containers.list(all=True, filters={"name": f"^{instance_name(port)}$"})


def test_an_unlabelled_container_is_left_alone(db, engine, ports, docker_images):
    port = free_test_port()
    stranger = engine.containers.run("dockpart-base:bookworm", ["sleep", "120"],
                                     name=instance_name(port), detach=True, network_mode="host")
    ports.append(port)
    db.lpush(keys.SPAWN_QUEUE, url_of(port))
    db.lpush(keys.DESTROY_QUEUE, url_of(port))
    wait_for(lambda: db.llen(keys.DEAD_LETTERS) == 2, 30, what="two dead letters")
    for letter in map(json.loads, db.lrange(keys.DEAD_LETTERS, 0, -1)):
        assert "dockpart does not manage" in letter["reason"]
    reconcile_passes(db)
    stranger.reload()
    assert stranger.status == "running" and LABEL_MANAGED not in stranger.labels
    assert servers(db) == []


def test_reconcile_adds_back_running_containers_and_drops_removed_ones(
        db, engine, ports, infra_daemon):
    port, url = spawn(db, ports)
    wait_for(lambda: url in servers(db), 60, what="the container in servers")
    db.lrem(keys.SERVERS, 0, url)
    wait_for(lambda: url in servers(db), 10, what="reconcile to add it back")
    engine.containers.get(instance_name(port)).remove(force=True)
    wait_for(lambda: url not in servers(db), 10, what="reconcile to drop it")
    output = infra_daemon.output()
    assert f"added {url} back" in output and f"removed {url} from servers" in output


def test_a_paused_container_is_only_unlisted_and_a_stopped_one_is_replaced(
        db, engine, ports, infra_daemon):
    port, url = spawn(db, ports)
    wait_for(lambda: url in servers(db), 60, what="the container in servers")
    container = engine.containers.get(instance_name(port))
    container.pause()  # frozen: the kernel still accepts connections, nothing answers
    try:
        wait_for(lambda: url not in servers(db), 15, what="the paused container to leave servers")
        container.reload()
        assert container.status == "paused"
    finally:
        container.unpause()
    wait_for(lambda: url in servers(db), 15, what="the unpaused container back in servers")
    assert engine.containers.get(instance_name(port)).id == container.id  # never replaced
    container.stop(timeout=2)  # exited: its restart policy leaves a stopped container alone

    def replaced():
        now = engine.containers.get(instance_name(port))
        return now.id != container.id and now.status == "running" and url in servers(db)
    wait_for(replaced, 60, what="a new container on the port, in servers")
    assert requests.get(url, timeout=5).status_code == 200
    output = infra_daemon.output()
    assert f"container {instance_name(port)} did not answer within" in output
    assert (f"container {instance_name(port)} exited; removed it and queued a spawn of {url}"
            in output)


def test_rebuild_builds_an_image_per_instance_like_the_seed_and_removes_it_with_it(
        redis, db, engine, ports, infra_daemon):
    """A second infra with --rebuild, on a Redis of its own: another tier on the same engine."""
    own = RedisProcess().start()
    daemon = Daemon("dockpart-infra", "--driver", "docker", "--rebuild", "--redis", own.url,
                    "--build-context", str(ROOT), "--build-arg", "BASE_IMAGE=dockpart-base:bookworm",
                    "--port-range", f"{LOW}-{HIGH}", "--interval", "0.05", "--drain", "0.2",
                    "--reconcile-interval", "1", "--stop-timeout", "2",
                    ready="dockpart-infra started").start()
    client = own.client()
    try:
        port, url = spawn(client, ports)
        wait_for(lambda: url in servers(client), 90, what="the rebuilt instance in servers")
        image = engine.images.get(f"{instance_name(port)}:latest")
        assert f"start_port={port}" in image.attrs["Config"]["Env"]  # baked in, as in the seed
        assert engine.containers.get(instance_name(port)).image.id == image.id
        reconcile_passes(db)  # the module's infra: another tier's container is not its own
        assert url not in servers(db)
        client.lpush(keys.DESTROY_QUEUE, url)
        wait_for(lambda: entries(client, keys.DESTROY_QUEUE, keys.DESTROYING) == 0, 30,
                 what="the destroy to be done")
        assert not engine.images.list(name=f"{instance_name(port)}:latest")
    finally:
        daemon.stop()
        client.close()
        own.stop()


def test_infra_killed_mid_spawn_and_restarted_leaves_exactly_one_container_registered(
        engine, ports, docker_images, infra_daemon):
    """Its own infra and Redis (one infra per Redis), on the image scripts/images built."""
    own = RedisProcess().start()
    client = own.client()
    args = ("dockpart-infra", "--driver", "docker", "--redis", own.url,
            "--image", docker_images["web"],
            "--port-range", f"{LOW}-{HIGH}", "--interval", "0.05", "--lease", "1",
            "--stop-timeout", "2")
    daemon = Daemon(*args, ready="dockpart-infra started").start()
    try:
        port, url = spawn(client, ports)
        wait_for(lambda: f"started container {instance_name(port)}" in daemon.output(), 30,
                 what="the container to be started")
        daemon.stop(signal.SIGKILL)
        assert client.lrange(keys.SPAWNING, 0, -1) == [url] and servers(client) == []
        daemon = Daemon(*args, ready="dockpart-infra started").start()
        wait_for(lambda: url in servers(client), 30, what="the restarted infra to register it")
        assert servers(client) == [url] and client.llen(keys.SPAWNING) == 0
        assert len(engine.containers.list(all=True, filters={"label": f"{LABEL_PORT}={port}"})) == 1
        assert "finishing 1 request(s)" in daemon.output()
    finally:
        daemon.stop()
        client.close()
        own.stop()


def dockerd_pid() -> int | None:
    try:
        pid = int(Path("/var/run/docker.pid").read_text())
        Path(f"/proc/{pid}").stat()
        return pid
    except (OSError, ValueError):
        return None


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0


@pytest.mark.engine_restart
def test_a_request_waits_while_the_engine_is_stopped_and_is_done_when_it_is_back(
        engine, ports, docker_images):
    """Other tests' containers on this engine stop for a few seconds: an infra and a Redis of
    its own, and the engine started again whatever happens."""
    own = RedisProcess().start()
    client = own.client()
    daemon = Daemon("dockpart-infra", "--driver", "docker", "--redis", own.url,
                    "--image", docker_images["web"], "--port-range", f"{LOW}-{HIGH}",
                    "--interval", "0.05", "--retry-max", "1", "--stop-timeout", "2",
                    ready="dockpart-infra started").start()
    pid = dockerd_pid()
    assert pid, "dockerd is not running"
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: dockerd_pid() is None, 60, what="dockerd to stop")
        port, url = spawn(client, ports)
        wait_for(lambda: "engine is unreachable" in daemon.output(), 15,
                 what="the infra to notice the engine is away")
        # One MULTI: read apart, the request could move from the queue to SPAWNING between
        # the two reads and be in neither.
        spawning, queued = client.pipeline(transaction=True).lrange(
            keys.SPAWNING, 0, -1).lrange(keys.SPAWN_QUEUE, 0, -1).execute()
        assert spawning + queued == [url]
    finally:
        subprocess.run(["bash", "-c", f"source {ROOT}/scripts/lib.sh; ensure_dockerd"],
                       check=True, timeout=90, start_new_session=True,
                       stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: url in servers(client), 60, what="the waiting spawn to be done")
        assert requests.get(url, timeout=5).status_code == 200
        assert client.llen(keys.DEAD_LETTERS) == 0  # it waited; it was never given up
        output = daemon.output()
        assert output.count("engine is unreachable") == 1 and "engine is reachable again" in output
    finally:
        daemon.stop()
        client.close()
        own.stop()
