"""Git-push blue/green deployment end to end: real git pushes, the real engine and registry.

The tests run in order and share one deploy directory, as a person would use it: green gets
v1, blue v2, a broken v3 is refused while v2 keeps serving, v4 replaces v2 under a request
loop, the front route moves between slices, blue rolls back, and a second init changes nothing.
"""

import os
import signal
import subprocess
from types import SimpleNamespace

import pytest

from deploykit import AppRepo, Registry, RequestLoop, get
from dockerkit import docker_client, run_images
from dockpart import keys
from dockpart.deploy.docker_ops import registry_digest
from helpers import BIN, Daemon, free_port, port_open, wait_for

pytestmark = pytest.mark.docker

BASE_IMAGE = "dockpart-base:bookworm"
GREEN, BLUE = "http://127.0.0.1:50100", "http://127.0.0.1:50101"


def dockpart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dockpart"), "deploy", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An initialised deploy directory, a registry on :5000 and the example app's repository."""
    docker = docker_client()
    run_images("base")
    registry = Registry().start()
    root = tmp_path_factory.mktemp("deploy")
    deploy_dir = root / "deploy"
    init = dockpart("init", str(deploy_dir), "--app", "dockpart-example", "--base-image", BASE_IMAGE,
                    "--keep", "2")
    assert init.returncode == 0, init.stderr
    ns = SimpleNamespace(dir=deploy_dir, repo=AppRepo(root / "app", deploy_dir), docker=docker,
                         commits={}, init_output=init.stdout)
    try:
        yield ns
    finally:
        dockpart("down", "--dir", str(deploy_dir))
        for image in docker.images.list(name="localhost:5000/dockpart-example"):
            for name in image.tags:
                docker.images.remove(name)
        registry.stop()
        docker.close()


def push(env, remote: str, version: str, broken: bool = False) -> subprocess.CompletedProcess:
    env.commits[version] = env.repo.commit(version, broken)
    return env.repo.push(remote)


def test_init_wrote_both_slices(env):
    for slice_name in ("green", "blue"):
        assert (env.dir / f"{slice_name}.git" / "hooks" / "pre-receive").exists()
        assert f"wrote {env.dir / slice_name}-www" in env.init_output


def test_push_v1_to_green_serves_it_on_50100(env):
    result = push(env, "green", "1")
    assert result.returncode == 0, result.stdout
    short = env.commits["1"][:7]
    for step in ("building", "pushing", "pulling", "waiting up to", "healthy;",
                 f"green serves green-{short}"):
        assert step in result.stdout
    assert get(GREEN) == "hello from version 1\n"


def test_push_v2_to_blue_serves_it_on_50101_and_green_keeps_v1(env):
    result = push(env, "blue", "2")
    assert result.returncode == 0, result.stdout
    assert get(BLUE) == "hello from version 2\n"
    assert get(GREEN) == "hello from version 1\n"


def test_a_broken_push_is_refused_with_the_reason_and_v2_keeps_serving(env):
    result = push(env, "blue", "3", broken=True)
    assert result.returncode != 0
    assert "health check failed: the container exited with code 1" in result.stdout
    assert "deliberately broken: no app today" in result.stdout  # the container's last log lines
    assert "pre-receive hook declined" in result.stdout
    assert get(BLUE) == "hello from version 2\n"
    assert env.docker.containers.list(all=True, filters={"name": "blue-app-next"}) == []
    v3 = f"localhost:5000/dockpart-example:blue-{env.commits['3'][:7]}"
    assert f"deleted {v3} from the registry" in result.stdout


def test_other_branches_are_accepted_without_deploying(env):
    result = env.repo.push("blue", "HEAD:refs/heads/feature")
    assert result.returncode == 0, result.stdout
    assert "accepted refs/heads/feature; only main or master deploys to blue" in result.stdout
    assert get(BLUE) == "hello from version 2\n"


def test_push_v4_replaces_v2_on_50101_without_a_failed_request(env):
    with RequestLoop(BLUE + "/") as loop:
        result = push(env, "blue", "4")
    assert result.returncode == 0, result.stdout
    assert loop.failures == []
    assert set(loop.answers) == {"hello from version 2", "hello from version 4"}
    assert get(BLUE) == "hello from version 4\n"


def test_switch_moves_the_front_route_without_a_failed_request(env, redis_server):
    front = free_port()
    proxy = Daemon("dockpart-proxy", "--servers-key", keys.DEPLOY_LIVE, "--redis", redis_server.url,
                   "--listen", f"tcp:{front}:interface=127.0.0.1", ready="listening on").start()
    try:
        switched = dockpart("switch", "green", "--dir", str(env.dir), "--redis", redis_server.url)
        assert switched.returncode == 0, switched.stderr
        assert get(f"http://127.0.0.1:{front}/") == "hello from version 1\n"
        with RequestLoop(f"http://127.0.0.1:{front}/") as loop:
            switched = dockpart("switch", "blue", "--dir", str(env.dir), "--redis", redis_server.url)
        assert switched.returncode == 0, switched.stderr
        assert loop.failures == []
        assert set(loop.answers) == {"hello from version 1", "hello from version 4"}
        assert get(f"http://127.0.0.1:{front}/") == "hello from version 4\n"
        # A push to the other slice does not move the front route.
        assert push(env, "green", "5").returncode == 0
        assert get(f"http://127.0.0.1:{front}/") == "hello from version 4\n"
        status = dockpart("status", "--dir", str(env.dir), "--redis", redis_server.url)
        assert f"blue: {BLUE} [live]" in status.stdout
    finally:
        proxy.stop()


def test_rollback_runs_the_previous_then_a_named_release(env):
    with RequestLoop(BLUE + "/") as loop:
        result = dockpart("rollback", "blue", "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert loop.failures == []
    assert get(BLUE) == "hello from version 2\n"
    v4 = f"blue-{env.commits['4'][:7]}"
    result = dockpart("rollback", "blue", v4, "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(BLUE) == "hello from version 4\n"
    status = dockpart("status", "--dir", str(env.dir))
    assert "container blue-app: running, healthy" in status.stdout
    assert f"* {v4}  {env.commits['4']}" in status.stdout
    assert f"blue-{env.commits['2'][:7]}" in status.stdout
    assert f"blue-{env.commits['3'][:7]}" not in status.stdout  # the refused release is no release


def test_releases_beyond_keep_leave_the_registry(env):
    if "5" not in env.commits:  # the switch test pushes it; do not depend on that
        assert push(env, "green", "5").returncode == 0
    result = push(env, "green", "6")
    assert result.returncode == 0, result.stdout
    v1 = f"localhost:5000/dockpart-example:green-{env.commits['1'][:7]}"
    assert f"deleted {v1} from the registry" in result.stdout
    assert registry_digest(v1) is None
    assert registry_digest(f"localhost:5000/dockpart-example:green-{env.commits['5'][:7]}")
    # SLICE names the running release in the registry.
    assert registry_digest("localhost:5000/dockpart-example:green") == \
        registry_digest(f"localhost:5000/dockpart-example:green-{env.commits['6'][:7]}")


def test_up_serves_the_slices_again_after_their_forwarders_died(env):
    for slice_name in ("green", "blue"):
        pid = int((env.dir / "run" / f"{slice_name}-forward.pid").read_text())
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not port_open(50101), 10, what="the slice port to close")
    result = dockpart("up", "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(GREEN) == "hello from version 6\n" and get(BLUE) == "hello from version 4\n"


def test_a_second_init_changes_nothing(env):
    files = [p for p in env.dir.rglob("*") if p.is_file() and "run" not in p.parts]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = dockpart("init", str(env.dir))
    assert again.returncode == 0
    assert "nothing changed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert get(GREEN) == "hello from version 6\n" and get(BLUE) == "hello from version 4\n"
