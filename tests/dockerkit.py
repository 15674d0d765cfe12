"""Docker for tests: the engine must answer, and dockpart's images are built offline once per session.

Use the ``docker_images`` fixture in a test marked ``@pytest.mark.docker``; it maps an image name
(the stem of ``Dockerfiles/NAME.Dockerfile``) to its tag, e.g. ``docker_images["web"]`` is
``"dockpart-web:latest"``.  Containers started by tests use ``--network host`` and free ports.
"""

import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from helpers import ROOT

IMAGES_SCRIPT = ROOT / "scripts" / "images"
COMPOSE = Path(sys.executable).parent / "docker-compose"
#: A first build on a new machine (debootstrap + wheels + every image) takes a few minutes.
BUILD_TIMEOUT = 900


def docker_client() -> docker.DockerClient:
    """A client to the engine, or a test failure saying how to start one (never a skip)."""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:
        pytest.fail("no Docker engine answers, and the Docker tests need one: start it with "
                    "`sudo bash -c 'source scripts/lib.sh; ensure_dockerd'` or run them through "
                    f"`sudo bash scripts/test` ({e})", pytrace=False)
    return client


def run_images(*args: str) -> str:
    """Run ``scripts/images ARGS`` (with the running Python's pip for the wheels); its stdout."""
    env = {**os.environ, "DOCKPART_PYTHON": sys.executable}
    try:
        done = subprocess.run(["bash", str(IMAGES_SCRIPT), *args], env=env, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/images {' '.join(args)} took more than {BUILD_TIMEOUT}s",
                    pytrace=False)
    if done.returncode:
        pytest.fail(f"scripts/images {' '.join(args)} failed ({done.returncode}):\n"
                    f"{done.stderr[-4000:]}", pytrace=False)
    return done.stdout


def compose(project: str, profile: str, env: dict, *args: str) -> str:
    """``docker-compose -p PROJECT --profile PROFILE ARGS`` on docker-compose.yml; its stdout."""
    done = subprocess.run([str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "-p", project,
                           "--profile", profile, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="session")
def docker_images() -> dict[str, str]:
    """Every dockpart image, built offline from the local base (cached: seconds when unchanged)."""
    docker_client().close()
    run_images("all")
    return {name: f"dockpart-{name}:latest" for name in run_images("names").split()}


@pytest.fixture(scope="session")
def docker_base() -> str:
    """The local base image alone (``dockpart-base:bookworm``), for tests that build their own
    images from it: dockpart's own images are not rebuilt for them."""
    docker_client().close()
    run_images("base")
    return "dockpart-base:bookworm"
