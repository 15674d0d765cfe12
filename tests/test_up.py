"""`scripts/up --no-docker`: the whole tier as local processes, for a machine without an engine."""

import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import redis as redis_py
import requests

from helpers import (ROOT, contains_run, free_port, instance_pids, listening_addresses,
                     port_block, port_open, served_by, wait_for)
from tierkit import SHIPPED_PROXY_ARGS


def run_up(env: dict, *args: str) -> str:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "up"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"scripts/up {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def uids(pid) -> set[int]:
    """The real, effective, saved and file-system user ids of process ``pid``."""
    line, = [l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
             if l.startswith("Uid:")]
    return {int(uid) for uid in line.split()[1:]}


def secret(run_dir: str, file: str, name: str) -> str:
    """A secret scripts/up keeps in RUN_DIR/FILE as NAME=VALUE, for root's eyes only (0600)."""
    path = Path(run_dir, file)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    assert path.stat().st_uid == os.geteuid()
    line, = path.read_text().split()
    key, _, value = line.partition("=")
    assert key == name and len(value) == 48, line
    int(value, 16)  # hex: a URL carries it as it is
    return value


def redis_password(run_dir: str) -> str:
    """The password scripts/up keeps in RUN_DIR/redis.env."""
    return secret(run_dir, "redis.env", "DOCKPART_REDIS_PASSWORD")


@pytest.fixture(scope="module")
def readable_venv():
    """A virtualenv that the unprivileged user scripts/up runs the tier as can use: Debian's
    Python (the tests' may live under /root, mode 0700), on this virtualenv's packages; in a
    folder others may enter (pytest's tmp_path is 0700)."""
    venv = Path(tempfile.mkdtemp(prefix="dockpart-up-venv-"))
    venv.chmod(0o755)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = sysconfig.get_paths()["purelib"]
    (venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
     / "parent.pth").write_text(f"import site; site.addsitedir({site!r})\n")
    twistd = venv / "bin" / "twistd"
    twistd.write_text(f"#!{venv}/bin/python\nfrom twisted.scripts.twistd import run\nrun()\n")
    twistd.chmod(0o755)
    (venv / ".dockpart-installed").touch()  # lib.sh's ensure_venv: nothing to install
    yield str(venv)
    shutil.rmtree(venv)


@pytest.fixture
def tier(readable_venv):
    """Ports and environment for a process-mode tier; taken down even if the test fails."""
    redis_port, web_port, proxy_port = free_port(), port_block(3), free_port()
    run_dir = tempfile.mkdtemp(prefix="dockpart-up-run-")
    env = {**os.environ, "DOCKPART_REDIS_PORT": str(redis_port), "DOCKPART_WEB_PORT": str(web_port),
           "DOCKPART_PROXY_PORT": str(proxy_port), "DOCKPART_RUN": run_dir,
           "DOCKPART_DASHBOARD_PORT": str(free_port()),
           "DOCKPART_VENV": readable_venv}
    tier = {"env": env, "run_dir": run_dir, "redis_port": redis_port, "web_port": web_port,
            "proxy_port": proxy_port, "proxy": f"http://127.0.0.1:{proxy_port}"}
    yield tier
    output = run_up(env, "down")
    assert "dockpart is down" in output
    for port in (redis_port, web_port, web_port + 1, proxy_port):
        assert not port_open(port), port


def test_no_docker_runs_the_tier_as_processes_and_down_stops_it(tier):
    proxy = tier["proxy"]
    output = run_up(tier["env"], "--no-docker")
    assert "asked for no Docker: running redis, web, proxy and infra as local processes" in output
    assert f"point a browser at {proxy}/" in output

    assert requests.get(proxy + "/spawn", timeout=5).status_code == 202

    def two_instances():
        return len({served_by(proxy + "/") for _ in range(4)}) == 2

    wait_for(two_instances, timeout=30, interval=0.5, what="a spawned process behind the proxy")
    # The proxy runs as the fault tests' tier does: active health checks every second.
    pid = Path(tier["run_dir"], "dockpart-proxy.pid").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    assert contains_run(argv, SHIPPED_PROXY_ARGS), argv
    # Everything listens on loopback only; the proxy too, by default.
    for port in (tier["redis_port"], tier["web_port"], tier["web_port"] + 1, tier["proxy_port"]):
        assert listening_addresses(port) == {"127.0.0.1"}, port
    # Started by root, nothing runs as root: Redis, every daemon and the instance infra started.
    if os.geteuid() == 0:
        pids = {name: Path(tier["run_dir"], f"{name}.pid").read_text().strip()
                for name in ("redis-server", "dockpart-web", "dockpart-proxy", "dockpart-infra")}
        pids["the spawned instance"], = instance_pids(tier["web_port"] + 1)
        dockpart = pwd.getpwnam("dockpart").pw_uid
        assert {name: uids(pid) for name, pid in pids.items()} \
            == {name: {dockpart} for name in pids}


def test_redis_has_a_password_and_keeps_its_data_across_down_and_up(tier):
    """Redis refuses clients without the generated password, and its append-only file brings
    the tier's state back after `scripts/up down` and `scripts/up` (same run folder).  The
    dashboard is locked the same way: a token made once, shown once, on no command line."""
    output = run_up(tier["env"], "--no-docker")
    password = redis_password(tier["run_dir"])
    token = secret(tier["run_dir"], "dashboard.env", "DOCKPART_DASHBOARD_TOKEN")
    dashboard = f"http://127.0.0.1:{tier['env']['DOCKPART_DASHBOARD_PORT']}/"
    assert f"{dashboard}?token={token}" in output  # where the operator looks, this once
    assert requests.get(dashboard + "api/state", timeout=5).status_code == 401
    assert requests.get(dashboard + "api/state", headers={"Authorization": f"Bearer {token}"},
                        timeout=5).status_code == 200
    anonymous = redis_py.Redis(port=tier["redis_port"], socket_timeout=5)
    with pytest.raises(redis_py.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis_py.AuthenticationError):
        redis_py.Redis(port=tier["redis_port"], password="wrong", socket_timeout=5).ping()
    client = redis_py.Redis(port=tier["redis_port"], password=password, decode_responses=True,
                            socket_timeout=5)
    # The first instance reached Redis with that password: it registered itself.
    first = f"http://127.0.0.1:{tier['web_port']}"
    wait_for(lambda: first in client.lrange("servers", 0, -1), timeout=10,
             what="the first instance in servers")
    client.set("dockpart:test:kept", "yes")
    assert Path(tier["run_dir"], "redis", "appendonlydir").is_dir()
    # The password is in no daemon's command line (ps shows those to every user).
    for name in ("dockpart-web", "dockpart-proxy", "dockpart-infra", "redis-server"):
        pid = Path(tier["run_dir"], f"{name}.pid").read_text().strip()
        assert password not in Path(f"/proc/{pid}/cmdline").read_text(), name
        assert token not in Path(f"/proc/{pid}/cmdline").read_text(), name

    run_up(tier["env"], "down")
    assert not port_open(tier["redis_port"])
    output = run_up(tier["env"], "--no-docker")
    assert redis_password(tier["run_dir"]) == password  # made once, kept
    assert secret(tier["run_dir"], "dashboard.env", "DOCKPART_DASHBOARD_TOKEN") == token
    assert token not in output and "dashboard.env" in output
    client = redis_py.Redis(port=tier["redis_port"], password=password, decode_responses=True,
                            socket_timeout=5)
    assert client.get("dockpart:test:kept") == "yes"
    assert served_by(tier["proxy"] + "/") == first


def test_proxy_interface_is_one_setting(tier):
    """DOCKPART_PROXY_INTERFACE moves the proxy, and only the proxy, to another address."""
    tier["env"]["DOCKPART_PROXY_INTERFACE"] = "0.0.0.0"
    output = run_up(tier["env"], "--no-docker")
    assert f"point a browser at {tier['proxy']}/" in output
    assert listening_addresses(tier["proxy_port"]) == {"0.0.0.0"}
    for port in (tier["redis_port"], tier["web_port"]):
        assert listening_addresses(port) == {"127.0.0.1"}, port
