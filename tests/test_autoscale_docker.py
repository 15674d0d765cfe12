"""End to end with the Docker driver: load through a real proxy makes dockpart-infra spawn
containers, and taking it away brings the tier back to the first instance."""

import uuid

import docker
import pytest
import requests

from dockerkit import docker_client
from dockpart import keys
from dockpart.drivers import instance_name
from helpers import ROOT, Daemon, port_block, start_web, wait_for
from test_autoscale import LoadGenerator, start_proxy

pytestmark = pytest.mark.docker


def test_docker_tier_scales_up_under_load_and_back_down(redis_db, redis_server, docker_images):
    engine = docker_client()
    tag = f"dockpart-web:autoscale-test-{uuid.uuid4().hex[:8]}"
    first = port_block(5)
    web = start_web(redis_server.url, "--first-port", str(first), port=first)
    proxy = start_proxy(redis_server.url)
    infra = Daemon("dockpart-infra", "--driver", "docker", "--redis", redis_server.url,
                   "--image", tag, "--build-context", str(ROOT),
                   "--build-arg", "BASE_IMAGE=dockpart-base:bookworm",
                   "--first-port", str(first), "--port-range", f"{first + 1}-{first + 4}",
                   "--interval", "0.05", "--drain", "1", "--stop-timeout", "2",
                   "--spawn-timeout", "60", "--autoscale", "--max-instances", "2",
                   "--target-inflight", "2", "--evaluate-interval", "0.5",
                   "--scale-down-window", "3", ready="dockpart-infra started")
    heavy = None
    try:
        assert docker_images["web"]
        wait_for(lambda: redis_db.llen(keys.SERVERS) == 1, 10, what="the first instance")
        infra.start()
        heavy = LoadGenerator(proxy.base, "/work?ms=200", 8)
        second = f"http://127.0.0.1:{first + 1}"
        wait_for(lambda: second in redis_db.lrange(keys.SERVERS, 0, -1), 120,
                 what="a container spawned under load")
        container = engine.containers.get(instance_name(first + 1))
        assert container.status == "running" and container.attrs["HostConfig"]["NetworkMode"] == "host"
        wait_for(lambda: heavy.ok > 20, 30, what="requests served by both")
        heavy.stop()
        wait_for(lambda: redis_db.lrange(keys.SERVERS, 0, -1) == [f"http://127.0.0.1:{first}"]
                 and not redis_db.llen(keys.DESTROYING), 3 + 1 + 30, what="back to one")
        wait_for(lambda: not engine.containers.list(all=True,
                                                    filters={"name": instance_name(first + 1)}),
                 30, what="the container removed")
        assert heavy.failures == []
        listing = requests.get(f"http://127.0.0.1:{first}/listservers",
                               headers={"accept": "application/json"}, timeout=5).json()
        assert {"up", "down"} <= {d["action"] for d in listing["autoscale"]["decisions"]}
    finally:
        if heavy is not None:
            heavy.stop()
        infra.stop()
        proxy.stop()
        web.stop()
        for port in range(first + 1, first + 5):
            try:
                engine.containers.get(instance_name(port)).remove(force=True)
            except docker.errors.NotFound:
                pass
        try:
            engine.images.remove(tag)
        except docker.errors.ImageNotFound:
            pass
        engine.close()
