"""Apps with the docker driver: an image runs as the app's containers, PORT set, routed by
Host; destroy removes them."""

import uuid

import pytest
import requests

from dockerkit import docker_client
from dockpart import keys
from dockpart.drivers.docker import LABEL_TIER
from helpers import ROOT, Daemon, free_port, port_block, start_proxy, wait_for
from test_apps import dockpart_apps, get, serving


@pytest.fixture(scope="module")
def hello_image(docker_images):
    """examples/hello built on the local base image, under a tag of this module's own."""
    assert docker_images["web"]  # the local base image is there
    engine = docker_client()
    tag = f"dockpart-hello:test-{uuid.uuid4().hex[:8]}"
    engine.images.build(path=str(ROOT / "examples" / "hello"), tag=tag, rm=True,
                        buildargs={"BASE_IMAGE": "dockpart-base:bookworm"}, network_mode="host")
    yield tag
    engine.images.remove(tag, force=True)


def docker_apps_infra(redis_url: str, low: int, *options: str) -> Daemon:
    """A dockpart-infra running apps as containers on the ports low..low+3."""
    return Daemon("dockpart-infra", "--driver", "docker", "--redis", redis_url,
                  "--first-port", str(free_port()), "--app-ports", f"{low}-{low + 3}",
                  "--interval", "0.05", "--stop-timeout", "2", "--spawn-timeout", "60",
                  *options, ready="dockpart-infra started").start()

pytestmark = pytest.mark.docker


def test_an_app_image_runs_as_containers_routed_by_host_and_goes_when_destroyed(own_redis,
                                                                                hello_image):
    engine, tag = docker_client(), hello_image
    low = port_block(4)
    infra = docker_apps_infra(own_redis.url, low, "--drain", "1")
    proxy = start_proxy(own_redis.url)

    def containers():
        return engine.containers.list(all=True, filters={
            "label": f"{LABEL_TIER}={infra_tier} app hello"})
    infra_tier = f"redis://127.0.0.1:{own_redis.port}/0"
    try:
        assert dockpart_apps(own_redis.url, "create", "hello", "--image", tag,
                             "--scale", "2") == 0
        wait_for(lambda: len(serving(own_redis, "hello")) == 2, 120, what="2 containers serve")
        answers = {get(proxy, "hello.localhost").text for _ in range(4)}
        assert answers == {f"hello on port {low}\n", f"hello on port {low + 1}\n"}
        running = containers()
        assert len(running) == 2
        assert all(c.attrs["HostConfig"]["NetworkMode"] == "host" for c in running)
        assert dockpart_apps(own_redis.url, "destroy", "hello") == 0
        wait_for(lambda: not containers(), 60, what="the containers removed")
        wait_for(lambda: not own_redis.client().keys("dockpart:app*"), 10, what="records gone")
    finally:
        proxy.stop()
        infra.stop()
        for c in containers():
            c.remove(force=True)


def test_an_app_image_at_zero_starts_on_its_first_request_and_goes_back_to_zero(own_redis,
                                                                                hello_image):
    """Scale to zero with containers: held while one starts, answered, then removed again."""
    engine, tag = docker_client(), hello_image
    low = port_block(4)
    infra = docker_apps_infra(own_redis.url, low, "--drain", "0.5", "--evaluate-interval", "0.5")
    port, admin = free_port(), free_port()
    proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--redis", own_redis.url, "--admin", f"tcp:{admin}:interface=127.0.0.1",
                   ready="dockpart-proxy listening on").start()
    proxy.base = f"http://127.0.0.1:{port}"
    infra_tier = f"redis://127.0.0.1:{own_redis.port}/0"

    def containers():
        return engine.containers.list(all=True, filters={
            "label": f"{LABEL_TIER}={infra_tier} app nap"})

    def hold():
        app = requests.get(f"http://127.0.0.1:{admin}/", timeout=5).json()["apps"].get("nap")
        return app["hold"] if app else {}
    try:
        assert dockpart_apps(own_redis.url, "create", "nap", "--image", tag, "--scale", "0") == 0
        assert dockpart_apps(own_redis.url, "autoscale", "nap", "--min", "0", "--max", "2",
                             "--scale-to-zero-after", "2") == 0
        wait_for(lambda: hold().get("activates"), 10, what="the proxy to hold nap's requests")
        for n in (1, 2):
            assert containers() == []
            answer = requests.get(proxy.base, headers={"Host": "nap.localhost"}, timeout=60)
            assert answer.status_code == 200 and answer.text.startswith("hello on port")
            assert len(containers()) == 1 and hold()["activations"] == n
            wait_for(lambda: containers() == [] and serving(own_redis, "nap") == [], 60,
                     what="back to zero: the container removed")
    finally:
        proxy.stop()
        infra.stop()
        for c in containers():
            c.remove(force=True)
