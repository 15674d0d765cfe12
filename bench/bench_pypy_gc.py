"""dockpart-proxy on PyPy with different GC settings (``PYPY_GC_*``), in one run.

The nursery is where PyPy's GC allocates new objects; each time it fills, a minor collection
runs, and what survives moves to the old generation, which major collections walk.  A proxy
allocates a few objects per request, so the nursery's size sets how often that happens.  A
major collection marks the old generation in steps between minor ones; the increment step
(``PYPY_GC_INCREMENT_STEP``) sets how much each step marks, so how long it stalls requests.
Each setting is a nursery size (``default`` is PyPy's own), optionally with more settings
after ``+`` (``16M+INCREMENT_STEP=1M``); whatever a setting leaves out is PyPy's default.
Starts a redis-server, three nginx backends and one ``--workers 1`` PyPy proxy per setting
(``.venv-pypy``), warms each up, then drives each with ``wrk -t1 -c50`` in rounds that take
turns, and prints each one's p99 per round, median requests/s, CPU time per request and
resident memory at the end.

    python bench/bench_pypy_gc.py [--sizes default,16M,16M+INCREMENT_STEP=1M,32M]
                                  [--duration 4] [--rounds 4]

Needs redis-server, nginx and wrk.  Everything listens on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_proxy import dockpart, listed_backends, measured, stop_all, wrk  # noqa: E402
from bench_web import rss_mib  # noqa: E402
from helpers import RedisProcess, free_port, shipped_pypy_gc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="default,16M,16M+INCREMENT_STEP=1M,32M")
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--pypy", default=str(ROOT / ".venv-pypy"))
    args = parser.parse_args()
    twistd = str(Path(args.pypy) / "bin" / "twistd")
    stack: list = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        backends, _ = listed_backends(redis, stack)
        rows = {}
        for size in args.sizes.split(","):
            nursery, *more = size.split("+")
            env = {name: "" for name in shipped_pypy_gc()}  # "": PyPy's own
            env.update(("PYPY_GC_" + k, v) for k, _, v in (m.partition("=") for m in more))
            env["PYPY_GC_NURSERY"] = "" if nursery == "default" else nursery
            port = free_port()
            rows[size] = (port, dockpart(1, port, redis.url, stack, twistd=twistd, env=env))
        for port, _ in rows.values():
            wrk(f"http://127.0.0.1:{port}/", args.warmup, 50)
        runs: dict[str, list] = {size: [] for size in rows}
        for i in range(args.rounds):  # every other round backwards: no row always goes first
            for size, (port, pid) in list(rows.items())[::1 if i % 2 == 0 else -1]:
                runs[size].append(measured(f"http://127.0.0.1:{port}/", pid, args.duration, 50))
        print(f"dockpart-proxy on PyPy, wrk -t1 -c50 -d{args.duration}s, {args.rounds} rounds")
        print(f"{'PYPY_GC_NURSERY+':24} {'p99 ms per round':28} {'req/s':>7} {'CPU us/req':>10} "
              f"{'RSS MiB':>8}")
        for size, rs in runs.items():
            p99s = ", ".join(f"{r['p99']:.1f}" for r in rs)
            print(f"{size:24} {p99s:28} "
                  f"{statistics.median(r['rps'] for r in rs):7.0f} "
                  f"{statistics.median(r['cpu_us'] for r in rs):10.1f} "
                  f"{rss_mib(rows[size][1]):8.0f}")
    finally:
        stop_all(stack)


if __name__ == "__main__":
    main()
