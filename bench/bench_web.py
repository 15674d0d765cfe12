"""dockpart-web's ``GET /`` (it records the visit in Redis, as the seed's middleware does), on
CPython and on PyPy, in one run.

Starts a redis-server and dockpart-web processes, with and without ``--no-access-log``,
on each interpreter, then drives each with ``wrk -t1 -cC -dDs --latency`` in rounds that take
turns, and prints the median requests/s, p50, p99, the process's CPU time per request (user +
system, the figure to compare on a busy machine) and each process's resident memory at the end.

The CPython rows run dockpart as ``pip install`` leaves it, from the virtualenv ``.venv-web``
(made on first use: ``pip install -e .``, no test extras); one more row runs it from the test
virtualenv ``.venv``, where treq's ``twisted[tls]`` put pyOpenSSL, which Twisted then loads
into every process (memory).  PyPy runs from the virtualenv ``scripts/test --pypy`` makes,
``.venv-pypy``; its JIT is warmed up first.

    python bench/bench_web.py [--duration 5] [--rounds 3] [--concurrency 20] [--warmup 10]
                              [--pypy .venv-pypy | --pypy ''] [--no-express] [--no-test-venv]

The reference beside them is the seed's ``GET /`` in Express 4 with node-redis 4
(``bench/seed_express``: the visit pushed and the list trimmed, not waited for, as ours), run by
``node``; ``npm install`` puts its packages there on first use.

Needs redis-server and wrk (Debian packages).  Everything listens on 127.0.0.1 and stops at
the end.  The load generator shares the machine's cores: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_proxy import measured, stop_all, wrk  # noqa: E402
from helpers import BIN, Daemon, RedisProcess, free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


EXPRESS = ROOT / "bench" / "seed_express"
INSTALLED = ROOT / ".venv-web"


def installed_twistd() -> str:
    """The twistd of a virtualenv holding dockpart and its dependencies only, as ``pip install``
    leaves them (made on first use, editable: it runs this checkout)."""
    stamp = INSTALLED / ".dockpart-installed"
    if not stamp.exists() or (ROOT / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "venv", str(INSTALLED)], check=True)
        # compat mode: twistd only finds twisted/plugins of a flat layout this way.
        subprocess.run([str(INSTALLED / "bin" / "pip"), "install", "-q", "-e", str(ROOT),
                        "--config-settings", "editable_mode=compat"], check=True)
        stamp.touch()
    return str(INSTALLED / "bin" / "twistd")


def seed_express(port: int, redis_url: str, stack: list) -> int:
    """The seed's ``GET /`` in Express (``bench/seed_express``, its packages installed by npm
    on first use), the issue's reference; its pid."""
    if not (EXPRESS / "node_modules").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--no-package-lock",
                        "--loglevel=error"], cwd=EXPRESS, check=True)
    proc = subprocess.Popen(["node", "app.js", str(port), redis_url], cwd=EXPRESS,
                            stdout=subprocess.PIPE, start_new_session=True)
    stack.append(lambda: (proc.terminate(), proc.wait(10)))
    line = proc.stdout.readline() if proc.stdout else b""
    assert line.startswith(b"seed express listening"), f"the Express app did not start: {line!r}"
    return proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pypy", default=str(ROOT / ".venv-pypy"),
                        help="the PyPy virtualenv for the PyPy rows ('' for none; left out "
                        "when missing)")
    parser.add_argument("--express", action=argparse.BooleanOptionalAction,
                        default=shutil.which("node") is not None,
                        help="the seed's Express app beside (needs node and npm)")
    parser.add_argument("--test-venv", action=argparse.BooleanOptionalAction, default=True,
                        help="a row from the test virtualenv (pyOpenSSL loaded) beside")
    args = parser.parse_args()
    twistds = {"CPython": installed_twistd()}
    if args.pypy and (Path(args.pypy) / "bin" / "twistd").exists():
        twistds["PyPy"] = str(Path(args.pypy) / "bin" / "twistd")
    variants = {f"{name}{label}": (twistd, flags) for name, twistd in twistds.items()
                for label, flags in (("", ()), (", no log", ("--no-access-log",)))}
    if args.test_venv:
        variants["CPython, .venv"] = (str(BIN / "twistd"), ())
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
            rows[name] = (port, web.proc.pid)
        if args.express:
            port = free_port()
            rows["Express (seed)"] = (port, seed_express(port, redis.url, stack))
        for name, (port, _) in rows.items():  # PyPy's JIT, and V8's, compile as they go
            wrk(f"http://127.0.0.1:{port}/", 1 if name.startswith("CPython") else args.warmup,
                args.concurrency)
        runs = {name: [] for name in rows}
        for i in range(args.rounds):  # every other round backwards: no row always goes first
            for name, (port, pid) in list(rows.items())[::1 if i % 2 == 0 else -1]:
                runs[name].append(measured(f"http://127.0.0.1:{port}/", pid,
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
                  f"{rss_mib(rows[name][1]):8.0f}  {sum(r['non2xx'] for r in rs)}")
    finally:
        stop_all(stack)


if __name__ == "__main__":
    main()
