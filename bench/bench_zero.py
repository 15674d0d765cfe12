"""Scale to zero: first responses from zero, a burst at zero, and the memory going to zero frees.

Starts a redis-server, dockpart-infra (``--driver process`` by default) and one
dockpart-proxy, and an app autoscaled ``--min 0 --scale-to-zero-after IDLE`` running
examples/hello (``--driver docker --image IMAGE`` runs an image instead).  Then:

1. ``--activations`` times: wait until the app is at zero (no instance, no process), send one
   request and time its response: p50, p95, max of the first response from zero (goals:
   p95 <= 1.5 s with the process driver, <= 2 s with the docker driver), failures counted;
2. a burst of ``--burst`` concurrent requests at zero: every answer's status, the latencies,
   and the most instances the app had for the held load;
3. back to zero after the idle window: the RSS of the app's instances and of the tier's
   daemons (infra, proxy) at the burst's peak and at zero.

    python bench/bench_zero.py [--activations 20] [--burst 50] [--idle 2] [--json OUT]
    python bench/bench_zero.py --driver docker --build dockpart-base:bookworm

With matplotlib in the virtualenv, ``--plot FILE`` draws the first-response times (one bar
per activation) and the burst's latencies; without it the plot is skipped, and said so.
Everything listens on 127.0.0.1 and stops at the end.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from dashboardkit import managed, stop_managed  # noqa: E402
from helpers import Daemon, RedisProcess, free_port, port_block, wait_for  # noqa: E402

from dockpart import keys  # noqa: E402
from dockpart.deploy.cli import main as dockpart  # noqa: E402

HELLO = ROOT / "examples" / "hello" / "app.py"
PORTS = 16


def rss_kib(pids) -> int:
    """Resident memory of these processes (KiB), from /proc."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Bench:
    def __init__(self, args):
        self.args = args
        self.redis = RedisProcess().start()
        self.client = self.redis.client()
        self.state = Path(tempfile.mkdtemp(prefix="bench-zero-"))
        low = port_block(PORTS)
        self.infra = Daemon("dockpart-infra", "--driver", args.driver, "--redis", self.redis.url,
                            "--state-dir", str(self.state), "--first-port", str(free_port()),
                            "--app-ports", f"{low}-{low + PORTS - 1}", "--drain", "0.5",
                            "--evaluate-interval", "0.5", "--spawn-timeout", "30",
                            ready="dockpart-infra started").start()
        port, self.admin = free_port(), free_port()
        self.proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                            "--redis", self.redis.url, "--hold-timeout", "30",
                            "--admin", f"tcp:{self.admin}:interface=127.0.0.1",
                            ready="dockpart-proxy listening on").start()
        self.base = f"http://127.0.0.1:{port}/"
        run = (["--image", args.image] if args.driver != "process"
               else ["--command", f"{sys.executable} {HELLO} zero"])
        assert dockpart(["apps", "create", "zero", *run, "--scale", "0", "--redis",
                         self.redis.url, "--apps-dir", str(self.state / "repos")]) == 0
        assert dockpart(["apps", "autoscale", "zero", "--min", "0", "--max", str(args.max),
                         "--target", str(args.target), "--scale-to-zero-after", str(args.idle),
                         "--redis", self.redis.url]) == 0
        wait_for(lambda: (self.hold() or {}).get("activates"), 10,
                 what="the proxy to hold the app's requests")

    def hold(self) -> dict | None:
        """The proxy's view of the app's hold queue (its admin listener)."""
        app = requests.get(f"http://127.0.0.1:{self.admin}/", timeout=5).json()["apps"].get("zero")
        return app["hold"] if app else None

    def get(self) -> tuple[int, float]:
        began = time.monotonic()
        try:
            status = requests.get(self.base, headers={"Host": "zero.localhost"},
                                  timeout=40).status_code
        except requests.RequestException:
            status = 0
        return status, time.monotonic() - began

    def instances(self) -> list[str]:
        return self.client.lrange(keys.app_tier("zero").servers, 0, -1)

    def pids(self) -> list[int]:
        """The app's processes (the process driver's), or its containers' main processes."""
        if self.args.driver == "process":
            return [pid for pids in managed(self.state / "apps" / "zero").values()
                    for pid in pids]
        import docker
        from dockpart.drivers.docker import LABEL_TIER
        label = f"{LABEL_TIER}=redis://127.0.0.1:{self.redis.port}/0 app zero"
        return [c.attrs["State"]["Pid"] for c in docker.from_env().containers.list(
            filters={"label": label}) if c.attrs["State"].get("Pid")]

    def at_zero(self) -> bool:
        return not self.instances() and not self.pids() and \
            self.client.hget(keys.app_record("zero"), "desired") == "0"

    def wait_zero(self) -> float:
        began = time.monotonic()
        wait_for(self.at_zero, self.args.idle + 90, what="the app at zero")
        return time.monotonic() - began

    def daemons_rss(self) -> int:
        return rss_kib([self.infra.proc.pid, self.proxy.proc.pid])

    def activations(self) -> dict:
        times, failed = [], 0
        for i in range(self.args.activations):
            self.wait_zero()
            status, seconds = self.get()
            failed += status != 200
            times.append(seconds)
            print(f"  activation {i + 1}: {status} in {seconds:.3f} s", flush=True)
        return {"count": len(times), "failed": failed, "times": [round(t, 4) for t in times],
                # As the proxy measured it: first request held -> first instance listed.
                "proxy_seen": (self.hold() or {}).get("activation_recent"),
                "p50": round(statistics.median(times), 4),
                "p95": round(percentile(times, 0.95), 4), "max": round(max(times), 4)}

    def burst(self) -> dict:
        self.wait_zero()
        peak = {"instances": 0, "app_rss_kib": 0, "daemons_rss_kib": self.daemons_rss()}
        done = [False]

        def watch():
            """The most instances, and the most memory, the app had for the burst."""
            while not done[0]:
                peak["instances"] = max(peak["instances"], len(self.instances()))
                if rss_kib(self.pids()) > peak["app_rss_kib"]:
                    peak.update(app_rss_kib=rss_kib(self.pids()),
                                daemons_rss_kib=self.daemons_rss())
                time.sleep(0.1)
        with ThreadPoolExecutor(self.args.burst + 1) as pool:
            watcher = pool.submit(watch)
            answers = list(pool.map(lambda _: self.get(), range(self.args.burst)))
            # Instances asked for the held load may still be starting: watch them come.
            time.sleep(self.args.idle / 2)
            done[0] = True
            watcher.result()
        took = self.wait_zero()
        zero = {"app_rss_kib": rss_kib(self.pids()), "daemons_rss_kib": self.daemons_rss()}
        latencies = [s for _, s in answers]
        activated = (self.hold() or {}).get("activation_recent", [None])[-1]
        return {"requests": len(answers), "ok": sum(1 for c, _ in answers if c == 200),
                "failed": sum(1 for c, _ in answers if c != 200),
                "p50": round(statistics.median(latencies), 4),
                "p95": round(percentile(latencies, 0.95), 4), "max": round(max(latencies), 4),
                "activation": activated,
                "most_instances": peak["instances"], "latencies": [round(s, 4) for s in latencies],
                "peak": peak, "at_zero": zero, "seconds_to_zero": round(took, 2),
                "freed_kib": peak["app_rss_kib"] + peak["daemons_rss_kib"]
                - zero["app_rss_kib"] - zero["daemons_rss_kib"]}

    def stop(self):
        self.proxy.stop()
        self.infra.stop()
        stop_managed(self.state / "apps" / "zero")
        self.redis.stop()


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed in this virtualenv: no plot written to {path}")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    times = result["activations"]["times"]
    left.bar(range(1, len(times) + 1), times)
    left.axhline(result["goal"], color="red", linestyle="--", label=f"goal p95 {result['goal']} s")
    left.set(xlabel="activation", ylabel="first response from zero (s)",
             title=f"{result['driver']} driver: p50 {result['activations']['p50']} s, "
                   f"p95 {result['activations']['p95']} s")
    left.legend()
    right.hist(result["burst"]["latencies"], bins=20)
    right.set(xlabel="response time (s)", ylabel="requests",
              title=f"burst of {result['burst']['requests']} at zero "
                    f"({result['burst']['failed']} failed)")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--activations", type=int, default=20)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--idle", type=float, default=2.0, help="--scale-to-zero-after")
    parser.add_argument("--max", type=int, default=8)
    parser.add_argument("--target", type=float, default=4.0)
    parser.add_argument("--driver", default="process", choices=("process", "docker"))
    parser.add_argument("--image", default="dockpart-hello:bench",
                        help="the app's image with --driver docker (examples/hello/Dockerfile)")
    parser.add_argument("--build", metavar="BASE_IMAGE",
                        help="first build --image from examples/hello on this base image")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="draw the figures here (PNG or SVG; needs matplotlib)")
    args = parser.parse_args()
    if args.build:
        import docker
        docker.from_env().images.build(path=str(ROOT / "examples" / "hello"), tag=args.image,
                                       rm=True, buildargs={"BASE_IMAGE": args.build},
                                       network_mode="host")
    bench = Bench(args)
    try:
        print(f"from zero, {args.activations} activations ({args.driver} driver):", flush=True)
        activations = bench.activations()
        print(f"burst of {args.burst} at zero:", flush=True)
        burst = bench.burst()
    finally:
        bench.stop()
    goal = 1.5 if args.driver == "process" else 2.0
    result = {"driver": args.driver, "cpus": os.cpu_count(), "goal": goal,
              "activations": activations, "burst": burst}
    a, b = activations, burst
    print(f"first response from zero: p50 {a['p50']:.3f} s, p95 {a['p95']:.3f} s, "
          f"max {a['max']:.3f} s over {a['count']} ({a['failed']} failed; goal p95 <= {goal} s: "
          f"{'met' if a['p95'] <= goal else 'MISSED'})")
    print(f"burst of {b['requests']}: {b['ok']} answered, {b['failed']} failed; p50 {b['p50']:.3f}"
          f" s, p95 {b['p95']:.3f} s, max {b['max']:.3f} s; its activation {b['activation']} s; "
          f"up to {b['most_instances']} instances")
    print(f"back to zero {b['seconds_to_zero']} s after the burst (idle window {args.idle:g} s): "
          f"app RSS {b['peak']['app_rss_kib'] / 1024:.1f} MiB -> "
          f"{b['at_zero']['app_rss_kib'] / 1024:.1f} MiB; infra+proxy "
          f"{b['peak']['daemons_rss_kib'] / 1024:.1f} -> "
          f"{b['at_zero']['daemons_rss_kib'] / 1024:.1f} MiB; freed {b['freed_kib'] / 1024:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
