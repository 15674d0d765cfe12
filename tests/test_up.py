"""`scripts/up --no-docker`: the whole tier as local processes, for a machine without an engine."""

import os
import subprocess
import sys
import tempfile

import requests

from helpers import ROOT, free_port, free_port_run, port_open, served_by, wait_for

def run_up(env: dict, *args: str) -> str:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "up"), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"scripts/up {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def test_no_docker_runs_the_tier_as_processes_and_down_stops_it():
    redis_port, web_port, proxy_port = free_port(), free_port_run(3), free_port()
    run_dir = tempfile.mkdtemp(prefix="dockpart-up-run-")
    env = {**os.environ, "DOCKPART_REDIS_PORT": str(redis_port), "DOCKPART_WEB_PORT": str(web_port),
           "DOCKPART_PROXY_PORT": str(proxy_port), "DOCKPART_RUN": run_dir,
           "DOCKPART_VENV": sys.prefix}
    proxy = f"http://127.0.0.1:{proxy_port}"
    try:
        output = run_up(env, "--no-docker")
        assert "asked for no Docker: running redis, web, proxy and infra as local processes" in output
        assert f"point a browser at {proxy}/" in output

        assert requests.get(proxy + "/spawn", timeout=5).status_code == 202

        def two_instances():
            return len({served_by(proxy + "/") for _ in range(4)}) == 2

        wait_for(two_instances, timeout=30, interval=0.5, what="a spawned process behind the proxy")
    finally:
        output = run_up(env, "down")
    assert "dockpart is down" in output
    for port in (redis_port, web_port, web_port + 1, proxy_port):
        assert not port_open(port), port
