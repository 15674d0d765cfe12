"""The images scripts/images builds offline run dockpart as the README says."""

import secrets

import pytest
import redis as redis_py
import requests

from dockerkit import docker_client, run_images
from helpers import ROOT, contains_run, free_port, listening_addresses, wait_for
from proxykit import RawBackend
from test_packaging import PLUGINS
from tierkit import SHIPPED_PROXY_ARGS

pytestmark = pytest.mark.docker


@pytest.fixture
def web_container(docker_images, redis_db, redis_server):
    """dockpart-web in a container on host networking, on a free port, with the test Redis."""
    client = docker_client()
    port = free_port()
    container = client.containers.run(
        docker_images["web"], ["--first-port", str(port)], detach=True, network_mode="host",
        environment={"start_port": str(port), "DOCKPART_REDIS": redis_server.url},
        labels={"dockpart.test": "images"})
    yield container, port
    container.remove(force=True)
    client.close()


def test_every_dockerfile_gives_a_tagged_image(docker_images):
    """Each Dockerfiles/NAME.Dockerfile is built as dockpart-NAME:latest from the local base."""
    assert {"redis", "web", "proxy", "infra"} <= set(docker_images)
    client = docker_client()
    base = client.images.get("dockpart-base:bookworm")
    for tag in docker_images.values():
        image = client.images.get(tag)
        assert image.labels.get("org.dockpart.inputs"), tag
        # Built FROM the local base: its layers come first.
        assert image.history()[-1]["Id"] == base.history()[-1]["Id"], tag
    client.close()


def test_rebuild_with_unchanged_inputs_does_nothing(docker_images):
    """A second run finds every image up to date instead of building again."""
    run_images("all")  # the tree may have changed since the fixture ran: others edit it too
    client = docker_client()
    before = {tag: client.images.get(tag).id for tag in docker_images.values()}
    run_images("all")
    assert {tag: client.images.get(tag).id for tag in docker_images.values()} == before
    client.close()


def test_python_images_carry_the_whole_package_and_every_plugin(docker_images):
    """The wheel misses no subpackage, and twistd in the image lists every dockpart plugin."""
    source = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dockpart").rglob("*.py"))
    client = docker_client()
    for name in ("web", "proxy", "infra"):
        listing = client.containers.run(
            docker_images[name], ["-c", "import dockpart, pathlib; root = pathlib.Path(dockpart.__file__)"
                                  ".parent.parent; print(*(p.relative_to(root) for p in "
                                  "root.joinpath('dockpart').rglob('*.py')))"],
            entrypoint="python", network_mode="host", remove=True).decode().split()
        assert sorted(listing) == source, name
        help_text = client.containers.run(docker_images[name], ["--help"], entrypoint="twistd",
                                          network_mode="host", remove=True).decode()
        for plugin in PLUGINS:
            assert plugin in help_text, (name, plugin)
    client.close()


def test_web_image_serves_the_app_as_a_non_root_user(web_container, redis_db):
    """The seed's start_port picks the port; the first instance registers itself in Redis."""
    container, port = web_container
    url = f"http://127.0.0.1:{port}"
    page = wait_for(lambda: requests.get(url + "/", timeout=2), timeout=30,
                    what=f"dockpart-web in a container on {port}")
    assert page.status_code == 200
    assert url in page.text
    # "/" needs no Redis; the rest answers 503 until the connection is up.
    wait_for(lambda: requests.get(url + "/set", timeout=5).status_code == 200, timeout=15,
             what="/set to answer 200")
    assert "self-destruct" in requests.get(url + "/get", timeout=5).text
    assert wait_for(lambda: redis_db.lrange("servers", 0, -1) == [url], timeout=10,
                    what="the instance in servers")
    assert container.exec_run("id -u").output.decode().strip() != "0"
    wait_for(lambda: container.reload() or container.attrs["State"]["Health"]["Status"] == "healthy",
             timeout=30, interval=0.5, what="the image's healthcheck to pass")


def test_proxy_image_runs_on_loopback_with_health_checks(docker_images):
    """Its default command is the shipped setup's: loopback, active checks every second."""
    client = docker_client()
    command = client.images.get(docker_images["proxy"]).attrs["Config"]["Cmd"]
    client.close()
    assert command[:2] == ["--listen", "tcp:3456:interface=127.0.0.1"], command
    assert contains_run(command, SHIPPED_PROXY_ARGS), command


def test_proxy_image_runs_the_proxy_on_pypy(docker_images, container, redis_server, redis_db):
    """The proxy in its image is PyPy's process (the faster interpreter for it), and proxies
    there: to the instance that Redis lists, with the default command's health checks."""
    backend = RawBackend()
    redis_db.rpush("servers", backend.url)
    port = free_port()
    proxy = container(docker_images["proxy"], *default_command_on(docker_images["proxy"], port),
                      environment={"DOCKPART_REDIS": redis_server.url})
    try:
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/pypy", timeout=2).text == "/pypy",
                 timeout=30, what=f"dockpart-proxy in a container on {port} to proxy /pypy")
    finally:
        backend.close()
    interpreter = proxy.exec_run(["readlink", "-f", "/proc/1/exe"]).output.decode().strip()
    assert interpreter.rpartition("/")[2].startswith("pypy3"), interpreter


def test_infra_image_holds_python_and_dockpart_only(docker_images):
    """The image that gets the Docker socket has no tools beyond Python and dockpart: no git, no
    compiler (and no pip download: it installs from the wheelhouse)."""
    client = docker_client()
    found = client.containers.run(
        docker_images["infra"], ["-c", "for t in git gcc cc make docker; do command -v $t; done; "
                                 "twistd dockpart-infra --help | head -1"],
        entrypoint="sh", network_mode="host", remove=True).decode()
    assert found.splitlines() == ["Usage: twistd [options] dockpart-infra [options]"], found
    assert client.images.get(docker_images["infra"]).attrs["Config"]["User"] == "dockpart"
    client.close()


@pytest.fixture
def container():
    """Runs containers for a test on host networking and removes them afterwards."""
    client = docker_client()
    started = []

    def run(image, *args, **kwargs):
        started.append(client.containers.run(image, list(args) or None, detach=True,
                                             network_mode="host",
                                             labels={"dockpart.test": "images"}, **kwargs))
        return started[-1]
    yield run
    for c in started:
        c.remove(force=True, v=True)
    client.close()


def test_redis_image_needs_a_password_and_persists(docker_images, container):
    """Redis from the image: refuses to start without a password, refuses clients without it,
    and writes an append-only file (fsync every second) into /data."""
    port = free_port()
    refused = container(docker_images["redis"], "--port", str(port))
    assert refused.wait(timeout=30)["StatusCode"] == 64
    assert b"refusing to run without one" in refused.logs()

    password = secrets.token_hex(24)
    server = container(docker_images["redis"], "--port", str(port),
                       environment={"REDISCLI_AUTH": password})
    client = redis_py.Redis(port=port, password=password, decode_responses=True, socket_timeout=5)
    wait_for(client.ping, timeout=20, what="redis in a container")
    with pytest.raises(redis_py.AuthenticationError):
        redis_py.Redis(port=port, socket_timeout=5).ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("dir") == {"dir": "/data"}
    # The password is no argument of the server process (ps shows those).
    assert password not in server.exec_run(["cat", "/proc/1/cmdline"]).output.decode()
    assert server.exec_run(["redis-cli", "-p", str(port), "ping"]).output == b"PONG\n"
    assert server.exec_run("id -un").output.decode().strip() == "redis"
    assert listening_addresses(port) == {"127.0.0.1"}


def default_command_on(image: str, port: int) -> list[str]:
    """``image``'s default command with the port of its listen endpoint changed to ``port``:
    the interface under test is the default's, and a tier that scripts/up started on the
    default ports (3456, 7000) does not make the test fail."""
    client = docker_client()
    command = client.images.get(image).attrs["Config"]["Cmd"]
    client.close()
    at = command.index("--listen") + 1
    kind, _, rest = command[at].partition(":")
    assert kind == "tcp" and rest.partition(":")[2].startswith("interface="), command
    return [*command[:at], f"tcp:{port}:{rest.partition(':')[2]}", *command[at + 1:]]


def test_images_listen_on_loopback_unless_told_otherwise(docker_images, container, redis_server):
    """A plain `docker run` of each serving image, with its default command, is not exposed."""
    ports = {name: free_port() for name in ("web", "proxy", "fileio")}
    container(docker_images["web"], environment={"start_port": str(ports["web"]),
                                                 "DOCKPART_REDIS": redis_server.url})
    container(docker_images["proxy"], *default_command_on(docker_images["proxy"], ports["proxy"]),
              environment={"DOCKPART_REDIS": redis_server.url})
    container(docker_images["fileio"], *default_command_on(docker_images["fileio"],
                                                           ports["fileio"]))
    found = {}
    for name, port in ports.items():
        found[name] = wait_for(lambda: listening_addresses(port), timeout=30,
                               what=f"dockpart-{name} listening on {port}")
    assert found == {"proxy": {"127.0.0.1"}, "fileio": {"127.0.0.1"}, "web": {"127.0.0.1"}}
