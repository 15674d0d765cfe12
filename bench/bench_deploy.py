"""Git-push deploy figures: push-to-served time, failed requests during a push and a switch.

Run as root on a machine with the Docker engine up (``sudo scripts/test`` sets it up):

    /work/venv/bin/python bench/bench_deploy.py [--pushes 5] [--switches 6]

It starts its own registry on 127.0.0.1:5000, Redis, the front route (``dockpart-proxy
--servers-key dockpart:deploy:live``) and uses the slice ports 50100 and 50101; everything is
removed at the end (and ``net.ipv4.ip_local_reserved_ports``, which ``deploy init`` adds the
slice ports to, set back).  Request loops are bounded in count and time.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from deploykit import RESERVED_PORTS, AppRepo, Registry, RequestLoop, get  # noqa: E402
from helpers import BIN, Daemon, RedisProcess, free_port  # noqa: E402

from dockpart import keys  # noqa: E402

SLICE_URL = {"green": "http://127.0.0.1:50100", "blue": "http://127.0.0.1:50101"}


def dockpart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dockpart"), "deploy", *args], capture_output=True,
                          text=True, timeout=300)


def timed_push(repo: AppRepo, slice_name: str, version: str) -> tuple[float, float]:
    """Seconds from ``git push`` until it returned, and until the slice served ``version``."""
    repo.commit(version)
    expected = f"hello from version {version}"
    seen = []

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen:
            try:
                if get(SLICE_URL[slice_name] + "/", timeout=2).strip() == expected:
                    seen.append(time.monotonic())
            except OSError:
                pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.monotonic()
    watcher.start()
    result = repo.push(slice_name)
    returned = time.monotonic() - start
    watcher.join(300)
    if result.returncode or not seen:
        sys.exit(f"the push of version {version} to {slice_name} failed:\n{result.stdout}")
    return returned, seen[0] - start


def figures(name: str, values: list[float]) -> str:
    return (f"{name}: median {statistics.median(values):.2f} s, min {min(values):.2f} s, "
            f"max {max(values):.2f} s over {len(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=5, help="cached pushes timed (5)")
    parser.add_argument("--switches", type=int, default=6, help="front-route switches (6)")
    args = parser.parse_args()

    subprocess.run(["bash", str(ROOT / "scripts" / "images"), "base"], check=True,
                   stdout=subprocess.DEVNULL)
    reserved_before = RESERVED_PORTS.read_text()  # `deploy init` as root adds the slice ports
    work = Path(tempfile.mkdtemp(prefix="dockpart-bench-deploy-"))
    deploy_dir = work / "deploy"
    registry = Registry().start()
    redis = RedisProcess().start()
    front_port = free_port()
    proxy = None
    try:
        dockpart("init", str(deploy_dir), "--app", "dockpart-bench", "--base-image",
                 "dockpart-base:bookworm")
        repo = AppRepo(work / "app", deploy_dir)
        _, cold = timed_push(repo, "green", "0")
        print(f"first push to green (empty registry, no container yet): served after {cold:.2f} s")
        timed_push(repo, "blue", "0")

        returned, served = [], []
        for i in range(1, args.pushes + 1):
            r, s = timed_push(repo, "green", str(i))
            returned.append(r)
            served.append(s)
        print(figures("cached push to green, git push returned", returned))
        print(figures("cached push to green, new version served", served))

        proxy = Daemon("dockpart-proxy", "--servers-key", keys.DEPLOY_LIVE, "--redis", redis.url,
                       "--listen", f"tcp:{front_port}:interface=127.0.0.1",
                       ready="listening on").start()
        front = f"http://127.0.0.1:{front_port}/"
        dockpart("switch", "green", "--dir", str(deploy_dir), "--redis", redis.url)

        with RequestLoop(front, max_requests=50000, max_seconds=300) as loop:
            for i in range(args.pushes + 1, 2 * args.pushes + 1):
                timed_push(repo, "green", str(i))
        print(f"pushes to the live slice under a request loop through the front route: "
              f"{len(loop.failures)} failed of {loop.count} requests during {args.pushes} pushes")
        for failure in sorted(set(loop.failures))[:5]:
            print("  e.g.", failure)

        with RequestLoop(front, max_requests=50000, max_seconds=120) as loop:
            for i in range(args.switches):
                target = "blue" if i % 2 == 0 else "green"
                done = dockpart("switch", target, "--dir", str(deploy_dir), "--redis", redis.url)
                if done.returncode:
                    sys.exit(done.stderr)
                time.sleep(0.5)
        print(f"front-route switches under a request loop: {len(loop.failures)} failed of "
              f"{loop.count} requests during {args.switches} switches")
        for failure in sorted(set(loop.failures))[:5]:
            print("  e.g.", failure)
    finally:
        if proxy is not None:
            proxy.stop()
        dockpart("down", "--dir", str(deploy_dir))
        client = docker.from_env()
        for image in client.images.list(name="localhost:5000/dockpart-bench"):
            for name in image.tags:
                client.images.remove(name)
        redis.stop()
        registry.stop()
        RESERVED_PORTS.write_text(reserved_before)


if __name__ == "__main__":
    main()
