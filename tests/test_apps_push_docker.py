"""``git push`` to an app with a Dockerfile and the docker driver: the hook builds the image
with the engine, pushes it to the registry and the app's containers run it by digest, rolled
over as the process driver's are; an image that does not build is refused."""

import os
import shutil
import subprocess

import pytest

from deploykit import Registry
from dockerkit import docker_client
from dockpart import keys
from dockpart.deploy.cli import main
from dockpart.drivers.docker import LABEL_TIER
from helpers import free_port, start_apps_infra, start_proxy, wait_for
from test_apps import get, serving
from test_apps_push import HELLO, create, git, push

pytestmark = pytest.mark.docker


def dockerfile_source(tmp_path, says: str, broken: bool = False):
    work = tmp_path / "src"
    if not work.exists():
        work.mkdir()
        shutil.copy(HELLO / "app.py", work / "app.py")
        git(work, "init", "-q", "-b", "main")
    (work / "Dockerfile").write_text(
        "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}\nCOPY app.py /app/app.py\n"
        + ("RUN exit 3\n" if broken else "")
        + f'CMD ["python3", "/app/app.py", "{says}"]\n')
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", says)
    return work


def test_a_dockerfile_app_is_built_pushed_and_run_by_digest(own_redis, docker_images, tmp_path,
                                                            monkeypatch, capsys):
    engine = docker_client()
    # A registry of the test's own port: the seed deploy's tests hold 5000.
    registry = Registry(port=free_port()).start()
    monkeypatch.setenv("DOCKPART_REGISTRY", f"localhost:{registry.port}")
    monkeypatch.setenv("DOCKPART_BASE_IMAGE", "dockpart-base:bookworm")
    infra = start_apps_infra(own_redis.url, "--drain", "0.5", "--stop-timeout", "2",
                             "--spawn-timeout", "60", driver="docker", app_ports=4)
    proxy = start_proxy(own_redis.url)

    def containers():
        return engine.containers.list(all=True, filters={
            "label": f"{LABEL_TIER}=redis://127.0.0.1:{own_redis.port}/0 app img"})
    try:
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
    finally:
        proxy.stop()
        infra.stop()
        for c in containers():
            c.remove(force=True)
        for image in engine.images.list(name=f"localhost:{registry.port}/img"):
            engine.images.remove(image.id, force=True)
        registry.stop()
