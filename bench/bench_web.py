"""dockpart-web's ``GET /`` (it records the visit in Redis, as the seed's middleware does), on
CPython and on PyPy, in one run.

Starts a redis-server and dockpart-web processes, with and without ``--no-access-log``,
on each interpreter (PyPy from the
virtualenv ``scripts/test --pypy`` makes, ``.venv-pypy``; its JIT is warmed up first), then
drives each with ``wrk -t1 -cC -dDs --latency`` in rounds that take turns, and prints the
median requests/s, p50, p99, the process's CPU time per request (user + system, the figure
to compare on a busy machine) and each process's resident memory at the end.

    python bench/bench_web.py [--duration 5] [--rounds 3] [--concurrency 20] [--warmup 10]
                              [--pypy .venv-pypy | --pypy '']

Needs redis-server and wrk (Debian packages).  Everything listens on 127.0.0.1 and stops at
the end.  The load generator shares the machine's cores: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_proxy import stop_all, wrk  # noqa: E402
from helpers import BIN, Daemon, RedisProcess, free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has used (user + system): per request, a figure that a busy
    machine changes far less than requests/s."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(url: str, pid: int, duration: int, connections: int) -> dict:
    """One wrk run, with the CPU microseconds the process spent per request."""
    before = cpu_seconds(pid)
    run = wrk(url, duration, connections)
    run["cpu_us"] = (cpu_seconds(pid) - before) * 1e6 / max(1, run["requests"])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pypy", default=str(ROOT / ".venv-pypy"))
    args = parser.parse_args()
    twistds = {"CPython": str(BIN / "twistd")}
    if args.pypy:
        twistds["PyPy"] = str(Path(args.pypy) / "bin" / "twistd")
    variants = {f"{name}{label}": (twistd, flags) for name, twistd in twistds.items()
                for label, flags in (("", ()), (", no log", ("--no-access-log",)))}
    stack = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        rows = {}
        for name, (twistd, flags) in variants.items():
            port = free_port()
            web = Daemon("dockpart-web", "--redis", redis.url, "--listen",
                         f"tcp:{port}:interface=127.0.0.1", "--first-port", str(port), *flags,
                         twistd=twistd, ready="dockpart-web listening on").start()
            stack.append(web.stop)
            rows[name] = (port, web)
        for name, (port, _) in rows.items():
            wrk(f"http://127.0.0.1:{port}/", args.warmup if name.startswith("PyPy") else 1,
                args.concurrency)
        runs = {name: [] for name in rows}
        for i in range(args.rounds):  # every other round backwards: no row always goes first
            for name, (port, web) in list(rows.items())[::1 if i % 2 == 0 else -1]:
                runs[name].append(measured(f"http://127.0.0.1:{port}/", web.proc.pid,
                                           args.duration, args.concurrency))
        print(f"dockpart-web GET /, wrk -t1 -c{args.concurrency} -d{args.duration}s, medians of "
              f"{args.rounds} rounds taking turns; load average: {os.getloadavg()[0]:.1f}")
        print(f"{'':18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10} "
              f"{'RSS MiB':>8}  non-2xx")
        for name, rs in runs.items():
            print(f"{name:18} {statistics.median(r['rps'] for r in rs):8.0f} "
                  f"{statistics.median(r['p50'] for r in rs):8.2f} "
                  f"{statistics.median(r['p99'] for r in rs):8.2f} "
                  f"{statistics.median(r['cpu_us'] for r in rs):10.0f} "
                  f"{rss_mib(rows[name][1].proc.pid):8.0f}  {sum(r['non2xx'] for r in rs)}")
    finally:
        stop_all(stack)


if __name__ == "__main__":
    main()
