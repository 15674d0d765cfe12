"""What ten open dashboards cost the tier: dockpart-proxy's throughput with and without them.

Starts a redis-server, three canned-response backends in ``servers``, dockpart-proxy, and
dockpart-infra (process driver) with ``--dashboard``, plus a publisher of a load report a second
in the proxies' format (so the dashboard reads and merges figures as it would in production).
Then drives the proxy with ``wrk -t1 -cC -dDs`` in rounds that take turns: no dashboard open,
then ten dashboard clients polling at the page's rate (``/live`` and ``/api/history?since=``
once a second each, after loading the page and its assets once), and prints the median
requests/s of each, the change, and the share of one core dockpart-infra used meanwhile.

    python bench/bench_dashboard.py [--duration 5] [--connections 50] [--rounds 3] [--clients 10]

Needs redis-server and wrk.  Everything listens on 127.0.0.1 and stops at the end.
"""

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import secrets
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_load_publish import serve  # noqa: E402
from bench_proxy import cpu_times, stop_all, wrk  # noqa: E402
from helpers import Daemon, RedisProcess, free_port, port_open, wait_for  # noqa: E402

from dockpart import keys, load  # noqa: E402

POLL = 1.0  # the page's poll interval (dashboard.js)
TOKEN = secrets.token_urlsafe(16)  # the dashboard's, as scripts/up makes one


class Reports(threading.Thread):
    """One proxy's load report a second, in :mod:`dockpart.load`'s format, for the backends."""

    def __init__(self, redis: RedisProcess, urls: list[str]):
        super().__init__(daemon=True)
        self.client, self.urls, self.done = redis.client(), urls, threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            buckets = load.empty_buckets()
            buckets[load.bucket_of(0.002)] = 100
            report = {"proxy": "bench", "time": time.time(), "interval": 1.0, "list": keys.SERVERS,
                      "backends": {url: {"requests": 100, "errors": 0, "latency_sum": 0.2,
                                         "latency_buckets": buckets, "inflight": 1,
                                         "healthy": True} for url in self.urls}}
            self.client.set(keys.proxy_load("bench"), json.dumps(report), px=5000)
            self.client.zadd(keys.LOAD_PROXIES, {"bench": report["time"]})


class Viewer(threading.Thread):
    """One open dashboard: the page and its assets once, then the page's polls."""

    def __init__(self, base: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.stop, self.polls = base, stop, 0

    def run(self):
        with requests.Session() as s:
            s.post(self.base + "/login", data={"token": TOKEN}, timeout=5)  # as a person does
            for path in ("/", "/static/uPlot.iife.min.js", "/static/dashboard.js",
                         "/static/uPlot.min.css", "/static/dashboard.css"):
                s.get(self.base + path, timeout=5)
            since = 0.0
            while not self.stop.wait(POLL):
                s.get(self.base + "/live", timeout=5)
                chunk = s.get(f"{self.base}/api/history?since={since}", timeout=5).json()
                since = chunk["time"][-1] if chunk["time"] else since
                self.polls += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    assert shutil.which("wrk"), "wrk is not installed (apt-get install wrk)"

    stack = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        ports = [free_port() for _ in range(3)]
        for p in ports:
            proc = multiprocessing.Process(target=serve, args=(p,), daemon=True)
            proc.start()
            stack.append(proc.terminate)
        for p in ports:
            wait_for(lambda p=p: port_open(p), what=f"backend on {p}")
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        redis.client().rpush(keys.SERVERS, *urls)
        reports = Reports(redis, urls)
        reports.start()
        stack.append(reports.done.set)
        proxy_port, dash_port, first = free_port(), free_port(), free_port()
        proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{proxy_port}:interface=127.0.0.1",
                       "--redis", redis.url, ready="dockpart-proxy listening on").start()
        stack.append(proxy.stop)
        state = tempfile.mkdtemp(prefix="dockpart-bench-dash-")
        # The backends' ports are outside --port-range: infra leaves them alone.
        infra = Daemon("dockpart-infra", "--driver", "process", "--redis", redis.url,
                       "--state-dir", state, "--first-port", str(first),
                       "--port-range", f"{first}-{first}",
                       "--dashboard", f"tcp:{dash_port}:interface=127.0.0.1",
                       ready="dockpart-infra dashboard listening on",
                       env={"DOCKPART_DASHBOARD_TOKEN": TOKEN}).start()
        stack.append(infra.stop)
        base = f"http://127.0.0.1:{dash_port}"
        target = f"http://127.0.0.1:{proxy_port}/"
        wrk(target, 1, args.connections)  # warm up
        runs = {"no dashboard open": [], f"{args.clients} dashboards open": []}
        infra_cpu = {name: 0.0 for name in runs}
        polls = 0
        for _ in range(args.rounds):
            before = sum(cpu_times(infra.proc.pid))
            runs["no dashboard open"].append(wrk(target, args.duration, args.connections))
            infra_cpu["no dashboard open"] += sum(cpu_times(infra.proc.pid)) - before
            stop = threading.Event()
            viewers = [Viewer(base, stop) for _ in range(args.clients)]
            for v in viewers:
                v.start()
            time.sleep(POLL)  # every viewer has loaded its page
            before = sum(cpu_times(infra.proc.pid))
            runs[f"{args.clients} dashboards open"].append(
                wrk(target, args.duration, args.connections))
            infra_cpu[f"{args.clients} dashboards open"] += sum(cpu_times(infra.proc.pid)) - before
            stop.set()
            for v in viewers:
                v.join(10)
            polls += sum(v.polls for v in viewers)
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s through dockpart-proxy, medians "
              f"of {args.rounds} rounds; {polls} dashboard polls answered in the 'open' rounds")
        print(f"{'':24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'infra CPU':>10}")
        medians = {}
        for name, rs in runs.items():
            medians[name] = statistics.median(r["rps"] for r in rs)
            share = 100 * infra_cpu[name] / (args.rounds * args.duration)
            print(f"{name:24} {medians[name]:9.0f} {statistics.median(r['p50'] for r in rs):8.2f} "
                  f"{statistics.median(r['p99'] for r in rs):8.2f} {share:9.1f}%")
        without, with_ = medians.values()
        print(f"change with dashboards open: {100 * (with_ - without) / without:+.1f} %")
    finally:
        stop_all(stack)


if __name__ == "__main__":
    main()
