"""The autoscaler under a load ramp: instances follow the load up, then back to the minimum.

Starts its own redis-server, the first dockpart-web, dockpart-proxy and dockpart-infra with
``--autoscale`` (process driver, or ``--driver docker`` with an image of this tree's dockpart-web, built
from the wheelhouse of ``scripts/images wheels`` on ``$BASE_IMAGE``), then
drives a closed-loop load through the proxy on ``/work?ms=50``: the clients grow from 2 to 64
over the ramp, hold, then stop.  Every second it samples the live instances, the requests in
flight per instance (from the proxies' published reports, what the autoscaler reads), the
clients' p95 latency and the failed requests; it prints the timeline and the targets' figures,
and writes a PNG plot (with matplotlib, if installed).

    python bench/bench_autoscale.py [--driver process|docker] [--ramp 60] [--hold 30]
        [--window 30] [--target 8] [--max 10] [--png docs/autoscale.png]

Needs redis-server (and the Docker engine and images for --driver docker).  Everything
listens on 127.0.0.1; what it starts is stopped at the end.
"""

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from dockpart import keys, load  # noqa: E402
from dockpart.records import read_load_reports as read_reports  # noqa: E402
from helpers import (Daemon, RedisProcess, SyncRedis, free_port, kill_instances,  # noqa: E402
                     port_block, wait_for)

WORK_MS = 50
#: --driver docker: an image of this tree's dockpart-web, built for the run and removed after.
IMAGE = "dockpart-web:bench-autoscale"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "dockpart-base:bookworm")


class Client:
    """Closed-loop HTTP/1.1 keep-alive client: one request in flight at all times."""

    def __init__(self, port: int, stats):
        self.port = port
        self.stats = stats
        self.stopping = False
        self.request = (f"GET /work?ms={WORK_MS} HTTP/1.1\r\nHost: bench\r\n\r\n").encode()

    async def run(self):
        reader = writer = None
        while not self.stopping:
            began = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(self.request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                status = int(head.split(b" ", 2)[1])
                length = 0
                close = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                    elif name.strip().lower() == b"connection" and b"close" in value.lower():
                        close = True
                await reader.readexactly(length)
                self.stats.done(time.monotonic() - began, status == 200)
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError,
                    IndexError) as e:
                self.stats.done(time.monotonic() - began, False, repr(e))
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
        if writer is not None:
            writer.close()


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.failed = 0
        self.ok = 0
        self.errors: list[str] = []

    def done(self, seconds: float, good: bool, error: str = "") -> None:
        if good:
            self.ok += 1
            self.latencies.append(seconds)
        else:
            self.failed += 1
            if error and len(self.errors) < 5:
                self.errors.append(error)

    def take(self) -> list[float]:
        taken, self.latencies = self.latencies, []
        return taken


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


async def drive(args, proxy_port: int, db) -> tuple[list[dict], Stats, float, float]:
    stats = Stats()
    clients: list[tuple[Client, asyncio.Task]] = []
    samples = []
    began = time.monotonic()
    stop_at = began + args.ramp + args.hold
    load_stopped = None
    deadline = stop_at + args.window + args.drain_slack
    while time.monotonic() < deadline:
        now = time.monotonic() - began
        if time.monotonic() < stop_at:
            wanted = min(64, 2 + int(62 * min(now, args.ramp) / args.ramp))
        else:
            wanted = 0
            if load_stopped is None:
                load_stopped = round(now)
        while len(clients) < wanted:
            client = Client(proxy_port, stats)
            clients.append((client, asyncio.ensure_future(client.run())))
        if len(clients) > wanted:
            leaving, clients = clients[wanted:], clients[:wanted]
            for client, _ in leaving:
                client.stopping = True
            await asyncio.gather(*(task for _, task in leaving))  # requests in flight finish
        await asyncio.sleep(1 - (time.monotonic() - began) % 1)
        live = db.llen(keys.SERVERS)
        spawning = db.llen(keys.SPAWN_QUEUE) + db.llen(keys.SPAWNING)
        merged = load.merge(await read_reports(SyncRedis(db), time.time()))
        inflight = sum(f["inflight"] for f in merged.values())
        desired = db.get(keys.AUTOSCALE_DESIRED)
        latencies = stats.take()
        samples.append({"t": round(time.monotonic() - began), "clients": len(clients),
                        "live": live, "spawning": spawning,
                        "desired": int(desired) if desired else None,
                        "per_instance": inflight / live if live else None,
                        "p95_ms": 1000 * p95(latencies) if latencies else None,
                        "done": len(latencies), "failed": stats.failed})
        if load_stopped is not None and live == 1 and not spawning \
                and not db.llen(keys.DESTROYING) and not db.llen(keys.DESTROY_QUEUE):
            break
    return samples, stats, load_stopped, began


def build_image() -> None:
    """This tree's dockpart-web, from the wheelhouse ``scripts/images wheels`` fills."""
    subprocess.run(["docker", "build", "-q", "-f", "Dockerfiles/web.Dockerfile", "--build-arg",
                    f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE, "."], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DOCKER_BUILDKIT": "0"})


def remove_docker(first: int, count: int) -> None:
    from dockpart.drivers import instance_name
    names = [instance_name(port) for port in range(first + 1, first + count + 2)]
    subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
    subprocess.run(["docker", "rmi", IMAGE], capture_output=True)


def plot(samples: list[dict], args, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.step(t, [s["live"] for s in samples], where="post", label="live instances", lw=2)
    top.step(t, [s["desired"] for s in samples], where="post", label="desired", ls="--")
    top.set_ylabel("instances")
    load_axis = top.twinx()
    load_axis.plot(t, [s["clients"] for s in samples], color="tab:gray", label="clients")
    load_axis.plot(t, [s["per_instance"] for s in samples], color="tab:red",
                   label="in flight per instance")
    load_axis.axhline(args.target, color="tab:red", ls=":", lw=1, label="target")
    load_axis.set_ylabel("requests in flight")
    lines = top.get_legend_handles_labels()
    more = load_axis.get_legend_handles_labels()
    top.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    bottom.plot(t, [s["p95_ms"] for s in samples], label="p95 latency (ms)")
    bottom.set_ylabel(f"p95 of /work?ms={WORK_MS} (ms)")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(bottom=0)
    top.set_title(f"dockpart autoscaling ({args.driver} driver, target {args.target:g} in flight "
                  f"per instance, scale-down window {args.window:g} s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--driver", choices=("process", "docker"), default="process")
    parser.add_argument("--ramp", type=float, default=60.0)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=30.0, help="--scale-down-window")
    parser.add_argument("--target", type=float, default=8.0, help="--target-inflight")
    parser.add_argument("--max", type=int, default=10, help="--max-instances")
    parser.add_argument("--drain", type=float, default=2.0)
    parser.add_argument("--drain-slack", type=float, default=30.0)
    parser.add_argument("--every", type=int, default=1, help="print every Nth second's row")
    parser.add_argument("--png", default=str(ROOT / "docs" / "autoscale.png"))
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("needs redis-server")
    state = Path(tempfile.mkdtemp(prefix="bench-autoscale-")) / "state"
    redis = RedisProcess().start()
    daemons: list[Daemon] = []
    first = port_block(args.max + 2)
    try:
        db = redis.client()
        proxy_port = free_port()
        for plugin, *options in (
                ("dockpart-web", "--listen", f"tcp:{first}:interface=127.0.0.1",
                 "--first-port", str(first), "--max-instances", str(args.max)),
                # Every simulated client is 127.0.0.1: count them all as load.
                ("dockpart-proxy", "--listen", f"tcp:{proxy_port}:interface=127.0.0.1",
                 "--load-per-client", "0")):
            daemons.append(Daemon(plugin, *options, "--redis", redis.url,
                                  ready="listening on").start(60))
        driver = ["--driver", "process", "--state-dir", str(state)]
        if args.driver == "docker":
            build_image()
            driver = ["--driver", "docker", "--image", IMAGE, "--stop-timeout", "2"]
        infra = Daemon(
            "dockpart-infra", *driver, "--redis", redis.url, "--first-port", str(first),
            "--port-range", f"{first + 1}-{first + args.max + 1}", "--drain", str(args.drain),
            "--autoscale", "--max-instances", str(args.max), "--target-inflight", str(args.target),
            "--evaluate-interval", "1", "--scale-up-cooldown", "3",
            "--scale-down-window", str(args.window), ready="dockpart-infra started")
        daemons.append(infra.start(60))
        wait_for(lambda: db.llen(keys.SERVERS) == 1, 20, what="the first instance in servers")
        samples, stats, stopped, began = asyncio.run(drive(args, proxy_port, db))
        decisions = [json.loads(r) for r in db.lrange(keys.AUTOSCALE_DECISIONS, 0, -1)][::-1]
        report(samples, stats, stopped, decisions, args, began)
        if plot(samples, args, Path(args.png)):
            print(f"plot: {args.png}")
        print(f"infra's log: {infra.log_path}")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        redis.stop()
        if args.driver == "docker":
            remove_docker(first, args.max)
        else:  # instances outlive the infra by design
            kill_instances(state)


def report(samples, stats, stopped, decisions, args, began):
    print(f"{'t':>4} {'clients':>7} {'live':>4} {'spawn':>5} {'desired':>7} {'inflight/inst':>13} "
          f"{'p95 ms':>7} {'done/s':>6} {'failed':>6}")
    for s in samples[args.every - 1::args.every]:
        per = f"{s['per_instance']:.1f}" if s["per_instance"] is not None else "-"
        p = f"{s['p95_ms']:.0f}" if s["p95_ms"] is not None else "-"
        print(f"{s['t']:>4} {s['clients']:>7} {s['live']:>4} {s['spawning']:>5} "
              f"{s['desired'] if s['desired'] is not None else '-':>7} {per:>13} {p:>7} "
              f"{s['done']:>6} {s['failed']:>6}")
    crossing = next((s["t"] for s in samples if s["per_instance"] is not None
                     and s["per_instance"] > args.target * 1.1), None)
    first_up = next((s["t"] for s in samples if s["spawning"] or s["live"] > 1), None)
    unloaded = [s["p95_ms"] for s in samples[:5] if s["p95_ms"]]
    hold = [s["p95_ms"] for s in samples
            if args.ramp + 5 <= s["t"] <= args.ramp + args.hold and s["p95_ms"]]
    back = next((s["t"] for s in samples if stopped is not None and s["t"] > stopped
                 and s["live"] == 1 and not s["spawning"]), None)
    print()
    print(f"load crossed the target (>{args.target * 1.1:g} in flight per instance) at "
          f"t={crossing} s; first spawn seen at t={first_up} s"
          + (f" ({first_up - crossing} s later)" if crossing is not None and first_up else ""))
    if unloaded and hold:
        print(f"p95 unloaded {min(unloaded):.0f} ms; while held: median {sorted(hold)[len(hold) // 2]:.0f}"
              f" ms, worst {max(hold):.0f} ms (target: within 2x, {2 * min(unloaded):.0f} ms)")
    print(f"most instances: {max(s['live'] for s in samples)} (max {args.max})")
    print(f"requests: {stats.ok} ok, {stats.failed} failed" +
          (f" (e.g. {stats.errors})" if stats.errors else ""))
    print(f"load stopped at t={stopped} s; back at the minimum at t={back} s"
          + (f" ({back - stopped:g} s later; window {args.window:g} s + drain {args.drain:g} s)"
             if back is not None and stopped is not None else " (not within the run)"))
    print("decisions:")
    for d in decisions:
        print(f"  {d['time'] - time.time() + time.monotonic() - began:6.1f} s  {d['action']:<5} "
              f"{d['reason']}")


if __name__ == "__main__":
    main()
