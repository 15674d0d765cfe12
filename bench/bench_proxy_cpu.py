"""The proxy's CPU time per request, ours against other checkouts, interleaved in one run.

Requests per second on a shared machine move with whatever else runs; the CPU time the proxy
process spends per request moves much less, since time spent waiting for a core is not counted.
This starts a redis-server, three fast backends (one nginx process with three ``return 200``
servers) and one ``dockpart-proxy --workers 1`` per target, then drives each target in turn with
``wrk -t1 -cC -dDs``, reading utime+stime of the proxy process from ``/proc/PID/stat`` before and
after, and divides by the requests wrk completed.  Rounds take turns in alternating order, so a
busy moment of the machine hits every target alike.  It prints, for each target, the median CPU
microseconds per request and req/s, and each target against the first: the median of the
per-round ratios and their range.

Targets: ours (this checkout's ``.venv``), each ``--compare-venv DIR`` (another checkout's
virtualenv, run from DIR's checkout as ``bench_proxy.py`` does), and each ``--compare-tree DIR``
(a source tree without a virtualenv, such as a ``git worktree`` of an older commit, run by our
virtualenv with ``PYTHONPATH=DIR``: how to bisect without one virtualenv per commit).

    python bench/bench_proxy_cpu.py [--duration 5] [--rounds 6] [--connections 50]
                                    [--compare-venv ../before/.venv]... [--compare-tree DIR]...
                                    [--profile DIR | --instructions]

``--instructions`` runs every proxy under valgrind's callgrind and counts, instead of CPU time,
the instructions it runs per request (``callgrind_control`` zeroes and dumps the counters around
each wrk run; less what as many seconds cost with no request, measured once per target).  With
one connection, its default there, the figure barely moves with the machine's load (rounds
agree within about 1 %), where CPU time per run spreads by ±15 %: the figure to bisect with.

``--profile DIR`` runs every proxy under twistd's cProfile and writes ``DIR/LABEL.prof`` when
it stops (read with ``python -m pstats``); figures measured so are for the profile only.

Needs redis-server, nginx and wrk (Debian packages); valgrind for ``--instructions``.  Everything listens on 127.0.0.1 and stops
at the end.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from bench_proxy import cpu_times, listed_backends, stop_all  # noqa: E402
from helpers import Daemon, RedisProcess, free_port, port_open, wait_for  # noqa: E402



def wrk(url: str, duration: int, connections: int) -> tuple[int, float, str]:
    """Requests completed, req/s, and wrk's error lines, of one ``wrk`` run."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = "; ".join(re.findall(r"(Non-2xx or 3xx responses: \d+|Socket errors: .*)", out))
    return int(done.group(1)) if done else 0, float(rps.group(1)) if rps else 0.0, errors


def proxy(label: str, port: int, redis_url: str, stack: list, profile: Path | None,
          callgrind: Path | None, venv: Path | None = None, tree: Path | None = None) -> Daemon:
    """One single-process dockpart-proxy of the checkout ``venv`` or ``tree`` (else ours)."""
    twistd, cwd, env = None, None, None
    if venv is not None:  # twistd puts its working directory first on sys.path
        twistd, cwd = str(venv / "bin" / "twistd"), str(venv.parent)
    if tree is not None:
        cwd, env = str(tree), {"PYTHONPATH": str(tree)}
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, "--workers", "1", twistd=twistd, cwd=cwd, env=env,
                    ready="dockpart-proxy listening on")
    if profile is not None:  # twistd's own options go before the plugin's name
        daemon.argv[1:1] = [f"--profile={profile / label}.prof", "--profiler=cprofile",
                            "--savestats"]
    if callgrind is not None:  # counted only between callgrind_control -i on and -d
        daemon.argv[0:0] = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                            f"--callgrind-out-file={callgrind / label}.%p"]
    daemon.start(timeout=180 if callgrind is not None else 20)
    stack.append(daemon.stop)
    return daemon


def instructions(pid: int, out: Path, url: str | None, duration: int, connections: int
                 ) -> tuple[int, int, float]:
    """Instructions the proxy ``pid`` (under callgrind) ran during one ``wrk`` run on ``url``
    (or, with no url, as long doing nothing), the requests it answered and the seconds
    counted.  With one connection each request is one turn of each socket, so the count does
    not depend on how the machine's load batched them; with more it does, a little."""
    def control(*what: str) -> None:
        subprocess.run(["callgrind_control", *what, str(pid)], check=True,
                       capture_output=True, timeout=120)

    control("--instr=on")
    control("--zero")
    start = time.monotonic()
    if url is None:
        time.sleep(duration)
        done = 0
    else:
        done, _, _ = wrk(url, duration, connections)
    before = set(out.parent.glob(out.name + ".*"))
    control("--dump")
    seconds = time.monotonic() - start
    dump = max(set(out.parent.glob(out.name + ".*")) - before, key=lambda p: p.stat().st_mtime)
    total = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(), re.M)
    dump.unlink()
    assert total is not None, f"no total in {dump}"
    return int(total.group(1)), done, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int,
                        help="wrk's connections (50; 1 with --instructions)")
    parser.add_argument("--compare-venv", action="append", default=[], type=Path,
                        help="another checkout's virtualenv (repeatable)")
    parser.add_argument("--compare-tree", action="append", default=[], type=Path,
                        help="a source tree run by our virtualenv (repeatable)")
    parser.add_argument("--profile", type=Path, help="write each proxy's cProfile stats here")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under callgrind (-c1), not CPU time")
    args = parser.parse_args()
    targets: dict[str, dict] = {"ours": {}}
    for venv in args.compare_venv:
        venv = venv.resolve()
        if not (venv / "bin" / "twistd").exists():
            sys.exit(f"{venv}/bin/twistd is missing: make that checkout's virtualenv first")
        targets[venv.parent.name] = {"venv": venv}
    for tree in args.compare_tree:
        tree = tree.resolve()
        if not (tree / "dockpart").is_dir():
            sys.exit(f"{tree} holds no dockpart/")
        targets[tree.name] = {"tree": tree}
    if args.profile is not None:
        args.profile = args.profile.resolve()
        args.profile.mkdir(parents=True, exist_ok=True)

    stack: list = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        backends, _ = listed_backends(redis, stack)
        for p in backends:
            wait_for(lambda: port_open(p), what=f"backend on {p}")
        callgrind = Path(tempfile.mkdtemp(prefix="dockpart-bench-callgrind-")) \
            if args.instructions else None
        procs = {}
        for label, where in targets.items():
            port = free_port()
            procs[label] = (port, proxy(label, port, redis.url, stack, args.profile, callgrind,
                                        **where))
        connections = args.connections or (1 if callgrind is not None else 50)
        for port, _ in procs.values():
            wrk(f"http://127.0.0.1:{port}/", 1, connections)  # warm up pools and caches
        print(f"wrk -t1 -c{connections} -d{args.duration}s, {args.rounds} rounds taking turns; "
              f"backends: 3 nginx return 200 servers (one nginx worker); dockpart-proxy "
              f"--workers 1{' under callgrind' if callgrind else ''}; "
              f"{len(os.sched_getaffinity(0))} cores shared with wrk and the backends; "
              f"load average before: {os.getloadavg()[0]:.1f}")
        idle = {}  # instructions per second of a proxy with no request (timers, Redis)
        for label, (port, daemon) in procs.items() if callgrind is not None else ():
            count, _, seconds = instructions(daemon.proc.pid, callgrind / label, None,
                                             args.duration, 0)
            idle[label] = count / seconds
            print(f"{label}: {count / seconds / 1e6:.1f} million instructions/s idle")
        # label -> per round: (figure per request, req/s)
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in procs}
        user: dict[str, list[float]] = {label: [] for label in procs}
        errors: dict[str, set[str]] = {label: set() for label in procs}
        for i in range(args.rounds):
            for label, (port, daemon) in list(procs.items())[::1 if i % 2 == 0 else -1]:
                url = f"http://127.0.0.1:{port}/"
                if callgrind is not None:  # less what the same time costs with no request
                    count, done, seconds = instructions(daemon.proc.pid, callgrind / label,
                                                        url, args.duration, connections)
                    count -= idle[label] * seconds
                    runs[label].append((count / done / 1000 if done else float("nan"),
                                        done / seconds))
                    continue
                before = cpu_times(daemon.proc.pid)
                done, rps, error = wrk(url, args.duration, connections)
                used = [b - a for a, b in zip(before, cpu_times(daemon.proc.pid))]
                runs[label].append((sum(used) / done * 1e6 if done else float("nan"), rps))
                user[label].append(used[0] / done * 1e6 if done else float("nan"))
                if error:
                    errors[label].add(error)
        figure = "kinstr/req" if callgrind is not None else "CPU us/req"
        print(f"\n{'':24} {figure:>10} {'range':>13} {'user us':>7} {'req/s':>7}  "
              f"{'x ours':>6} {'rounds':>13} {'req/s x':>7}  errors")
        first = runs["ours"]
        for label, rs in runs.items():
            ratio = [a[0] / b[0] for a, b in zip(rs, first)]
            rps_ratio = [a[1] / b[1] for a, b in zip(rs, first) if b[1]]
            print(f"{label:24} {statistics.median(r[0] for r in rs):10.1f} "
                  f"{min(r[0] for r in rs):6.1f}-{max(r[0] for r in rs):6.1f} "
                  f"{statistics.median(user[label]) if user[label] else float('nan'):7.1f} "
                  f"{statistics.median(r[1] for r in rs):7.0f}  "
                  f"{statistics.median(ratio):6.3f} {min(ratio):6.3f}-{max(ratio):6.3f} "
                  f"{statistics.median(rps_ratio):7.3f}  "
                  f"{'; '.join(sorted(errors[label])) or 'none'}")
        print(f"load average after: {os.getloadavg()[0]:.1f}; 'x ours' and 'req/s x' are "
              f"medians of each round's ratio to ours")
    finally:
        stop_all(stack)
        if args.profile is not None:
            print(f"profiles in {args.profile}")


if __name__ == "__main__":
    main()
