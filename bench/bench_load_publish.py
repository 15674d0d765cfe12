"""What publishing load reports costs dockpart-proxy: with and without, side by side.

Starts a redis-server, two fast canned-response backends, and two dockpart-proxy processes
on the same list: one as shipped (it publishes its load report every second) and one whose
publisher is replaced by an empty service.  Drives both at the same time, each with its own
``wrk -t1 -cC -dDs`` (so a busy moment of a shared machine hits both alike), in several
rounds, and prints the median requests/s and p99 of each and the per-round ratio.

    python bench/bench_load_publish.py [--duration 5] [--connections 50] [--rounds 5]

Needs redis-server and wrk.  Everything listens on 127.0.0.1 and stops at the end.
"""

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_proxy import wrk  # noqa: E402
from helpers import Daemon, RedisProcess, free_port, port_open, wait_for  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"

#: Runs twistd with dockpart-proxy's publisher replaced by a service that does nothing.
WITHOUT_PUBLISHER = (
    "import sys; import dockpart.proxy as proxy; "
    "from twisted.application.service import Service; "
    "proxy.LoadPublisher = lambda *args, **kw: Service(); "
    "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()")


def serve(port: int) -> None:
    async def handle(reader, writer):
        try:
            while True:
                if not await reader.readuntil(b"\r\n\r\n"):
                    break
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()
    asyncio.run(main())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--control", action="store_true",
                        help="both proxies as shipped (an A/A run: the noise of the machine)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    redis = RedisProcess().start()
    backends, proxies = [], {}
    try:
        for _ in range(2):
            port = free_port()
            proc = multiprocessing.Process(target=serve, args=(port,), daemon=True)
            proc.start()
            wait_for(lambda: port_open(port), 10, what="a backend")
            backends.append((proc, f"http://127.0.0.1:{port}"))
        redis.client().rpush("servers", *[url for _, url in backends])
        for name in ("with publisher", "without publisher"):
            port = free_port()
            daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                            "--redis", redis.url, ready="dockpart-proxy listening on")
            if name.startswith("without") and not args.control:
                daemon.argv = [sys.executable, "-c", WITHOUT_PUBLISHER, *daemon.argv[1:]]
            daemon.start()
            daemon.url = f"http://127.0.0.1:{port}/"
            proxies[name] = daemon
        publishing = 2 if args.control else 1
        wait_for(lambda: redis.client().zcard("dockpart:load:proxies") == publishing, 10,
                 what=f"{publishing} proxies publishing")
        results = {name: [] for name in proxies}
        with ThreadPoolExecutor(len(proxies)) as pool:
            for _ in range(args.rounds):
                runs = {name: pool.submit(wrk, daemon.url, args.duration, args.connections)
                        for name, daemon in proxies.items()}
                for name, run in runs.items():
                    results[name].append(run.result())
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s on both proxies at once, "
              f"{args.rounds} rounds; medians")
        print(f"{'dockpart-proxy':<20} {'requests/s':>10} {'p99 ms':>7} {'non-2xx':>7}  rounds")
        medians = {}
        for name, runs in results.items():
            medians[name] = statistics.median(r["rps"] for r in runs)
            print(f"{name:<20} {medians[name]:>10.0f} "
                  f"{statistics.median(r['p99'] for r in runs):>7.2f} "
                  f"{sum(r['non2xx'] for r in runs):>7}  "
                  + " ".join(f"{r['rps']:.0f}" for r in runs))
        ratios = [a["rps"] / b["rps"] for a, b in zip(results["with publisher"],
                                                        results["without publisher"])]
        print(f"with / without, per round: {' '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}")
    finally:
        for daemon in proxies.values():
            daemon.stop()
        for proc, _ in backends:
            proc.terminate()
        redis.stop()


if __name__ == "__main__":
    main()
