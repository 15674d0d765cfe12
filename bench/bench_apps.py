"""N apps under load through one dockpart-proxy, and what routing by Host costs, in one run.

Starts a redis-server, fast canned-response backends (two per app, two for the seed list),
the apps' records with their instances listed (``dockpart apps`` records, no infra: this
measures the proxy) and one dockpart-proxy.  Then:

1. every app at once, each driven by its own ``wrk -t1 -cC -dDs -H 'Host: NAME.localhost'``:
   requests/s and p95 per app;
2. the cost of routing by Host: in rounds that take turns, one app's Host against a Host that
   goes to the seed's single list (same proxy, same number of backends); the median ratio
   of requests/s (1.0: routing by Host costs nothing).

    python bench/bench_apps.py [--apps 3] [--duration 5] [--connections 20] [--rounds 3]

Needs redis-server and wrk.  Everything listens on 127.0.0.1 and stops at the end.  The load
generators share the machine's cores with the proxy: compare the ratio, not absolute figures.
"""

import argparse
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from bench_load_publish import serve  # noqa: E402
from helpers import Daemon, RedisProcess, free_port, port_open, wait_for  # noqa: E402

from dockpart import apps, keys  # noqa: E402
from dockpart.deploy.front import Scripts  # noqa: E402

#: wrk prints p50/75/90/99 with --latency; p95 comes from its Lua hook (microseconds).
P95_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format("p95_us %d\\n", latency:percentile(95)))
end
"""


def wrk(url: str, host: str, duration: int, connections: int, script: str) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", script,
                          "-H", f"Host: {host}", url],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p95 = re.search(r"p95_us (\d+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)) if rps else 0.0,
            "p95_ms": int(p95.group(1)) / 1000 if p95 else float("nan"),
            "non2xx": int(errors.group(1)) if errors else 0}


def backend() -> tuple:
    port = free_port()
    proc = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    proc.start()
    wait_for(lambda: port_open(port), 10, what="a backend")
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--apps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    redis = RedisProcess().start()
    client = redis.client()
    procs, proxy = [], None
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(P95_SCRIPT)
    try:
        names = [f"app{i}" for i in range(1, args.apps + 1)]
        for name in names:
            two = [backend(), backend()]
            procs += [p for p, _ in two]
            apps.create(Scripts(client), apps.App(name, command="(bench)", desired=2))
            client.rpush(keys.app_tier(name).servers, *[url for _, url in two])
        seed = [backend(), backend()]
        procs += [p for p, _ in seed]
        client.rpush(keys.SERVERS, *[url for _, url in seed])
        port = free_port()
        proxy = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                       "--redis", redis.url, ready="dockpart-proxy listening on").start()
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: wrk(url, f"{names[-1]}.localhost", 1, 1, str(script))["rps"] > 0
                 and client.zcard(keys.LOAD_PROXIES) >= args.apps, 10, what="apps routed")

        print(f"1. {args.apps} apps at once, wrk -t1 -c{args.connections} -d{args.duration}s "
              f"each, one proxy")
        print(f"{'app':<8} {'requests/s':>10} {'p95 ms':>7} {'non-2xx':>7}")
        with ThreadPoolExecutor(len(names)) as pool:
            runs = {name: pool.submit(wrk, url, f"{name}.localhost", args.duration,
                                      args.connections, str(script)) for name in names}
            for name, run in runs.items():
                r = run.result()
                print(f"{name:<8} {r['rps']:>10.0f} {r['p95_ms']:>7.2f} {r['non2xx']:>7}")

        results: dict[str, list] = {"by Host (app1)": [], "single list (seed)": []}
        for _ in range(args.rounds):
            results["by Host (app1)"].append(
                wrk(url, f"{names[0]}.localhost", args.duration, args.connections, str(script)))
            results["single list (seed)"].append(
                wrk(url, "127.0.0.1", args.duration, args.connections, str(script)))
        print(f"\n2. routing by Host against the seed's single list, {args.rounds} rounds "
              f"taking turns; medians")
        print(f"{'route':<20} {'requests/s':>10} {'p95 ms':>7}  rounds")
        for name, runs_ in results.items():
            print(f"{name:<20} {statistics.median(r['rps'] for r in runs_):>10.0f} "
                  f"{statistics.median(r['p95_ms'] for r in runs_):>7.2f}  "
                  + " ".join(f"{r['rps']:.0f}" for r in runs_))
        ratios = [a["rps"] / b["rps"] for a, b in zip(*results.values()) if b["rps"]]
        print(f"by Host / single list, per round: {' '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
    finally:
        if proxy is not None:
            proxy.stop()
        for proc in procs:
            proc.terminate()
        redis.stop()
        script.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
