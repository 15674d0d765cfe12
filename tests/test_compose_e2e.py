"""End to end on the real engine: the README's `scripts/up` brings the compose stack and the infra
daemon up, scaling works through the proxy, and `scripts/up down` leaves nothing behind.

One stack for the module, on free ports and its own compose project, so it never meets a
dockpart that a person runs on the usual ports.  The tests run in file order on that stack.
"""

import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis as redis_py
import requests

from dockerkit import compose, docker_client
from dockpart.drivers import instance_name
from dockpart.tier import parse_instance_url
from helpers import (ROOT, contains_run, free_port, listening_addresses, port_block, port_open,
                     served_by, wait_for)
from test_up import redis_password
from tierkit import SHIPPED_PROXY_ARGS

pytestmark = pytest.mark.docker

#: scripts/up builds what is missing (nothing, after the docker_images fixture) and starts it all.
UP_TIMEOUT = 240


class Stack:
    """scripts/up and scripts/up down with this stack's ports, project and run folder."""

    def __init__(self):
        self.redis_port = free_port()
        self.proxy_port = free_port()
        self.web_port = port_block(6)
        self.project = f"dockpart-e2e-{os.getpid()}"
        self.run_dir = tempfile.mkdtemp(prefix="dockpart-e2e-run-")
        self.env = {
            **os.environ,
            "DOCKPART_REDIS_PORT": str(self.redis_port),
            "DOCKPART_WEB_PORT": str(self.web_port),
            "DOCKPART_PROXY_PORT": str(self.proxy_port),
            "DOCKPART_DASHBOARD_PORT": str(free_port()),
            "COMPOSE_PROJECT_NAME": self.project,
            "DOCKPART_RUN": self.run_dir,
            # The virtualenv running the tests has dockpart, twistd and docker-compose.
            "DOCKPART_VENV": sys.prefix,
        }
        self.proxy = f"http://127.0.0.1:{self.proxy_port}"
        self.first = f"http://127.0.0.1:{self.web_port}"
        self.is_up = False

    def script(self, *args: str, timeout: float = UP_TIMEOUT) -> str:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "up"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"scripts/up {' '.join(args)} failed:\n{output[-5000:]}"
        return output

    def up(self) -> str:
        self.is_up = True
        return self.script()

    def down(self) -> str:
        self.is_up = False
        return self.script("down", timeout=120)

    def redis(self) -> redis_py.Redis:
        return redis_py.Redis(port=self.redis_port, password=redis_password(self.run_dir),
                              decode_responses=True, socket_timeout=5)

    def infra_log(self) -> str:
        path = Path(self.run_dir, "dockpart-infra.log")
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no infra log)"

    def wait_for(self, predicate, timeout: float, what: str):
        """helpers.wait_for, with infra's log in the failure (it tells why a request hangs)."""
        try:
            return wait_for(predicate, timeout, interval=0.2, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; infra log:\n{self.infra_log()}") from None

    def containers(self) -> list:
        """Every container of this stack: the compose project's and the instances on our ports."""
        client = docker_client()
        found = client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={self.project}"})
        ports = {str(p) for p in range(self.web_port, self.web_port + 6)}
        found += [c for c in client.containers.list(all=True, filters={"label": "dockpart.managed=true"})
                  if c.labels.get("dockpart.port") in ports]
        client.close()
        return found


def container_name(url: str) -> str:
    return instance_name(parse_instance_url(url)[1])


@pytest.fixture(scope="module")
def stack(docker_images):
    stack = Stack()
    try:
        output = stack.up()
        assert f"point a browser at {stack.proxy}/" in output, output[-2000:]
        yield stack
    finally:
        if stack.is_up:
            stack.down()
        remove_volumes(stack.project)


def remove_volumes(project: str) -> None:
    """Redis's data volume outlives `scripts/up down` (that is its point); a test's goes."""
    client = docker_client()
    for volume in client.volumes.list(filters={"label": f"com.docker.compose.project={project}"}):
        volume.remove(force=True)
    client.close()


def test_first_instance_answers_through_the_proxy(stack):
    assert served_by(stack.proxy + "/") == stack.first


def test_proxy_runs_with_the_fault_tests_health_checks(stack):
    """Compose's proxy has the flags that tests/test_faults.py's tier is measured with."""
    proxy, = [c for c in stack.containers() if c.labels.get("com.docker.compose.service") == "proxy"]
    assert contains_run(proxy.attrs["Args"], SHIPPED_PROXY_ARGS), proxy.attrs["Args"]


def test_every_part_listens_on_loopback_and_redis_wants_the_password(stack):
    for port in (stack.redis_port, stack.web_port, stack.proxy_port):
        assert listening_addresses(port) == {"127.0.0.1"}, port
    with pytest.raises(redis_py.AuthenticationError):
        redis_py.Redis(port=stack.redis_port, socket_timeout=5).ping()
    assert stack.redis().ping()


def test_redis_restart_keeps_the_tier_state(stack):
    """Redis's append-only file on the named volume brings its keys back after a restart."""
    client = stack.redis()
    client.rpush("dockpart:test:kept", "a", "b")
    redis_container, = [c for c in stack.containers()
                        if c.labels.get("com.docker.compose.service") == "redis"]
    assert any(m["Type"] == "volume" and m["Destination"] == "/data"
               for m in redis_container.attrs["Mounts"])
    redis_container.restart(timeout=10)
    stack.wait_for(lambda: stack.redis().ping(), timeout=30, what="redis back after a restart")
    assert stack.redis().lrange("dockpart:test:kept", 0, -1) == ["a", "b"]
    stack.redis().delete("dockpart:test:kept")
    # The app reconnects by itself: its Redis routes answer again.
    stack.wait_for(lambda: requests.get(stack.proxy + "/set", timeout=5).status_code == 200,
                   timeout=30, what="/set through the proxy after the restart")


def test_two_spawns_bring_three_instances_into_the_rotation(stack):
    for _ in range(2):
        reply = requests.get(stack.proxy + "/spawn", timeout=5)
        assert reply.status_code == 202, reply.text[:300]

    def three_seen():
        return len({served_by(stack.proxy + "/") for _ in range(6)}) == 3

    stack.wait_for(three_seen, timeout=30, what="three instances behind the proxy")
    instances = stack.redis().lrange("servers", 0, -1)
    assert len(instances) == 3 and stack.first in instances
    running = {c.name: c for c in docker_client().containers.list(filters={"label": "dockpart.managed=true"})}
    for url in instances:
        if url != stack.first:
            # Each instance knows the first one, which /destroy must never pick.
            args = running[container_name(url)].attrs["Args"]
            assert args[args.index("--first-port") + 1] == str(stack.web_port), args


def test_destroy_removes_a_container_while_requests_keep_succeeding(stack):
    failures, served, stop = [], [], threading.Event()

    def request_loop():
        deadline = time.monotonic() + 40  # bounded even if the test fails before stopping it
        while not stop.is_set() and time.monotonic() < deadline and len(served) < 5000:
            try:
                reply = requests.get(stack.proxy + "/", timeout=5)
                (served if reply.status_code == 200 else failures).append(reply.status_code)
            except requests.RequestException as e:
                failures.append(repr(e))
            time.sleep(0.01)

    loop = threading.Thread(target=request_loop)
    loop.start()
    try:
        before = set(stack.redis().lrange("servers", 0, -1))
        reply = requests.get(stack.proxy + "/destroy", timeout=5)
        assert reply.status_code in (200, 202), reply.text[:300]
        victim = stack.wait_for(lambda: before - set(stack.redis().lrange("servers", 0, -1)),
                                timeout=15, what="an instance to leave servers").pop()
        name = container_name(victim)

        def container_gone():
            client = docker_client()
            gone = not client.containers.list(all=True, filters={"name": f"^/{name}$"})
            client.close()
            return gone

        stack.wait_for(container_gone, timeout=30, what=f"{name} to be removed")
        time.sleep(1)  # a few more requests after the removal
    finally:
        stop.set()
        loop.join(timeout=10)
    assert victim != stack.first
    assert not failures, f"{len(failures)} failed of {len(failures) + len(served)}: {failures[:5]}"
    assert len(served) > 20


def test_set_then_get_agree_across_instances(stack):
    instances = stack.redis().lrange("servers", 0, -1)
    assert len(instances) == 2
    assert requests.get(stack.proxy + "/set/e2e", timeout=5).status_code == 200
    # Round robin: consecutive requests go to each instance in turn.
    for _ in range(2 * len(instances)):
        reply = requests.get(stack.proxy + "/get/e2e", timeout=5)
        assert reply.status_code == 200 and "self-destruct" in reply.text, reply.text[:300]
    assert {served_by(stack.proxy + "/") for _ in range(2 * len(instances))} == set(instances)


def command_lines_while(action) -> list[list[str]]:
    """Every command line of a ``docker`` client process seen while ``action()`` runs (polled
    from /proc until it returns)."""
    seen, done = {}, threading.Event()

    def watch():
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv and argv[0].endswith(b"docker"):
                    seen[entry.name] = [a.decode(errors="replace") for a in argv]
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        action()
    finally:
        done.set()
        watcher.join(10)
    return list(seen.values())


def test_restart_proxy_puts_the_redis_password_on_no_command_line(stack):
    """`scripts/up restart-proxy` passed the proxy's environment, the password in it, as
    `docker run --env=...`: every user's `ps` showed it."""
    password = redis_password(stack.run_dir)
    lines = command_lines_while(lambda: stack.script("restart-proxy"))
    runs = [argv for argv in lines if "run" in argv and "dockpart-proxy:latest" in argv]
    assert runs, lines  # the stand-in was started, and seen
    assert not [argv for argv in lines if any(password in a for a in argv)]
    # The module's stack may hold instances other tests spawned: any listed one answers.
    assert served_by(stack.proxy + "/") in stack.redis().lrange("servers", 0, -1)
    assert not list(Path(stack.run_dir).glob("proxy-env.*"))  # the file is gone too


def test_down_leaves_no_dockpart_container(stack):
    assert stack.containers()
    output = stack.down()
    assert "dockpart is down" in output
    assert stack.containers() == []
    assert not port_open(stack.proxy_port) and not port_open(stack.web_port)


def test_infra_profile_runs_infra_in_a_container(docker_images):
    """`--profile infra` runs dockpart-infra in a container: it spawns through the socket."""
    ports = {"DOCKPART_REDIS_PORT": free_port(), "DOCKPART_WEB_PORT": port_block(3),
             "DOCKPART_PROXY_PORT": free_port(), "DOCKPART_DASHBOARD_PORT": free_port()}
    project = f"dockpart-e2e-infra-{os.getpid()}"
    password, token = secrets.token_hex(24), secrets.token_hex(24)
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "DOCKPART_REDIS_PASSWORD": password,
           "DOCKPART_DASHBOARD_TOKEN": token}
    web = f"http://127.0.0.1:{ports['DOCKPART_WEB_PORT']}"
    spawned = f"http://127.0.0.1:{ports['DOCKPART_WEB_PORT'] + 1}"

    def infra_compose(*args):
        return compose(project, "infra", env, *args)
    try:
        infra_compose("up", "-d", "--wait", "--wait-timeout", "60", "redis", "web", "infra")
        assert requests.get(web + "/spawn", timeout=5).status_code == 202
        client = redis_py.Redis(port=ports["DOCKPART_REDIS_PORT"], password=password,
                                decode_responses=True)
        try:
            wait_for(lambda: set(client.lrange("servers", 0, -1)) == {web, spawned}, timeout=30,
                     interval=0.5, what=f"{spawned} in servers")
        except AssertionError as e:
            instance = subprocess.run(["docker", "logs", "--tail", "30", container_name(spawned)],
                                      capture_output=True, text=True, timeout=30)
            raise AssertionError(f"{e}; infra log:\n{infra_compose('logs', 'infra')[-3000:]}\n"
                                 f"instance log:\n{instance.stdout}{instance.stderr}") from None
        assert served_by(spawned + "/") == spawned
        # Its own image, not the web app's: the one that holds the Docker socket carries less.
        infra_container, = docker_client().containers.list(
            filters={"label": [f"com.docker.compose.project={project}",
                               "com.docker.compose.service=infra"]})
        assert infra_container.image.tags == ["dockpart-infra:latest"]
        # Its dashboard is locked with the token from the environment (scripts/up's file).
        dashboard = f"http://127.0.0.1:{ports['DOCKPART_DASHBOARD_PORT']}/api/state"
        assert requests.get(dashboard, timeout=5).status_code == 401
        assert requests.get(dashboard, headers={"Authorization": f"Bearer {token}"},
                            timeout=5).status_code == 200
    finally:
        infra_compose("down", "--volumes", "--timeout", "5")
        client = docker_client()
        for c in client.containers.list(all=True, filters={"name": f"^/{container_name(spawned)}$"}):
            c.remove(force=True)
        client.close()
