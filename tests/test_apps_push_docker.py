"""``git push`` to an app with a Dockerfile and the docker driver: the hook builds the image
with the engine, pushes it to the registry and the app's containers run it by digest, rolled
over as the process driver's are; an image that does not build is refused; the images of
releases no longer kept leave the registry and the engine."""

import re
import shutil
import urllib.error
import urllib.request

import pytest
from docker.errors import ImageNotFound

from deploykit import Registry
from dockerkit import docker_client
from dockpart import keys
from dockpart.deploy.cli import main
from dockpart.drivers.docker import LABEL_TIER
from helpers import free_port, start_apps_infra, start_proxy, wait_for
from test_apps import get, serving
from test_apps_push import HELLO, create, git, push

pytestmark = pytest.mark.docker


def dockerfile_source(tmp_path, says: str, broken: bool = False, cmd: str | None = None):
    """The app's working copy with a Dockerfile (``broken``: its build fails; ``cmd``: the
    image's CMD instead of examples/hello answering ``says``), committed."""
    work = tmp_path / "src"
    if not work.exists():
        work.mkdir()
        shutil.copy(HELLO / "app.py", work / "app.py")
        git(work, "init", "-q", "-b", "main")
    (work / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\nCOPY app.py /app/app.py\n"
        + ("RUN exit 3\n" if broken else "")
        + (cmd or f'CMD ["python3", "/app/app.py", "{says}"]') + "\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", says)
    return work


@pytest.fixture
def docker_tier(own_redis, docker_base, monkeypatch):
    """A registry of the test's own port (the seed deploy's tests hold 5000; deletes enabled,
    as docker-compose.yml's), an infra with the docker driver and a proxy; what the test's
    app left (containers, images) is removed after."""
    engine = docker_client()
    registry = Registry(port=free_port()).start()
    monkeypatch.setenv("DOCKPART_REGISTRY", f"localhost:{registry.port}")
    monkeypatch.setenv("DOCKPART_BASE_IMAGE", docker_base)
    infra = start_apps_infra(own_redis.url, "--drain", "0.5", "--stop-timeout", "2",
                             "--spawn-timeout", "20", driver="docker", app_ports=4)
    proxy = start_proxy(own_redis.url)

    def containers():
        return engine.containers.list(all=True, filters={
            "label": f"{LABEL_TIER}=redis://127.0.0.1:{own_redis.port}/0 app img"})
    try:
        yield own_redis, registry, proxy, engine, containers
    finally:
        proxy.stop()
        infra.stop()
        for c in containers():
            c.remove(force=True)
        for image in engine.images.list(name=f"localhost:{registry.port}/img"):
            engine.images.remove(image.id, force=True)
        registry.stop()


def test_a_dockerfile_app_is_built_pushed_and_run_by_digest(docker_tier, tmp_path, capsys):
    own_redis, registry, proxy, engine, containers = docker_tier
    remote = create(own_redis, tmp_path, "img", "--scale", "1")
    pushed = push(dockerfile_source(tmp_path, "v1"), remote)
    assert pushed.returncode == 0, pushed.stderr
    assert "img serves v1" in pushed.stderr
    assert get(proxy, "img.localhost").text.startswith("v1 on port")
    pushed = push(dockerfile_source(tmp_path, "v2"), remote)
    assert pushed.returncode == 0, pushed.stderr
    assert get(proxy, "img.localhost").text.startswith("v2 on port")
    wait_for(lambda: len(containers()) == 1, 30, what="the v1 container removed")
    [running] = containers()
    port = serving(own_redis, "img")[0].rsplit(":", 1)[1]

    def logged():
        capsys.readouterr()
        assert main(["apps", "logs", "img", "-n", "3", "--redis", own_redis.url]) == 0
        return capsys.readouterr().out
    wait_for(lambda: f"[{port}] v2 listening on 127.0.0.1:{port}" in logged(), 10,
             what="the container's line in the app's logs")
    v2 = own_redis.client().hget(keys.app_releases("img"), "v2")
    image = f"localhost:{registry.port}/img@sha256:"
    assert image in v2 and running.attrs["Config"]["Image"] in v2
    # An image that does not build is refused; v2 keeps serving.
    pushed = push(dockerfile_source(tmp_path, "v3", broken=True), remote)
    assert pushed.returncode != 0
    assert "PUSH FAILED, app img keeps serving its current release" in pushed.stderr
    assert get(proxy, "img.localhost").text.startswith("v2 on port")
    assert len(serving(own_redis, "img")) == 1


def test_images_no_kept_release_runs_leave_the_registry_and_the_engine(docker_tier, tmp_path):
    """A release's image stays while a kept release runs it (a config release runs its
    push's) and is deleted from the registry and the engine once none does: when the last
    such release falls out of the kept history, or at once for a refused release."""
    own_redis, registry, proxy, engine, containers = docker_tier
    remote = create(own_redis, tmp_path, "img", "--scale", "0")  # each release live at once

    def released(pushed) -> str:
        """The digest the push's registry gave its image."""
        return re.search(r"the registry keeps \S+ as (sha256:[0-9a-f]{64})",
                         pushed.stderr).group(1)

    def push_ok(says: str) -> str:
        pushed = push(dockerfile_source(tmp_path, says), remote)
        assert pushed.returncode == 0, pushed.stderr
        return released(pushed)

    def kept(digest: str) -> tuple[bool, bool]:
        """Whether the registry, and the engine, have the image."""
        try:
            engine.images.get(f"localhost:{registry.port}/img@{digest}")
            on_engine = True
        except ImageNotFound:
            on_engine = False
        manifest = urllib.request.Request(
            f"http://127.0.0.1:{registry.port}/v2/img/manifests/{digest}", method="HEAD",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        try:
            with urllib.request.urlopen(manifest, timeout=10) as answer:
                in_registry = answer.status == 200
        except urllib.error.HTTPError as e:
            assert e.code == 404, e
            in_registry = False
        return in_registry, on_engine

    first = push_ok("v1")
    assert main(["apps", "config", "img", "GREETING=hej", "--redis", own_redis.url,
                 "--apps-dir", str(tmp_path / "apps")]) == 0  # v2 runs v1's image
    later = [push_ok(f"v{n}") for n in range(3, 8)]
    # v1 fell out of the kept history (v7 live, v6 to v2 kept); v2 still runs its image.
    assert [r for r in own_redis.client().hkeys(keys.app_releases("img"))
            if r == "v1"] == []
    assert kept(first) == (True, True)
    push_ok("v8")  # v2 falls out too: nothing kept runs the image any more
    assert kept(first) == (False, False)
    assert all(kept(digest) == (True, True) for digest in later[1:])
    # A refused release's image goes at once.
    assert main(["apps", "scale", "img", "1", "--redis", own_redis.url]) == 0
    wait_for(lambda: len(serving(own_redis, "img")) == 1, 60, what="v8 serving")
    refused = push(dockerfile_source(tmp_path, "v9", cmd='CMD ["sleep", "60"]'), remote)
    assert refused.returncode != 0 and "did not answer HTTP within 20 s" in refused.stderr
    assert kept(released(refused)) == (False, False)
    assert get(proxy, "img.localhost").text.startswith("v8 on port")
