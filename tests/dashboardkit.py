"""A real tier with the dashboard on, and traffic through its real proxy, whose own load
reports (dockpart/proxy_load.py) the dashboard shows."""

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from dockpart.drivers.process import _thd_scan
from helpers import Daemon, RedisProcess, free_port, port_block, start_proxy, start_web

RUN = 20  # ports after the first instance's that spawned instances may take
APP_PORTS = 6  # ports the apps (dockpart apps) of a tier's tests may take


def logged_in(base: str, token: str) -> requests.Session:
    """A client with a dashboard session, opened as a person does: the login form."""
    session = requests.Session()
    reply = session.post(base + "/login", data={"token": token}, allow_redirects=False,
                         timeout=5)
    assert reply.status_code == 303 and session.cookies, (reply.status_code, reply.text)
    return session


def start_dashboard_infra(redis_url: str, state_dir: Path, first: int, dash_port: int,
                          *args: str, env: dict | None = None,
                          token: str | None = "generated") -> Daemon:
    """dockpart-infra with the dashboard on ``dash_port``; ``args`` may choose another driver.

    Apps take a block of ports of their own, never the default range another tier may use.

    The dashboard has a token (a new one unless ``token`` names it; None: opened with
    --dashboard-no-token); ``daemon.http`` is a client logged in with it."""
    if token == "generated":
        token = secrets.token_urlsafe(16)
    if token:
        env = {**(env or {}), "DOCKPART_DASHBOARD_TOKEN": token}
    else:
        args = (*args, "--dashboard-no-token")
    apps_low = port_block(APP_PORTS)
    daemon = Daemon("dockpart-infra", "--driver", "process", "--redis", redis_url,
                    "--state-dir", str(state_dir), "--first-port", str(first),
                    "--port-range", f"{first + 1}-{first + RUN}", "--interval", "0.05",
                    "--drain", "1", "--reconcile-interval", "1", "--spawn-timeout", "20",
                    "--lease", "2", "--dashboard", f"tcp:{dash_port}:interface=127.0.0.1",
                    "--app-ports", f"{apps_low}-{apps_low + APP_PORTS - 1}",
                    "--evaluate-interval", "0.5",
                    *args, ready="dockpart-infra dashboard listening on", env=env).start()
    daemon.port = dash_port
    daemon.base = f"http://127.0.0.1:{dash_port}"
    daemon.token = token
    daemon.http = logged_in(daemon.base, token) if token else requests.Session()
    return daemon


def managed(state_dir: Path) -> dict[int, list[int]]:
    """The live processes the process driver started with this state directory, by port."""
    return _thd_scan(str(Path(state_dir).resolve()))


def stop_managed(state_dir: Path) -> None:
    """Kill the instances a test's infra started: they outlive the infra by design."""
    for pid in [pid for pids in managed(state_dir).values() for pid in pids]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while managed(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)


class Traffic:
    """Requests through the proxy, one at a time, until stopped: the proxy publishes its own
    load report (dockpart/proxy_load.py) of what it forwarded."""

    def __init__(self, proxy_base: str):
        self.proxy_base = proxy_base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.wait(0.02):
                try:
                    session.get(self.proxy_base + "/", timeout=2)
                except requests.RequestException:
                    pass


@dataclass
class Tier:
    redis: RedisProcess
    web: Daemon
    infra: Daemon
    proxy: Daemon
    traffic: Traffic
    state_dir: Path
    first: int

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for part in (self.traffic, self.proxy, self.infra, self.web):
            try:
                part.stop()
            except Exception:  # stop the rest whatever one of them does
                pass
        stop_managed(self.state_dir)
        for app_dir in (self.state_dir / "apps").glob("*"):
            stop_managed(app_dir)
        self.redis.stop()


def start_tier(state_dir: Path, *infra_args: str, token: str | None = "generated") -> Tier:
    """Redis, the first dockpart-web, dockpart-infra with the dashboard, a proxy, load reports."""
    redis = RedisProcess().start()
    parts = []
    try:
        first = port_block(RUN + 1)  # the traffic's ephemeral ports stay clear of them
        web = start_web(redis.url, "--first-port", str(first), port=first)
        parts.append(web)
        infra = start_dashboard_infra(redis.url, state_dir, first, free_port(), *infra_args,
                                      token=token)
        parts.append(infra)
        proxy = start_proxy(redis.url)
        parts.append(proxy)
        traffic = Traffic(proxy.base).start()
    except BaseException:
        for part in parts:
            part.stop()
        stop_managed(state_dir)
        redis.stop()
        raise
    return Tier(redis, web, infra, proxy, traffic, state_dir, first)
