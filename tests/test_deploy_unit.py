"""Deploy parts that need no Docker engine: init, the hook's ref handling, history, the
slice forwarder (a real twistd process), the CLI's answers, and the front-route switch on a
real Redis."""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deploykit import AppRepo
from dockpart import keys
from dockpart.deploy import front, hook, repos, supervise
from dockpart.deploy.hook import ZERO, run_hook
from dockpart.deploy.release import History, Release, slice_lock
from dockpart.redisconn import RedisAddress, RedisUnavailable
from helpers import BIN, Daemon, free_port, wait_for

pytestmark = pytest.mark.usefixtures("reserved_ports_restored")

DOCKPART = [str(BIN / "dockpart")]


def dockpart(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*DOCKPART, *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_init_creates_slices_with_hooks_and_a_second_run_changes_nothing(tmp_path):
    deploy = tmp_path / "My App"
    first = dockpart("deploy", "init", str(deploy), "--base-image", "local-base:1",
                     "--build-arg", "FLAVOUR=plain")
    assert first.returncode == 0, first.stderr
    for slice_name in ("green", "blue"):
        hook = deploy / f"{slice_name}.git" / "hooks" / "pre-receive"
        assert os.access(hook, os.X_OK)
        assert f"hook {slice_name} --dir" in hook.read_text()
        assert (deploy / f"{slice_name}-www").is_dir()
    config = json.loads((deploy / repos.CONFIG_NAME).read_text())
    assert config["app"] == "my-app"
    assert config["build_args"] == {"BASE_IMAGE": "local-base:1", "FLAVOUR": "plain"}
    assert config["ports"] == {"green": 50100, "blue": 50101}

    before = {p: p.stat().st_mtime_ns for p in deploy.rglob("*") if p.is_file()}
    second = dockpart("deploy", "init", str(deploy))
    assert second.returncode == 0
    assert "nothing changed" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in deploy.rglob("*") if p.is_file()} == before

    third = dockpart("deploy", "init", str(deploy), "--green-port", "50200", "--keep", "3")
    assert "wrote" in third.stdout
    config = json.loads((deploy / repos.CONFIG_NAME).read_text())
    assert config["ports"] == {"green": 50200, "blue": 50101}
    assert config["keep"] == 3 and config["build_args"]["BASE_IMAGE"] == "local-base:1"


@pytest.mark.parametrize("args, message", [
    (["deploy", "rollback", "purple"], "no slice 'purple'"),
    (["deploy", "init", "x", "--keep", "1"], "--keep must be at least 2"),
    (["deploy", "init", "x", "--health-path", "health"], "must start with /"),
    (["deploy", "init", "x", "--build-arg", "NOEQUALS"], "expected NAME=VALUE"),
    (["deploy"], "name a command"),
])
def test_cli_refuses_bad_arguments_with_a_reason(tmp_path, args, message):
    result = dockpart(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_commands_outside_a_deploy_directory_say_how_to_make_one(tmp_path):
    result = dockpart("deploy", "rollback", "green", "--dir", str(tmp_path))
    assert result.returncode == 1
    assert "dockpart deploy init" in result.stderr


def test_hook_accepts_other_branches_and_deletions_without_deploying(tmp_path):
    repos.init(tmp_path, {}, say=lambda line: None)
    said = []
    lines = [f"{'1' * 40} {'2' * 40} refs/heads/feature\n",
             f"{'1' * 40} {'2' * 40} refs/tags/v1\n",
             f"{'1' * 40} {ZERO} refs/heads/main\n"]
    assert run_hook(repos.DeployDir(tmp_path), "green", lines, said.append) == 0
    assert said == ["accepted refs/heads/feature; only main or master deploys to green",
                    "accepted refs/tags/v1; only main or master deploys to green",
                    "accepted the deletion of refs/heads/main; green keeps serving"]


def test_a_configured_branch_is_the_only_one_that_deploys(tmp_path):
    config = repos.DeployConfig(app="a", branch="production")
    assert config.deploys("production")
    assert not config.deploys("main") and not config.deploys("master")
    assert repos.DeployConfig(app="a").deploys("master")


def test_history_keeps_the_newest_releases_and_finds_the_previous_or_named_one(tmp_path):
    deploy_dir = repos.DeployDir(tmp_path)
    deploy_dir.run.mkdir()
    config = repos.DeployConfig(app="demo")
    history = History(deploy_dir, "blue")
    commits = [c * 40 for c in "abcd"]
    dropped = []
    for commit in commits:
        dropped += history.record(Release.new(config, "blue", commit), keep=3)
    assert [r.tag for r in dropped] == ["blue-aaaaaaa"]
    assert [r.tag for r in history.releases()] == ["blue-ddddddd", "blue-ccccccc", "blue-bbbbbbb"]
    assert history.current().image == "localhost:5000/demo:blue-ddddddd"
    assert history.find(None).tag == "blue-ccccccc"
    assert history.find("bbbb").tag == "blue-bbbbbbb"
    assert history.find("blue-ddddddd").commit == commits[3]
    with pytest.raises(repos.DeployError, match="no release 'zzzz'"):
        history.find("zzzz")
    # Bringing an older release back puts it first once, not twice.
    history.record(history.find("bbbb"), keep=3)
    assert [r.tag for r in history.releases()] == ["blue-bbbbbbb", "blue-ddddddd", "blue-ccccccc"]


def _named_server(name: str) -> socket.socket:
    """A TCP server that answers every connection with its name, in a thread."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(name.encode())

    threading.Thread(target=serve, daemon=True).start()
    return sock


def _read_from(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        return data


def test_forwarder_sends_each_new_connection_to_the_current_target(tmp_path):
    first, second = _named_server("first"), _named_server("second")
    target = tmp_path / "green.target"
    port = free_port()
    daemon = Daemon("dockpart-forward", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--target-file", str(target), ready="dockpart-forward listening on").start()
    try:
        assert _read_from(port) == b""  # no target yet: the connection is closed at once
        target.write_text(f"127.0.0.1:{first.getsockname()[1]}\n")
        assert _read_from(port) == b"first"
        target.write_text(f"127.0.0.1:{second.getsockname()[1]}\n")
        assert _read_from(port) == b"second"
    finally:
        daemon.stop()
        first.close()
        second.close()


def test_forwarder_requires_its_options():
    result = subprocess.run([str(BIN / "twistd"), "-n", "dockpart-forward", "--listen", "tcp:0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--target-file is required" in result.stdout + result.stderr


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_switch_replaces_the_front_route_atomically_and_announces_it(tmp_path, redis_server, redis_db):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    green_port = server.server_address[1]
    blue_port = free_port()  # nothing answers there
    repos.init(tmp_path, {"ports": {"green": green_port, "blue": blue_port}}, say=lambda line: None)
    redis_db.rpush(keys.DEPLOY_LIVE, "http://127.0.0.1:1", "http://127.0.0.1:2")
    pubsub = redis_db.pubsub()
    pubsub.subscribe("dockpart:deploy:live:changed")  # the name docs/deploy.md gives
    wait_for(lambda: pubsub.get_message(timeout=0.1), what="the subscription")
    try:
        done = dockpart("deploy", "switch", "green", "--dir", str(tmp_path), "--redis", redis_server.url)
        assert done.returncode == 0, done.stderr
        green_url = f"http://127.0.0.1:{green_port}"
        assert redis_db.lrange(keys.DEPLOY_LIVE, 0, -1) == [green_url]
        message = wait_for(lambda: pubsub.get_message(timeout=0.1), what="the change notice")
        assert message["data"] == f"replace {green_url}"

        refused = dockpart("deploy", "switch", "blue", "--dir", str(tmp_path), "--redis", redis_server.url)
        assert refused.returncode == 1
        assert "does not answer 2xx or 3xx; the front route stays" in refused.stderr
        assert redis_db.lrange(keys.DEPLOY_LIVE, 0, -1) == [green_url]

        status = dockpart("deploy", "status", "--dir", str(tmp_path), "--redis", redis_server.url)
        assert f"front route ({keys.DEPLOY_LIVE}): {green_url}" in status.stdout
    finally:
        pubsub.close()
        server.shutdown()
        server.server_close()


def test_python_module_runs_the_same_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dockpart.deploy", "init", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "pre-receive" in result.stdout


def test_init_as_root_reserves_the_slice_ports_beside_those_already_reserved(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("reserving ports needs root (CI runs as root)")
    reserved = tmp_path / "ip_local_reserved_ports"
    (tmp_path / "ip_local_port_range").write_text("32768\t60999\n")
    reserved.write_text("8080,40000-40010\n")
    said = []
    assert repos.reserve_ports([40005, 50100, 50101, 7000], said.append, tmp_path) == [50100, 50101]
    assert reserved.read_text() == "8080,40000-40010,50100,50101\n"
    assert said[0].startswith("reserved ports 50100,50101")
    assert repos.reserve_ports([50100, 50101], said.append, tmp_path) == []  # already reserved

    # The real setting, through the command: added to, not replaced.  It is the machine's, so
    # the test puts back what was there, even when it fails.
    real = repos.SYSCTL_IPV4.joinpath("ip_local_reserved_ports")
    before = real.read_text()
    try:
        real.write_text("40000\n")
        done = dockpart("deploy", "init", str(tmp_path / "d"), "--blue-port", "50102")
        assert done.returncode == 0, done.stderr
        assert "reserved ports 50100,50102" in done.stdout
        assert real.read_text().split(",") == ["40000", "50100", "50102\n"]
    finally:
        real.write_text(before if before.strip() else "\n")


def test_init_without_root_warns_about_ports_in_the_ephemeral_range(tmp_path):
    (tmp_path / "ip_local_port_range").write_text("32768\t60999\n")
    (tmp_path / "ip_local_reserved_ports").write_text("50101\n")
    said = []
    assert repos.reserve_ports([50100, 50101, 8000], said.append, tmp_path, is_root=False) == []
    assert said == ["warning: ports 50100 lie in the ephemeral port range 32768-60999: an outgoing "
                    "connection can hold one and a push then fails to listen on it; reserve them "
                    "as root: sysctl -w net.ipv4.ip_local_reserved_ports=50101,50100"]
    assert (tmp_path / "ip_local_reserved_ports").read_text() == "50101\n"


def test_an_unexpected_error_gives_the_pusher_one_line_and_the_log_a_traceback(tmp_path, monkeypatch):
    repos.init(tmp_path, {}, say=lambda line: None)
    deploy_dir = repos.DeployDir(tmp_path)

    def broken(*args, **kwargs):
        raise KeyError("Config")

    monkeypatch.setattr(hook, "deploy_commit", broken)
    monkeypatch.setattr(hook, "ref_value", lambda *args: ZERO)
    said = []
    assert run_hook(deploy_dir, "green", [f"{ZERO} {'1' * 40} refs/heads/main\n"], said.append) == 1
    log = hook.log_path(deploy_dir, "green")
    assert said[-1] == ("DEPLOY FAILED, green keeps serving its previous release: "
                        f"unexpected error: KeyError: 'Config' (log: {log})")
    assert not any("Traceback" in line for line in said)
    assert "Traceback (most recent call last)" in log.read_text()
    assert "deploying 1111111 to green" in log.read_text()


def _no_engine() -> dict:
    """An environment whose Docker engine cannot be reached: a deployment fails at its first docker step."""
    return {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def test_a_failed_push_tells_the_pusher_one_line_and_where_the_log_is(tmp_path):
    repos.init(tmp_path / "deploy", {}, say=lambda line: None)
    app = AppRepo(tmp_path / "app", tmp_path / "deploy")
    app.commit("1")
    result = subprocess.run(["git", "push", "green", "main"], cwd=app.path, env=_no_engine(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode != 0
    log = tmp_path / "deploy" / "run" / "green-deploy.log"
    failed = [line.rstrip() for line in result.stdout.splitlines() if "DEPLOY FAILED" in line]
    assert len(failed) == 1 and failed[0].endswith(f"(log: {log})"), result.stdout
    assert "the Docker engine does not answer" in failed[0]
    assert "Traceback" not in result.stdout
    assert "pre-receive hook declined" in result.stdout
    assert "the Docker engine does not answer" in log.read_text()


def test_a_second_push_waits_for_the_first_and_is_refused_if_the_branch_moved(tmp_path):
    repos.init(tmp_path / "deploy", {}, say=lambda line: None)
    deploy_dir = repos.DeployDir(tmp_path / "deploy")
    app = AppRepo(tmp_path / "app", tmp_path / "deploy")
    first = app.commit("1")
    second = app.commit("2")
    git_dir = str(deploy_dir.git_dir("green"))
    with slice_lock(deploy_dir, "green", doing="deploying 1234567 from refs/heads/main"):
        pushing = subprocess.Popen(["git", "push", "green", "main"], cwd=app.path, env=_no_engine(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = hook.log_path(deploy_dir, "green")
        wait_for(lambda: "waiting for the push to green in progress" in log.read_text(), 30,
                 what="the second push to wait")
        assert "(deploying 1234567 from refs/heads/main, pid " in log.read_text()
        assert pushing.poll() is None  # still waiting
        # Meanwhile the first push made main name another commit.
        subprocess.run(["git", f"--git-dir={git_dir}", "fetch", "-q", str(app.path), "main"],
                       check=True)
        subprocess.run(["git", f"--git-dir={git_dir}", "update-ref", "refs/heads/main", first],
                       check=True)
    output, _ = pushing.communicate(timeout=60)
    assert pushing.returncode != 0
    assert "waiting for the push to green in progress" in output
    assert f"refs/heads/main moved to {first[:7]} while this push waited; fetch, merge and push " \
           "again" in output
    assert subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "main"], capture_output=True,
                          text=True).stdout.strip() == first != second


def test_forwarder_refuses_a_bad_listen_endpoint_without_a_traceback(tmp_path):
    result = subprocess.run([str(BIN / "twistd"), "-n", "dockpart-forward", "--listen", "tcp:notaport",
                             "--target-file", str(tmp_path / "t")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--listen 'tcp:notaport'" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_forwarder_waits_for_a_port_in_use_and_listens_once_it_is_free(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    daemon = Daemon("dockpart-forward", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--target-file", str(tmp_path / "t"), "--bind-timeout", "60",
                    ready=f"port {port} is in use")
    try:
        daemon.start()
        assert "listening on" not in daemon.output()
        taken.close()
        wait_for(lambda: "dockpart-forward listening on" in daemon.output(), 10,
                 what="the forwarder to bind once the port is free")
    finally:
        taken.close()
        daemon.stop()


def test_forwarder_gives_up_on_a_port_in_use_after_its_bind_timeout(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "dockpart-forward",
             "--listen", f"tcp:{port}:interface=127.0.0.1", "--target-file", str(tmp_path / "t"),
             "--bind-timeout", "1"], capture_output=True, text=True, timeout=30)
    assert f"dockpart-forward gave up: port {port} still cannot be bound after 1 s" in result.stdout
    assert "listening on" not in result.stdout


def test_the_change_channel_of_a_namespaced_list_is_not_prefixed_twice():
    assert keys.changes_channel(keys.SERVERS) == "dockpart:servers:changed"
    assert keys.changes_channel(keys.DEPLOY_LIVE) == "dockpart:deploy:live:changed"


def test_front_route_calls_work_again_and_again_in_one_process(redis_server, redis_db):
    """A blocking client: no reactor that could run only once (ReactorNotRestartable)."""
    address = RedisAddress.parse(redis_server.url)
    for url in ("http://127.0.0.1:50100", "http://127.0.0.1:50101"):
        front.switch(address, 2.0, url)
        assert front.live(address, 2.0) == [url]
    assert redis_db.lrange(keys.DEPLOY_LIVE, 0, -1) == ["http://127.0.0.1:50101"]
    with pytest.raises(RedisUnavailable, match="127.0.0.1:1/0"):
        front.live(RedisAddress("127.0.0.1", 1, 0), 1.0)


def test_the_hook_says_when_a_slice_port_is_in_use_and_serves_once_it_is_free(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    repos.init(tmp_path, {"ports": {"green": port, "blue": free_port()}}, say=lambda line: None)
    deploy_dir = repos.DeployDir(tmp_path)
    config = deploy_dir.load()
    said, started = [], []
    starting = threading.Thread(target=lambda: started.append(
        supervise.ensure_forwarder(deploy_dir, config, "green", said.append, bind_timeout=30)))
    starting.start()
    try:
        wait_for(lambda: any("is in use" in line for line in said), 20, what="the hook to say why it waits")
        assert f"port {port} is in use (a TIME_WAIT connection?); the forwarder keeps trying for up " \
               "to 30 s" in said
        assert not started
        taken.close()
        starting.join(20)
        assert started and started[0] == supervise.forwarder_pid(deploy_dir, "green")
    finally:
        taken.close()
        starting.join(40)
        supervise.stop_forwarder(deploy_dir, "green")


def _start_on_a_port_in_use(tmp_path, bind_timeout: float) -> tuple[int, str]:
    """Start green's forwarder while its port is held; return the port and the hook's error."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        repos.init(tmp_path, {"ports": {"green": port, "blue": free_port()}}, say=lambda line: None)
        deploy_dir = repos.DeployDir(tmp_path)
        with pytest.raises(repos.DeployError) as failed:
            supervise.ensure_forwarder(deploy_dir, deploy_dir.load(), "green", bind_timeout=bind_timeout)
    return port, str(failed.value)


def test_a_forwarder_that_cannot_start_gives_the_hook_its_reason_in_one_line(tmp_path):
    port, error = _start_on_a_port_in_use(tmp_path, bind_timeout=0)
    log = tmp_path / "run" / "green-forward.log"
    assert error == (
        f"the forwarder of green did not start on port {port}: twisted.internet.error."
        f"CannotListenError: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in "
        f"use. (log: {log})")


def test_a_forwarder_that_gives_up_on_a_port_in_use_says_so_to_the_hook(tmp_path):
    port, error = _start_on_a_port_in_use(tmp_path, bind_timeout=1)
    assert f"did not start on port {port}: dockpart-forward gave up: port {port} still cannot be " \
           "bound after 1 s" in error


def test_a_push_that_moves_both_deploy_branches_is_refused_whole(tmp_path):
    """main and master both deploy: one push of both deployed one and silently accepted the
    other, so which commit served depended on git's order of refs."""
    repos.init(tmp_path / "deploy", {}, say=lambda line: None)
    app = AppRepo(tmp_path / "app", tmp_path / "deploy")
    app.commit("1")
    subprocess.run(["git", "branch", "master"], cwd=app.path, check=True)
    result = subprocess.run(["git", "push", "green", "main", "master"], cwd=app.path,
                            env=_no_engine(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "moves refs/heads/main and refs/heads/master" in result.stdout, result.stdout
    assert "the Docker engine does not answer" not in result.stdout  # refused before any deploy
    git_dir = str(repos.DeployDir(tmp_path / "deploy").git_dir("green"))
    for branch in ("main", "master"):
        assert subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "--verify", "-q",
                               branch], capture_output=True).returncode != 0, branch
