"""App release figures: time from ``git push`` to the new release serving on every instance,
and requests failed meanwhile, for an app of 1 and of 3 instances.

    .venv/bin/python bench/bench_release.py [--pushes 3] [--instances 1 3] [--driver docker]

It starts its own Redis, dockpart-infra and dockpart-proxy on free loopback ports, an apps
directory in a temporary folder, and examples/hello as the pushed app (its Procfile for the
process driver; its Dockerfile for the docker driver, built on the local base image
``dockpart-base:bookworm`` of scripts/images and pushed to a registry of its own on a free
port); a request loop through the proxy, bounded in count and time, runs during each push.
Everything is stopped (and the bench's containers and images removed) at the end.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dashboardkit import stop_managed  # noqa: E402
from helpers import BIN, Daemon, RedisProcess, free_port, port_block  # noqa: E402

from dockpart import keys  # noqa: E402

HELLO = ROOT / "examples" / "hello"


def dockpart(redis_url: str, *args: str) -> None:
    subprocess.run([str(BIN / "python"), "-m", "dockpart", "apps", *args, "--redis", redis_url],
                   check=True, capture_output=True, text=True, timeout=120)


def git(cwd, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def get(url: str, host: str, timeout: float = 5.0) -> str:
    request = urllib.request.Request(url, headers={"Host": host})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


class Loop(threading.Thread):
    """Requests through the proxy until stopped (at most ``most`` requests or seconds)."""

    def __init__(self, base: str, host: str, most: int = 20000, seconds: float = 120.0):
        super().__init__(daemon=True)
        self.base, self.host, self.most, self.seconds = base, host, most, seconds
        self.ok = self.failed = 0
        self.halt = threading.Event()

    def run(self):
        end = time.monotonic() + self.seconds
        while not self.halt.is_set() and time.monotonic() < end and self.ok + self.failed < self.most:
            try:
                get(self.base + "/", self.host)
                self.ok += 1
            except OSError:
                self.failed += 1

    def stop(self):
        self.halt.set()
        self.join(10)


def everywhere(client, name: str, version: str, count: int) -> bool:
    urls = client.lrange(keys.app_tier(name).servers, 0, -1)
    if len(urls) != count:
        return False
    try:
        return all(get(url + "/", "x", 2).startswith(version + " ") for url in urls)
    except OSError:
        return False


def write_version(work: Path, version: str, docker: bool) -> None:
    if docker:
        text = (HELLO / "Dockerfile").read_text().replace('"hello"]', f'"{version}"]')
        (work / "Dockerfile").write_text(text)
    else:
        (work / "Procfile").write_text(f"web: {sys.executable} app.py {version}\n")


def timed_push(work: Path, remote: str, client, name: str, version: str, count: int,
               docker: bool = False):
    write_version(work, version, docker)
    git(work, "commit", "-qam", version)
    seen = []

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not seen:
            if everywhere(client, name, version, count):
                seen.append(time.monotonic())
            time.sleep(0.02)
    start = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = git(work, "push", remote, "main")
    returned = time.monotonic() - start
    watcher.join(300)
    if result.returncode or not seen:
        raise SystemExit(f"push of {version} failed:\n{result.stderr}")
    return returned, seen[0] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--driver", choices=["process", "docker"], default="process")
    args = parser.parse_args()
    docker = args.driver == "docker"
    tmp = Path(tempfile.mkdtemp(prefix="bench-release-"))
    registry = None
    if docker:
        from deploykit import Registry
        registry = Registry(port=free_port()).start()
        os.environ["DOCKPART_REGISTRY"] = f"localhost:{registry.port}"
        os.environ.setdefault("DOCKPART_BASE_IMAGE", "dockpart-base:bookworm")
    redis = RedisProcess().start()
    low = port_block(8)
    state = tmp / "state"
    infra = Daemon("dockpart-infra", "--driver", args.driver, "--redis", redis.url,
                   "--state-dir", str(state), "--first-port", str(free_port()),
                   "--app-ports", f"{low}-{low + 7}", "--interval", "0.05", "--drain", "1",
                   ready="dockpart-infra started").start()
    port = free_port()
    proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                   "--redis", redis.url, ready="dockpart-proxy listening on").start()
    base = f"http://127.0.0.1:{port}"
    client = redis.client()
    rows = []
    try:
        for count in args.instances:
            name = f"bench{count}"
            dockpart(redis.url, "create", name, "--scale", "0", "--apps-dir", str(tmp / "apps"))
            remote = str(tmp / "apps" / f"{name}.git")
            work = tmp / name
            work.mkdir()
            shutil.copy(HELLO / "app.py", work / "app.py")
            write_version(work, "v0", docker)
            git(work, "init", "-q", "-b", "main")
            git(work, "add", "-A")
            timed_push(work, remote, client, name, "v0", 0, docker)
            dockpart(redis.url, "scale", name, str(count))
            deadline = time.monotonic() + 60
            while not everywhere(client, name, "v0", count) and time.monotonic() < deadline:
                time.sleep(0.05)
            for i in range(1, args.pushes + 1):
                loop = Loop(base, f"{name}.localhost")
                loop.start()
                returned, served = timed_push(work, remote, client, name, f"v{i}", count,
                                              docker)
                loop.stop()
                rows.append((count, returned, served, loop.ok, loop.failed))
                print(f"{count} instance(s), push {i}: returned {returned:.2f} s, v{i} serving "
                      f"everywhere after {served:.2f} s; {loop.ok} requests answered, "
                      f"{loop.failed} failed", flush=True)
    finally:
        proxy.stop()
        infra.stop()
        for app_dir in (state / "apps").glob("*"):
            stop_managed(app_dir)
        if registry is not None:
            import docker as docker_sdk
            engine = docker_sdk.from_env()
            names = [f"bench{count}" for count in args.instances]
            for name in names:  # the containers first: the apps' images may be one image
                for c in engine.containers.list(all=True, filters={
                        "label": f"dockpart.redis=redis://127.0.0.1:{redis.port}/0 app {name}"}):
                    c.remove(force=True)
            for name in names:
                for image in engine.images.list(name=f"localhost:{registry.port}/{name}"):
                    try:
                        engine.images.remove(image.id, force=True)
                    except docker_sdk.errors.APIError:
                        pass  # removed with the other app's already
            registry.stop()
        redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndriver {args.driver}")
    print("instances  push returned (median s)  serving everywhere (median s)  failed/answered")
    for count in args.instances:
        mine = [r for r in rows if r[0] == count]
        print(f"{count:>9}  {statistics.median(r[1] for r in mine):>24.2f}  "
              f"{statistics.median(r[2] for r in mine):>29.2f}  "
              f"{sum(r[4] for r in mine)}/{sum(r[3] for r in mine)}")


if __name__ == "__main__":
    main()
