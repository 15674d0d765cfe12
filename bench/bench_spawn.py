"""How long from ``GET /spawn`` to the first response served by the new instance.

For each setup (process driver, Docker driver with the image built, Docker driver
with ``--rebuild``, the seed's way, and the swarm driver) it starts its own redis-server, the first
dockpart-web, dockpart-proxy (when that plugin is installed; else it polls the new
instance directly and says so) and dockpart-infra, then times several spawns:
``GET /spawn`` on the first instance, then ``GET /`` through the proxy until a
page names the new instance.  Prints the median and the worst per setup.

    python bench/bench_spawn.py [--spawns 5] [--only process|docker|rebuild|swarm ...]

Needs redis-server; the Docker setups need the engine and the images
(``scripts/images all``).  The swarm setup makes the engine a one-node swarm
(``--advertise-addr 127.0.0.1``) unless it is one, and leaves it afterwards if it
made it.  Everything listens on 127.0.0.1; the instances, containers and services
it starts are removed at the end.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import (BIN, SERVED_BY, Daemon, RedisProcess, free_port,  # noqa: E402
                     kill_instances, port_block, wait_for)

TWISTD = str(BIN / "twistd")
SETUPS = {
    "process": ["--driver", "process"],
    "docker": ["--driver", "docker", "--image", "dockpart-web:latest"],
    "rebuild": ["--driver", "docker", "--rebuild", "--build-context", str(ROOT),
                "--build-arg", "BASE_IMAGE=dockpart-base:bookworm"],
    "swarm": ["--driver", "swarm", "--image", "dockpart-web:latest"],
}


def has_plugin(name: str) -> bool:
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    return name in out


def daemon(plugin: str, args, ready: str) -> Daemon:
    return Daemon(plugin, *args, ready=ready).start(30)


def swarm_init() -> bool:
    """Make the engine a one-node swarm unless it is one; whether this run made it."""
    state = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
    if state == "active":
        return False
    subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"], check=True,
                   capture_output=True, timeout=60)
    return True


def run_setup(name: str, spawns: int, use_proxy: bool, log_dir: Path) -> list[float]:
    made_swarm = name == "swarm" and swarm_init()
    try:
        return _run_setup(name, spawns, use_proxy, log_dir)
    finally:
        if made_swarm:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True,
                           timeout=60)


def _run_setup(name: str, spawns: int, use_proxy: bool, log_dir: Path) -> list[float]:
    first = port_block(spawns + 1)
    redis = RedisProcess().start()
    redis_url = redis.url
    state = log_dir / f"state-{name}"
    started = []
    try:
        web = daemon("dockpart-web", ["--listen", f"tcp:{first}:interface=127.0.0.1",
                                      "--first-port", str(first), "--max-instances", "100",
                                      "--redis", redis_url], "listening on")
        started.append(web)
        front = f"http://127.0.0.1:{first}"
        if use_proxy:
            proxy_port = free_port()
            started.append(daemon("dockpart-proxy", [
                "--listen", f"tcp:{proxy_port}:interface=127.0.0.1", "--redis", redis_url],
                "listening"))
            front = f"http://127.0.0.1:{proxy_port}"
        started.append(daemon("dockpart-infra", [
            *SETUPS[name], "--redis", redis_url, "--first-port", str(first),
            "--port-range", f"{first + 1}-{first + spawns}", "--interval", "0.05",
            "--state-dir", str(state), "--drain", "0.2"], "dockpart-infra started"))
        times = []
        session = requests.Session()
        for _ in range(spawns):
            t0 = time.monotonic()
            r = session.get(f"http://127.0.0.1:{first}/spawn", timeout=10)
            assert r.status_code == 202, r.text
            url = re.search(r"http://127\.0\.0\.1:\d+", r.text).group(0)
            target = front if use_proxy else url

            def served():
                page = session.get(target + "/", timeout=5)
                m = SERVED_BY.search(page.text)
                return m and m.group(1) == url
            wait_for(served, 600, what=f"{url} to answer")
            times.append(time.monotonic() - t0)
            print(f"  {name}: {url} served after {times[-1]:.2f} s", flush=True)
        session.close()

        def listing():
            return requests.get(f"{front_web}/listservers", timeout=5,
                                headers={"accept": "application/json"}).json()
        front_web = f"http://127.0.0.1:{first}"
        wait_for(lambda: len(listing()["servers"]) == spawns + 1, 60,
                 what="every spawn to be registered")
        for _ in range(spawns):  # the infra removes what it started, through its own queue
            requests.get(f"{front_web}/destroy", timeout=10)
        wait_for(lambda: [listing()[k] for k in ("servers", "spawning", "destroying")]
                 == [[front_web], [], []], 120, what="the instances to be destroyed")
        return times
    finally:
        for proc in reversed(started):
            proc.stop()
        redis.stop()
        print(f"  {name}: logs {' '.join(str(proc.log_path) for proc in started)}")
        remove_leftovers(name, state, range(first + 1, first + spawns + 1))


def remove_leftovers(name: str, state: Path, ports) -> None:
    """Instances outlive their infra by design; a failed run must not leave any behind."""
    if name == "process":
        kill_instances(state)
        return
    import docker
    from dockpart.drivers import instance_name
    client = docker.from_env()
    for port in ports:
        if name == "swarm":
            for service in client.services.list(filters={"name": instance_name(port),
                                                         "label": "dockpart.managed=true"}):
                service.remove()
            # Swarm removes the task's container a moment later; the swarm may be left next.
            wait_for(lambda: not client.containers.list(
                all=True, filters={"label": f"dockpart.port={port}"}), 60, what="the task to go")
        for c in client.containers.list(all=True, filters={"name": f"^{instance_name(port)}$",
                                                           "label": "dockpart.managed=true"}):
            c.remove(force=True)
        if name == "rebuild":
            try:
                client.images.remove(f"{instance_name(port)}:latest")
            except docker.errors.ImageNotFound:
                pass
    client.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=SETUPS, default=list(SETUPS))
    args = parser.parse_args()
    use_proxy = has_plugin("dockpart-proxy")
    how = "through dockpart-proxy" if use_proxy else "straight to the instance (no dockpart-proxy)"
    print(f"time from GET /spawn to the first response {how}, {args.spawns} spawns each")
    log_dir = Path(tempfile.mkdtemp(prefix="bench-spawn-"))
    results = {}
    for name in args.only:
        results[name] = run_setup(name, args.spawns, use_proxy, log_dir)
    print(f"\n{'setup':<10} {'median s':>9} {'worst s':>9}")
    for name, times in results.items():
        print(f"{name:<10} {statistics.median(times):>9.2f} {max(times):>9.2f}")
    print(f"(the instances' logs are in {log_dir})")


if __name__ == "__main__":
    main()
