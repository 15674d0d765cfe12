"""dockpart-proxy against nginx and HAProxy, with one and two processes, in one run.

Starts a redis-server, three fast backends (one nginx process with three ``return 200``
servers), and as proxies over them: nginx with 1 and 2 workers (upstream keep-alive,
``reuseport`` like ours), HAProxy with ``nbthread`` 1 and 2 (``http-reuse always``), and
dockpart-proxy ``--balance local`` with ``--workers 1`` and ``2``, on CPython and on PyPy
(the virtualenv ``scripts/test --pypy`` or ``scripts/up`` makes, ``.venv-pypy``; its JIT
is warmed up with ``--warmup`` seconds of load before anything is measured), with the GC
settings it ships with (the ``PYPY_GC_*`` ``scripts/lib.sh`` sets; yours where you set them).
``--nurseries 8M,16M`` adds a PyPy proxy per nursery size beside it (``default`` is PyPy's
own), its other settings as shipped: the figures behind the shipped size, in the same rounds
as nginx and HAProxy.  Drives each with
``wrk -t1 -cC -dDs --latency`` at each concurrency, in rounds that take turns (a busy moment
of a shared machine hits every target alike), and prints the median requests/s, p50, p99,
the CPU time each proxy (its processes together) spent per request,
then the ratios the issue asks for: dockpart's gain from 1 to 2 processes against nginx's,
dockpart's req/s against nginx's at equal process counts, and p99 against nginx's.

``--parsers`` adds each interpreter's proxy with the other's parser: CPython with
:mod:`dockpart.http11`, and PyPy with httptools (through cpyext) when the PyPy virtualenv has
it (``pip install httptools`` there, with Debian's ``pypy3-dev``).

``--compare-venv DIR`` adds a second dockpart-proxy, run by another checkout's virtualenv
(``DIR/bin/twistd``), beside each of ours, measured in the same rounds, and prints ours
against it: the median of each round's req/s ratio, its spread, and the load average.  Every
other round goes in reverse order, so neither of the two always runs first.
``--compare-venv .venv`` (ours against itself) shows how far apart equal proxies come out.

    python bench/bench_proxy.py [--duration 5] [--rounds 3] [--concurrency 50,200]
                                [--warmup 15] [--pypy .venv-pypy | --pypy ''] [--parsers]
                                [--nurseries default,8M,16M]
                                [--compare-venv ../before/.venv [--compare-label before]]

Needs redis-server, nginx, haproxy and wrk (Debian packages).  Everything listens on
127.0.0.1 and stops at the end.  The load generator shares the machine's cores with the
proxies: compare gains and ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import (Daemon, RedisProcess, free_port, port_open,  # noqa: E402
                     pypy_gc_env, wait_for)

NGINX_HEAD = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    {servers}
}}
"""
NGINX_PROXY = """
    upstream pool {{ {upstreams} keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""
NGINX_BACKEND = ("server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; "
                 "location / {{ return 200 \"hello\\n\"; }} }}")

HAPROXY = """
global
    nbthread {threads}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend front
    bind 127.0.0.1:{port}
    default_backend pool
backend pool
    balance roundrobin
    http-reuse always
{servers}
"""


def wrk(url: str, duration: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 30).stdout

    def latency(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    requests = re.search(r"(\d+) requests in", out)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": latency("50"),
            "requests": int(requests.group(1)) if requests else 0,
            "p99": latency("99"), "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds process ``pid`` (every thread) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) that ``pid`` and its descendants have used: per request,
    the figure that a busy machine moves far less than requests/s."""
    total = sum(cpu_times(pid))
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except FileNotFoundError:  # it has just exited
                pass
    return total


def listed_backends(redis, stack: list, count: int = 3) -> tuple[list[int], int]:
    """``count`` canned-response servers in one nginx worker, listed in ``servers``: their
    ports and the nginx pid."""
    backends = [free_port() for _ in range(count)]
    pid = nginx(1, "\n    ".join(NGINX_BACKEND.format(port=p) for p in backends), stack)
    redis.client().rpush("servers", *[f"http://127.0.0.1:{p}" for p in backends])
    return backends, pid


def measured(url: str, pid: int, duration: int, connections: int) -> dict:
    """One :func:`wrk` run, with the CPU microseconds per request of the server ``pid``."""
    before = cpu_seconds(pid)
    run = wrk(url, duration, connections)
    run["cpu_us"] = (cpu_seconds(pid) - before) * 1e6 / max(1, run["requests"])
    return run


def nginx(workers: int, servers: str, stack: list) -> int:
    workdir = tempfile.mkdtemp(prefix="dockpart-bench-nginx-")
    conf = Path(workdir) / "nginx.conf"
    conf.write_text(NGINX_HEAD.format(workers=workers, dir=workdir, servers=servers))
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", workdir,
                             "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    stack.append(lambda: (proc.terminate(), proc.wait(10)))
    return proc.pid


def haproxy(threads: int, port: int, backends: list[int], stack: list) -> int:
    conf = Path(tempfile.mkdtemp(prefix="dockpart-bench-haproxy-")) / "haproxy.cfg"
    conf.write_text(HAPROXY.format(threads=threads, port=port, servers="\n".join(
        f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(backends))))
    proc = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f",
                             str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.append(lambda: (proc.terminate(), proc.wait(10)))
    return proc.pid


def dockpart(workers: int, port: int, redis_url: str, stack: list,
             twistd: str | None = None, cwd: str | None = None,
             env: dict | None = None) -> int:
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, "--workers", str(workers), twistd=twistd, cwd=cwd,
                    env=env,
                    ready=f"with {workers} workers" if workers > 1
                    else "dockpart-proxy listening on").start()
    stack.append(daemon.stop)
    return daemon.proc.pid


def stop_all(stack: list) -> None:
    """Calls every stopper in ``stack``, last started first; one that fails does not stop the rest."""
    for stop in reversed(stack):
        try:
            stop()
        except Exception as e:  # keep stopping the rest
            print(f"while stopping: {e!r}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="50,200")
    parser.add_argument("--warmup", type=int, default=15,
                        help="seconds of load on each PyPy proxy before measuring (its JIT)")
    parser.add_argument("--pypy", default=str(ROOT / ".venv-pypy"),
                        help="the PyPy virtualenv whose twistd runs the PyPy rows ('' for none)")
    parser.add_argument("--parsers", action="store_true",
                        help="also each interpreter's proxy (1 process) with the other's HTTP "
                        "parser (DOCKPART_HTTP_PARSER): the figures behind the choice")
    parser.add_argument("--nurseries", default="",
                        help="PyPy proxies (1 and 2 processes) with these PYPY_GC_NURSERY sizes "
                        "beside the shipped one ('default': PyPy's own)")
    parser.add_argument("--compare-venv", help="another checkout's virtualenv whose "
                        "dockpart-proxy runs beside ours, in the same rounds")
    parser.add_argument("--compare-label", default="before")
    args = parser.parse_args()
    pypy_twistd = Path(args.pypy) / "bin" / "twistd" if args.pypy else None
    if pypy_twistd is not None and not pypy_twistd.exists():
        sys.exit(f"{pypy_twistd} is missing: make it with `bash scripts/test --pypy --co -q`, "
                 "or leave PyPy out with --pypy ''")
    other = Path(args.compare_venv).resolve() if args.compare_venv else None
    if other is not None and not (other / "bin" / "twistd").exists():
        sys.exit(f"{other}/bin/twistd is missing: make that checkout's virtualenv first")
    levels = [int(c) for c in args.concurrency.split(",")]
    for tool in ("wrk", "nginx", "haproxy", "redis-server"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), \
            f"{tool} is not installed (apt-get install {tool})"

    stack = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        backends, backend_pid = listed_backends(redis, stack)
        pids = {"one backend directly": backend_pid}
        upstreams = " ".join(f"server 127.0.0.1:{p};" for p in backends)
        rows = {"one backend directly": backends[0]}
        for n in (1, 2):
            name = f"nginx, {n} worker{'s' * (n > 1)}"
            rows[name] = port = free_port()
            pids[name] = nginx(n, NGINX_PROXY.format(upstreams=upstreams, port=port), stack)
        for n in (1, 2):
            rows[f"HAProxy, nbthread {n}"] = port = free_port()
            pids[f"HAProxy, nbthread {n}"] = haproxy(n, port, backends, stack)
        for n in (1, 2):
            rows[f"dockpart-proxy --workers {n}"] = port = free_port()
            pids[f"dockpart-proxy --workers {n}"] = dockpart(n, port, redis.url, stack)
            if other is not None:  # next to ours, so each round meets both at the same moment
                # twistd puts its working directory first on sys.path: run it from the
                # virtualenv, which holds no dockpart/, so it imports its own checkout's
                name = f"  {args.compare_label} --workers {n}"
                rows[name] = port = free_port()
                pids[name] = dockpart(n, port, redis.url, stack,
                                      twistd=str(other / "bin" / "twistd"), cwd=str(other))
        jitted = []
        if pypy_twistd is not None:
            gc = pypy_gc_env()
            for n in (1, 2):
                rows[f"dockpart on PyPy --workers {n}"] = port = free_port()
                pids[f"dockpart on PyPy --workers {n}"] = dockpart(
                    n, port, redis.url, stack, twistd=str(pypy_twistd), env=gc)
                jitted.append(port)
                for size in filter(None, args.nurseries.split(",")):
                    name = f"  PyPy, nursery {size} --workers {n}"
                    rows[name] = port = free_port()
                    pids[name] = dockpart(  # an empty value leaves PyPy its own default
                        n, port, redis.url, stack, twistd=str(pypy_twistd),
                        env={**gc, "PYPY_GC_NURSERY": "" if size == "default" else size})
                    jitted.append(port)
        if args.parsers:
            rows["  CPython, http11 parser"] = port = free_port()
            pids["  CPython, http11 parser"] = dockpart(
                1, port, redis.url, stack, env={"DOCKPART_HTTP_PARSER": "http11"})
            if pypy_twistd is not None and subprocess.run(
                    [str(pypy_twistd.parent / "python"), "-c", "import httptools"],
                    capture_output=True).returncode == 0:  # built against pypy3-dev
                rows["  PyPy, httptools (cpyext)"] = port = free_port()
                pids["  PyPy, httptools (cpyext)"] = dockpart(
                    1, port, redis.url, stack, twistd=str(pypy_twistd),
                    env={"DOCKPART_HTTP_PARSER": "httptools"})
                jitted.append(port)
        for name, port in rows.items():
            wait_for(lambda: port_open(port), what=f"{name} on {port}")
        for port in jitted:  # PyPy compiles the hot paths after some thousands of requests
            for connections in levels:
                wrk(f"http://127.0.0.1:{port}/", max(1, args.warmup // len(levels)), connections)
        print(f"wrk -t1 -d{args.duration}s, medians of {args.rounds} rounds taking turns; "
              f"backends: 3 nginx return 200 servers (one nginx worker); "
              f"dockpart-proxy --balance local; {len(os.sched_getaffinity(0))} cores shared "
              f"with wrk and the backends; load average before: {os.getloadavg()[0]:.1f}"
              + ("; PyPy's GC: " + " ".join(f"{k}={v}" for k, v in sorted(gc.items()))
                 if pypy_twistd is not None else ""))
        results, compared = {}, []
        for connections in levels:
            runs = {name: [] for name in rows}
            for port in rows.values():
                wrk(f"http://127.0.0.1:{port}/", 1, connections)  # warm up pools and caches
            for i in range(args.rounds):  # every other round backwards: no row always goes first
                for name, port in list(rows.items())[::1 if i % 2 == 0 else -1]:
                    runs[name].append(measured(f"http://127.0.0.1:{port}/", pids[name],
                                               args.duration, connections))
            if other is not None:
                compared.append((connections, runs, os.getloadavg()[0]))
            results[connections] = table = {
                name: {"rps": statistics.median(r["rps"] for r in rs),
                       "p50": statistics.median(r["p50"] for r in rs),
                       "p99": statistics.median(r["p99"] for r in rs),
                       "cpu_us": statistics.median(r["cpu_us"] for r in rs),
                       "errors": ", ".join(filter(None, [
                           f"{sum(r['non2xx'] for r in rs)} non-2xx"
                           if any(r["non2xx"] for r in rs) else "",
                           "; ".join(filter(None, (r["socket_errors"] for r in rs)))])) or "none"}
                for name, rs in runs.items()}
            print(f"\n-c{connections}")
            print(f"{'':30} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}  errors")
            for name, r in table.items():
                print(f"{name:30} {r['rps']:9.0f} {r['p50']:8.2f} {r['p99']:8.2f} "
                      f"{r['cpu_us']:10.1f}  {r['errors']}")
        print("\nratios (targets: gain >= 0.9 of nginx's, req/s at -c50 >= 0.5 of nginx's, "
              "p99 at -c50 <= 2x nginx's)")
        for connections, table in results.items():
            def ratio(name, other, figure="rps"):
                return table[name][figure] / table[other][figure]
            nginx1, nginx2 = "nginx, 1 worker", "nginx, 2 workers"
            nginx_gain = ratio(nginx2, nginx1)
            print(f"-c{connections}: gain 1 -> 2: nginx x{nginx_gain:.2f}, HAProxy "
                  f"x{ratio('HAProxy, nbthread 2', 'HAProxy, nbthread 1'):.2f}")
            for label, prefix in [("CPython", "dockpart-proxy"), ("PyPy", "dockpart on PyPy")] + [
                    (f"PyPy, nursery {size}", f"  PyPy, nursery {size}")
                    for size in filter(None, args.nurseries.split(","))]:
                ours1, ours2 = f"{prefix} --workers 1", f"{prefix} --workers 2"
                if ours1 not in table:
                    continue
                ours_gain = ratio(ours2, ours1)
                print(f"  dockpart on {label}: gain x{ours_gain:.2f} "
                      f"({ours_gain / nginx_gain:.2f} of nginx's); "
                      f"req/s / nginx's: 1 process {ratio(ours1, nginx1):.2f}, "
                      f"2 processes {ratio(ours2, nginx2):.2f}; p99 / nginx's: 1 process "
                      f"{ratio(ours1, nginx1, 'p99'):.1f}x, 2 processes "
                      f"{ratio(ours2, nginx2, 'p99'):.1f}x; CPU per request / nginx's: "
                      f"{ratio(ours1, nginx1, 'cpu_us'):.1f}x, {ratio(ours2, nginx2, 'cpu_us'):.1f}x")
        for connections, runs, load in compared:
            print(f"-c{connections}: ours / {args.compare_label} (load average {load:.1f}):")
            for n in (1, 2):
                ours, theirs = (runs[f"dockpart-proxy --workers {n}"],
                                runs[f"  {args.compare_label} --workers {n}"])
                each = [a["rps"] / b["rps"] for a, b in zip(ours, theirs) if b["rps"]]
                p99 = (statistics.median(r["p99"] for r in ours)
                       / statistics.median(r["p99"] for r in theirs))
                spread = ", ".join(f"{label} {min(r['rps'] for r in rs):.0f}-"
                                   f"{max(r['rps'] for r in rs):.0f}"
                                   for label, rs in (("ours", ours), (args.compare_label, theirs)))
                print(f"  --workers {n}: req/s x{statistics.median(each):.3f} (rounds "
                      f"{min(each):.3f}-{max(each):.3f}), p99 x{p99:.2f}; req/s {spread}")
    finally:
        stop_all(stack)


if __name__ == "__main__":
    main()
