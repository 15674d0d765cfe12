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
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
SETUPS = {
    "process": ["--driver", "process"],
    "docker": ["--driver", "docker", "--image", "dockpart-web:latest"],
    "rebuild": ["--driver", "docker", "--rebuild", "--build-context", str(ROOT),
                "--build-arg", "BASE_IMAGE=dockpart-base:bookworm"],
    "swarm": ["--driver", "swarm", "--image", "dockpart-web:latest"],
}
SERVED_BY = re.compile(r"Served by the instance at <b>([^<]+)</b>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_block(size: int) -> int:
    """A first port with ``size`` free ports after it (outside the ephemeral range)."""
    for first in range(23000, 29000, size + 1):
        ok = True
        for port in range(first, first + size + 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise SystemExit("no block of free ports between 23000 and 29000")


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def has_plugin(name: str) -> bool:
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60).stdout
    return name in out


class Proc:
    def __init__(self, argv, log_dir: Path, name: str):
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(argv, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def daemon(plugin: str, args, log_dir: Path, ready: str, setup: str) -> Proc:
    proc = Proc([TWISTD, "-n", "--pidfile=", "--logfile=-", plugin, *args], log_dir,
                f"{setup}-{plugin}")
    wait(lambda: ready in proc.output(), 30, f"{plugin} to log {ready!r}")
    return proc


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
    first = free_block(spawns + 1)
    redis_port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    state = log_dir / f"state-{name}"
    started = []
    try:
        wait(lambda: socket.create_connection(("127.0.0.1", redis_port), 1), 10, "redis-server")
        web = daemon("dockpart-web", ["--listen", f"tcp:{first}:interface=127.0.0.1",
                                      "--first-port", str(first), "--max-instances", "100",
                                      "--redis", redis_url], log_dir, "listening on", name)
        started.append(web)
        front = f"http://127.0.0.1:{first}"
        if use_proxy:
            proxy_port = free_port()
            started.append(daemon("dockpart-proxy", [
                "--listen", f"tcp:{proxy_port}:interface=127.0.0.1", "--redis", redis_url],
                log_dir, "listening", name))
            front = f"http://127.0.0.1:{proxy_port}"
        started.append(daemon("dockpart-infra", [
            *SETUPS[name], "--redis", redis_url, "--first-port", str(first),
            "--port-range", f"{first + 1}-{first + spawns}", "--interval", "0.05",
            "--state-dir", str(state), "--drain", "0.2"], log_dir, "dockpart-infra started", name))
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
            wait(served, 600, f"{url} to answer")
            times.append(time.monotonic() - t0)
            print(f"  {name}: {url} served after {times[-1]:.2f} s", flush=True)
        session.close()

        def listing():
            return requests.get(f"{front_web}/listservers", timeout=5,
                                headers={"accept": "application/json"}).json()
        front_web = f"http://127.0.0.1:{first}"
        wait(lambda: len(listing()["servers"]) == spawns + 1, 60, "every spawn to be registered")
        for _ in range(spawns):  # the infra removes what it started, through its own queue
            requests.get(f"{front_web}/destroy", timeout=10)
        wait(lambda: listing() == {"servers": [front_web], "spawning": [], "destroying": []},
             120, "the instances to be destroyed")
        return times
    finally:
        for proc in reversed(started):
            proc.stop()
        redis.terminate()
        redis.wait(10)
        remove_leftovers(name, state, range(first + 1, first + spawns + 1))


def remove_leftovers(name: str, state: Path, ports) -> None:
    """Instances outlive their infra by design; a failed run must not leave any behind."""
    if name == "process":
        from dockpart.drivers.process import _thd_scan
        for pids in _thd_scan(str(state.resolve())).values():
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
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
            wait(lambda: not client.containers.list(
                all=True, filters={"label": f"dockpart.port={port}"}), 60, "the task to go")
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
    print(f"(logs in {log_dir})")


if __name__ == "__main__":
    main()
