"""dockpart-proxy against nginx, side by side, in one run on this machine.

Starts a redis-server, three fast backends (nginx ``return 200`` servers; a small asyncio
server when nginx is missing), nginx as a reference round-robin proxy with keep-alive
(one worker, like our one reactor), and dockpart-proxy in ``--balance local`` and
``--balance shared``.  Drives each with ``wrk -t1 -c50 -dDs --latency``, in several rounds
that take turns (so that a busy moment of a shared machine hits every target alike), and
prints the median requests/s, p50 and p99, plus each proxy's share of nginx's requests/s.

    python bench/bench_proxy.py [--duration 5] [--connections 50] [--rounds 3]

Needs redis-server and wrk (Debian packages); nginx is optional.  Everything listens on
127.0.0.1 and stops at the end.
"""

import argparse
import asyncio
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon, RedisProcess, free_port, wait_for, port_open  # noqa: E402

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n"

NGINX_CONF = """
worker_processes 1;
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
    {backends}
    upstream pool {{ {servers} keepalive 64; }}
    server {{
        listen 127.0.0.1:{proxy_port};
        location / {{
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

NGINX_BACKEND = ("server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; "
                 "location / {{ return 200 \"hello\\n\"; }} }}")


def asyncio_backend(port: int) -> None:
    """A canned-response HTTP/1.1 server, for machines without nginx."""

    class Canned(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(RESPONSE * data.count(b"\r\n\r\n"))

    async def main():
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


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
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": latency("50"),
            "p99": latency("99"), "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    assert shutil.which("wrk"), "wrk is not installed (apt-get install wrk)"
    nginx = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")

    stack = []
    redis = RedisProcess().start()
    stack.append(redis.stop)
    try:
        ports = [free_port() for _ in range(3)]
        targets = {}
        if nginx:
            workdir = tempfile.mkdtemp(prefix="dockpart-bench-nginx-")
            nginx_port = free_port()
            conf = Path(workdir) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(
                dir=workdir, proxy_port=nginx_port,
                backends="\n    ".join(NGINX_BACKEND.format(port=p) for p in ports),
                servers=" ".join(f"server 127.0.0.1:{p};" for p in ports)))
            proc = subprocess.Popen([nginx, "-p", workdir, "-c", str(conf), "-g", "daemon off;"],
                                    stderr=subprocess.DEVNULL)
            stack.append(lambda: (proc.terminate(), proc.wait(10)))
            targets["nginx round robin (reference)"] = nginx_port
        else:
            for p in ports:
                proc = multiprocessing.Process(target=asyncio_backend, args=(p,), daemon=True)
                proc.start()
                stack.append(proc.terminate)
        for p in ports:
            wait_for(lambda p=p: port_open(p), what=f"backend on {p}")
        redis.client().rpush("servers", *[f"http://127.0.0.1:{p}" for p in ports])
        for balance in ("local", "shared"):
            port = free_port()
            daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                            "--redis", redis.url, "--balance", balance,
                            ready="dockpart-proxy listening on").start()
            stack.append(daemon.stop)
            targets[f"dockpart-proxy --balance {balance}"] = port
        rows = {"one backend directly": ports[0], **targets}
        wait_for(lambda: all(port_open(p) for p in rows.values()), what="every listener")
        print(f"wrk -t1 -c{args.connections} -d{args.duration}s, medians of {args.rounds} rounds, "
              f"backends: {'nginx return 200' if nginx else 'asyncio canned response'}")
        runs = {name: [] for name in rows}
        for port in rows.values():
            wrk(f"http://127.0.0.1:{port}/", 1, args.connections)  # warm up pools and caches
        for _ in range(args.rounds):
            for name, port in rows.items():
                runs[name].append(wrk(f"http://127.0.0.1:{port}/", args.duration, args.connections))
        results = {name: {"rps": statistics.median(r["rps"] for r in rs),
                          "p50": statistics.median(r["p50"] for r in rs),
                          "p99": statistics.median(r["p99"] for r in rs),
                          "non2xx": sum(r["non2xx"] for r in rs),
                          "socket_errors": "; ".join(filter(None, (r["socket_errors"] for r in rs)))}
                   for name, rs in runs.items()}
        reference = results.get("nginx round robin (reference)", {}).get("rps")
        print(f"{'':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'of nginx':>9}  errors")
        for name, r in results.items():
            share = f"{100 * r['rps'] / reference:8.1f}%" if reference else f"{'-':>9}"
            errors = ", ".join(filter(None, [f"{r['non2xx']} non-2xx" if r["non2xx"] else "",
                                             r["socket_errors"]])) or "none"
            print(f"{name:34} {r['rps']:9.0f} {r['p50']:8.2f} {r['p99']:8.2f} {share}  {errors}")
        shared = redis.client().lrange("servers", 0, -1)
        print(f"servers after the run (shared mode rotated it, never rewrote it): {shared}")
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                print(f"while stopping: {e!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
