"""Git-push blue/green deployment end to end: real git pushes, the real engine and registry.

Each test stands alone: it gets a fresh deploy directory and app repository (the registry on
:5000 is shared by the module, the slice ports 50100/50101 are fixed) and pushes what it needs;
its slices are taken down afterwards, even when it fails.
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
from dockpart.deploy.release import History
from dockpart.deploy.repos import DeployDir
from helpers import BIN, Daemon, free_port, port_open, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("reserved_ports_restored")]

BASE_IMAGE = "dockpart-base:bookworm"
APP = "localhost:5000/dockpart-example"
GREEN, BLUE = "http://127.0.0.1:50100", "http://127.0.0.1:50101"


def dockpart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dockpart"), "deploy", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def registry():
    """The registry on :5000 and the base image, for the module; its images removed at the end."""
    docker = docker_client()
    run_images("base")
    registry = Registry().start()
    try:
        yield docker
    finally:
        for image in docker.images.list(name=APP):
            for name in image.tags:
                docker.images.remove(name)
        registry.stop()
        docker.close()


@pytest.fixture
def env(registry, tmp_path):
    """A fresh deploy directory and app repository; both slices down again afterwards."""
    deploy_dir = tmp_path / "deploy"
    init = dockpart("init", str(deploy_dir), "--app", "dockpart-example", "--base-image", BASE_IMAGE,
                    "--keep", "2")
    assert init.returncode == 0, init.stderr
    repo = AppRepo(tmp_path / "app", deploy_dir)
    repo.git("config", "user.name", f"dockpart tests {tmp_path.name}")  # commits unique per test
    ns = SimpleNamespace(dir=deploy_dir, repo=repo, docker=registry, commits={},
                         init_output=init.stdout)
    try:
        yield ns
    finally:
        dockpart("down", "--dir", str(deploy_dir))


def push(env, remote: str, version: str, broken: bool = False) -> subprocess.CompletedProcess:
    env.commits[version] = env.repo.commit(version, broken)
    return env.repo.push(remote)


def serve(env, remote: str, version: str) -> subprocess.CompletedProcess:
    """Push ``version`` to ``remote`` and check that it serves."""
    result = push(env, remote, version)
    assert result.returncode == 0, result.stdout
    assert get({"green": GREEN, "blue": BLUE}[remote]) == f"hello from version {version}\n"
    return result


def tag(env, slice_name: str, version: str) -> str:
    return f"{slice_name}-{env.commits[version][:7]}"


def test_init_wrote_both_slices(env):
    for slice_name in ("green", "blue"):
        assert (env.dir / f"{slice_name}.git" / "hooks" / "pre-receive").exists()
        assert f"wrote {env.dir / slice_name}-www" in env.init_output


def test_push_v1_to_green_serves_it_on_50100_and_records_its_digest(env):
    result = serve(env, "green", "1")
    for step in ("building", "pushing", "pulling", "waiting up to", "healthy;",
                 f"green serves {tag(env, 'green', '1')}"):
        assert step in result.stdout
    release = History(DeployDir(env.dir), "green").current()
    assert release.digest.startswith("sha256:")
    assert release.digest == registry_digest(f"{APP}:{tag(env, 'green', '1')}")
    assert f"pulling {APP}@{release.digest}" in result.stdout


def test_push_v2_to_blue_serves_it_on_50101_and_green_keeps_v1(env):
    serve(env, "green", "1")
    serve(env, "blue", "2")
    assert get(GREEN) == "hello from version 1\n"


def test_a_broken_push_is_refused_with_the_reason_and_v2_keeps_serving(env):
    serve(env, "blue", "2")
    result = push(env, "blue", "3", broken=True)
    assert result.returncode != 0
    assert "deliberately broken: no app today" in result.stdout  # the container's last log lines
    log = env.dir / "run" / "blue-deploy.log"
    failed = [line.rstrip() for line in result.stdout.splitlines() if "DEPLOY FAILED" in line]
    assert failed == ["remote: DEPLOY FAILED, blue keeps serving its previous release: health check "
                      f"failed: the container exited with code 1 (log: {log})"]
    assert "pre-receive hook declined" in result.stdout
    assert get(BLUE) == "hello from version 2\n"
    assert env.docker.containers.list(all=True, filters={"name": "blue-app-next"}) == []
    assert f"deleted {APP}:{tag(env, 'blue', '3')} from the registry" in result.stdout


def test_other_branches_are_accepted_without_deploying(env):
    serve(env, "blue", "2")
    result = env.repo.push("blue", "HEAD:refs/heads/feature")
    assert result.returncode == 0, result.stdout
    assert "accepted refs/heads/feature; only main or master deploys to blue" in result.stdout
    assert get(BLUE) == "hello from version 2\n"


def test_push_v4_replaces_v2_on_50101_without_a_failed_request(env):
    serve(env, "blue", "2")
    with RequestLoop(BLUE + "/") as loop:
        result = push(env, "blue", "4")
    assert result.returncode == 0, result.stdout
    assert loop.failures == []
    assert set(loop.answers) == {"hello from version 2", "hello from version 4"}
    assert get(BLUE) == "hello from version 4\n"


def test_two_pushes_to_one_slice_at_once_wait_for_each_other(env):
    """main and master both deploy: two pushes of different commits to green at one moment."""
    env.commits["1"] = env.repo.commit("1")
    env.repo.git("checkout", "-q", "-b", "master")
    env.commits["2"] = env.repo.commit("2")
    pushes = {version: subprocess.Popen(["git", "push", "green", branch], cwd=env.repo.path,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for version, branch in (("1", "main"), ("2", "master"))}
    outputs = {version: p.communicate(timeout=300)[0] for version, p in pushes.items()}
    assert all(p.returncode == 0 for p in pushes.values()), outputs
    waited = [v for v, out in outputs.items() if "waiting for the push to green in progress" in out]
    assert len(waited) == 1, outputs  # exactly one found the other under way
    other = "1" if waited == ["2"] else "2"
    assert f"(deploying {env.commits[other][:7]} from refs/heads/" in outputs[waited[0]]
    # The one that waited deployed after the other one: it serves.
    assert get(GREEN) == f"hello from version {waited[0]}\n"
    assert [r.commit for r in History(DeployDir(env.dir), "green").releases()] == \
        [env.commits[waited[0]], env.commits[other]]


def test_switch_moves_the_front_route_without_a_failed_request(env, redis_server):
    serve(env, "green", "1")
    serve(env, "blue", "2")
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
        assert set(loop.answers) == {"hello from version 1", "hello from version 2"}
        assert get(f"http://127.0.0.1:{front}/") == "hello from version 2\n"
        # A push to the other slice does not move the front route.
        serve(env, "green", "3")
        assert get(f"http://127.0.0.1:{front}/") == "hello from version 2\n"
        status = dockpart("status", "--dir", str(env.dir), "--redis", redis_server.url)
        assert f"blue: {BLUE} [live]" in status.stdout
    finally:
        proxy.stop()


def test_rollback_runs_the_previous_then_a_named_release(env):
    serve(env, "blue", "2")
    assert push(env, "blue", "3", broken=True).returncode != 0
    serve(env, "blue", "4")
    with RequestLoop(BLUE + "/") as loop:
        result = dockpart("rollback", "blue", "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert loop.failures == []
    assert get(BLUE) == "hello from version 2\n"
    v4 = tag(env, "blue", "4")
    result = dockpart("rollback", "blue", v4, "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(BLUE) == "hello from version 4\n"
    status = dockpart("status", "--dir", str(env.dir))
    assert "container blue-app: running, healthy" in status.stdout
    assert f"* {v4}  {env.commits['4']}" in status.stdout
    assert tag(env, "blue", "2") in status.stdout
    assert tag(env, "blue", "3") not in status.stdout  # the refused release is no release


def test_rollback_pulls_the_recorded_digest_even_when_its_tag_was_overwritten(env):
    serve(env, "blue", "1")
    serve(env, "blue", "2")
    v1, v2 = f"{APP}:{tag(env, 'blue', '1')}", f"{APP}:{tag(env, 'blue', '2')}"
    v1_image = env.docker.images.get(v1)
    # Someone pushes other contents under v1's tag, and the engine has no copy of the old v1.
    env.docker.api.tag(v2, APP, tag(env, "blue", "1"))
    for _ in env.docker.api.push(APP, tag=tag(env, "blue", "1"), stream=True, decode=True):
        pass
    assert registry_digest(v1) == registry_digest(v2)
    env.docker.images.remove(v1_image.id, force=True)
    result = dockpart("rollback", "blue", "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(BLUE) == "hello from version 1\n"
    digest = History(DeployDir(env.dir), "blue").current().digest
    assert f"pulling {APP}@{digest}" in result.stdout


def test_releases_beyond_keep_leave_the_registry(env):
    serve(env, "green", "1")
    serve(env, "green", "5")
    result = serve(env, "green", "6")
    v1 = f"{APP}:{tag(env, 'green', '1')}"
    assert f"deleted {v1} from the registry" in result.stdout
    assert registry_digest(v1) is None
    assert registry_digest(f"{APP}:{tag(env, 'green', '5')}")
    # SLICE names the running release in the registry.
    assert registry_digest(f"{APP}:green") == registry_digest(f"{APP}:{tag(env, 'green', '6')}")


def test_up_serves_the_slices_again_after_their_forwarders_died(env):
    serve(env, "green", "1")
    serve(env, "blue", "2")
    for slice_name in ("green", "blue"):
        pid = int((env.dir / "run" / f"{slice_name}-forward.pid").read_text())
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not port_open(50100) and not port_open(50101), 10,
             what="the slice ports to close")
    result = dockpart("up", "--dir", str(env.dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert get(GREEN) == "hello from version 1\n" and get(BLUE) == "hello from version 2\n"


def test_a_second_init_changes_nothing(env):
    serve(env, "green", "1")
    files = [p for p in env.dir.rglob("*") if p.is_file() and "run" not in p.parts]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = dockpart("init", str(env.dir))
    assert again.returncode == 0
    assert "nothing changed" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert get(GREEN) == "hello from version 1\n"
