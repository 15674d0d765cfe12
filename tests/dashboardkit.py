"""A real tier with the dashboard on, and load reports in the proxies' format.

The proxy's own load publisher (dockpart/proxy_load.py, the autoscaling issue) is not on this
branch yet, so :class:`LoadReporter` stands in for it: it sends real requests through the real
dockpart-proxy, learns from each page which instance served it, and publishes what it saw
exactly as :mod:`dockpart.load` describes.
"""

import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from dockpart import keys, load
from helpers import SERVED_BY, Daemon, RedisProcess, free_port, port_open, start_web

RUN = 20  # ports after the first instance's that spawned instances may take


def instance_ports() -> int:
    """A first port and RUN free ones after it, below Linux's ephemeral range (32768-60999):
    the load reporter's many connections take ephemeral ports, and an instance could not
    listen on one of those."""
    for _ in range(100):
        first = random.randrange(20000, 32768 - RUN - 1)
        if not any(port_open(p) for p in range(first, first + RUN + 1)):
            return first
    raise AssertionError(f"no run of {RUN + 1} free ports found below 32768")


def start_dashboard_infra(redis_url: str, state_dir: Path, first: int, dash_port: int,
                          *args: str, env: dict | None = None) -> Daemon:
    """dockpart-infra with the dashboard on ``dash_port``; ``args`` may choose another driver."""
    daemon = Daemon("dockpart-infra", "--driver", "process", "--redis", redis_url,
                    "--state-dir", str(state_dir), "--first-port", str(first),
                    "--port-range", f"{first + 1}-{first + RUN}", "--interval", "0.05",
                    "--drain", "1", "--reconcile-interval", "1", "--spawn-timeout", "20",
                    "--lease", "2", "--dashboard", f"tcp:{dash_port}:interface=127.0.0.1",
                    *args, ready="dockpart-infra dashboard listening on", env=env).start()
    daemon.port = dash_port
    daemon.base = f"http://127.0.0.1:{dash_port}"
    return daemon


def start_proxy(redis_url: str) -> Daemon:
    port = free_port()
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, ready="dockpart-proxy listening on").start()
    daemon.port = port
    daemon.base = f"http://127.0.0.1:{port}"
    return daemon


def managed_pids(state_dir: Path) -> list[int]:
    """Processes the process driver started with this state directory (its environment mark)."""
    mark = f"DOCKPART_MANAGED={Path(state_dir).resolve()}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stop_managed(state_dir: Path) -> None:
    """Kill the instances a test's infra started: they outlive the infra by design."""
    for pid in managed_pids(state_dir):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while managed_pids(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)


class LoadReporter:
    """Requests through the proxy, published each ``interval`` as one proxy's load report."""

    def __init__(self, redis: RedisProcess, proxy_base: str, interval: float = 0.5,
                 proxy_id: str = "test-reporter"):
        self.redis = redis.client()
        self.proxy_base = proxy_base
        self.interval = interval
        self.proxy_id = proxy_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LoadReporter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.redis.close()

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            began = time.time()
            seen: dict[str, dict] = {}
            while time.time() - began < self.interval and not self._stop.is_set():
                start = time.monotonic()
                try:
                    page = session.get(self.proxy_base + "/", timeout=2)
                except requests.RequestException:
                    continue
                match = SERVED_BY.search(page.text)
                if not match:
                    continue
                figures = seen.setdefault(match.group(1), _figures())
                figures["requests"] += 1
                spent = time.monotonic() - start
                figures["latency_sum"] += spent
                figures["latency_buckets"][load.bucket_of(spent)] += 1
                time.sleep(0.02)
            for url in self.redis.lrange(keys.SERVERS, 0, -1):
                seen.setdefault(url, _figures())
            self.publish(seen, began)
        session.close()

    def publish(self, backends: dict, began: float) -> None:
        now = time.time()
        report = {"proxy": self.proxy_id, "time": now, "interval": now - began,
                  "list": keys.SERVERS, "backends": backends}
        pipe = self.redis.pipeline()
        pipe.set(keys.proxy_load(self.proxy_id), json.dumps(report), px=int(load.REPORT_TTL * 1000))
        pipe.zadd(keys.LOAD_PROXIES, {self.proxy_id: now})
        pipe.execute()


def _figures() -> dict:
    return {"requests": 0, "errors": 0, "latency_sum": 0.0,
            "latency_buckets": load.empty_buckets(), "inflight": 0, "healthy": True}


@dataclass
class Tier:
    redis: RedisProcess
    web: Daemon
    infra: Daemon
    proxy: Daemon
    reporter: LoadReporter
    state_dir: Path
    first: int

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for part in (self.reporter, self.proxy, self.infra, self.web):
            try:
                part.stop()
            except Exception:  # stop the rest whatever one of them does
                pass
        stop_managed(self.state_dir)
        self.redis.stop()


def start_tier(state_dir: Path, *infra_args: str, token: str | None = None) -> Tier:
    """Redis, the first dockpart-web, dockpart-infra with the dashboard, a proxy, load reports."""
    redis = RedisProcess().start()
    parts = []
    try:
        first = instance_ports()
        web = start_web(redis.url, "--first-port", str(first), port=first)
        parts.append(web)
        env = {"DOCKPART_DASHBOARD_TOKEN": token} if token else None
        infra = start_dashboard_infra(redis.url, state_dir, first, free_port(), *infra_args,
                                      env=env)
        parts.append(infra)
        proxy = start_proxy(redis.url)
        parts.append(proxy)
        reporter = LoadReporter(redis, proxy.base).start()
    except BaseException:
        for part in parts:
            part.stop()
        stop_managed(state_dir)
        redis.stop()
        raise
    return Tier(redis, web, infra, proxy, reporter, state_dir, first)
