"""A whole web tier as local processes, set up as the shipped ones are, for fault tests and the
fault bench: Redis with its append-only file and a password, the first dockpart-web,
dockpart-proxy with active health checks every second, dockpart-infra (process driver, or docker);
and a bounded request loop through the proxy that records what each request got and how long it
waited.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis as redis_py
import requests

from dockpart import keys
from dockpart.drivers.process import _thd_scan
from helpers import Daemon, port_block, served_by, wait_for

#: The proxy's flags in docker-compose.yml and scripts/up (docs/running.md "Compose and scripts/up").
#: The seed app's routes harmless to run twice (``/`` records one more visit).
SHIPPED_RETRY_SAFE = "/,/get*,/recent,/listservers,/work"
SHIPPED_PROXY_ARGS = ("--health-path", "/", "--health-interval", "1", "--try-timeout", "1",
                      "--retry-safe", SHIPPED_RETRY_SAFE)


class AofRedis:
    """redis-server with a password and an append-only file fsynced every second, as
    Dockerfiles/redis.Dockerfile and scripts/up run it; it can be stopped and started again on
    the same port and data folder."""

    def __init__(self, port: int):
        self.port = port
        self.password = secrets.token_hex(24)
        self.dir = Path(tempfile.mkdtemp(prefix="dockpart-aof-"))
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(port=self.port, password=self.password, decode_responses=True,
                              socket_timeout=5)

    def start(self) -> "AofRedis":
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [exe, "-", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.proc.stdin.write(f"requirepass {self.password}\n".encode())
        self.proc.stdin.close()
        wait_for(lambda: self.client().ping(), timeout=10, what=f"redis-server on {self.port}")
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (the file is flushed); SIGKILL: a crash."""
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            self.proc = None

    def wipe(self) -> None:
        """Forget everything on disk, as a new or crashed-and-lost Redis would."""
        assert self.proc is None, "stop it first"
        shutil.rmtree(self.dir)
        self.dir.mkdir()


class Tier:
    """Redis, the first web instance, the proxy and infra, on free loopback ports."""

    def __init__(self, driver: str = "process", infra_args: tuple = (),
                 proxy_twistd: str | None = None, proxy_env: dict | None = None):
        ports = port_block(10)  # Redis, the proxy, the first instance and 7 after it
        self.redis = AofRedis(ports)
        self.proxy_port = ports + 1
        self.first_port = ports + 2
        self.state_dir = Path(tempfile.mkdtemp(prefix="dockpart-tier-"))
        self.driver = driver
        self.infra_args = infra_args
        self.env = {"DOCKPART_REDIS": self.redis.url}  # not on command lines
        self.proxy_twistd = proxy_twistd  # another interpreter's, as scripts/up runs PyPy's
        self.proxy_env = {**self.env, **(proxy_env or {})}
        self.web = self.proxy = self.infra = None

    @property
    def first(self) -> str:
        return f"http://127.0.0.1:{self.first_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> "Tier":
        self.redis.start()
        self.web = Daemon("dockpart-web", "--listen", f"tcp:{self.first_port}:interface=127.0.0.1",
                          "--first-port", str(self.first_port), env=self.env,
                          ready="dockpart-web listening on").start()
        self.start_proxy()
        self.start_infra()
        wait_for(lambda: served_by(self.url + "/") == self.first, timeout=20,
                 what="the first instance through the proxy")
        return self

    def start_proxy(self) -> Daemon:
        self.proxy = Daemon("dockpart-proxy", "--listen",
                            f"tcp:{self.proxy_port}:interface=127.0.0.1", *SHIPPED_PROXY_ARGS,
                            env=self.proxy_env, twistd=self.proxy_twistd,
                            ready="dockpart-proxy listening on").start()
        return self.proxy

    def start_infra(self) -> Daemon:
        driver = (["--driver", "process", "--state-dir", str(self.state_dir)]
                  if self.driver == "process" else
                  ["--driver", "docker", "--image", "dockpart-web:latest"])
        self.infra = Daemon("dockpart-infra", *driver, "--first-port", str(self.first_port),
                            "--port-range", f"{self.first_port + 1}-{self.first_port + 7}",
                            *self.infra_args, env=self.env,
                            ready="dockpart-infra started").start()
        return self.infra

    def servers(self) -> list[str]:
        return self.redis.client().lrange(keys.SERVERS, 0, -1)

    def spawn(self, count: int) -> list[str]:
        """Ask for ``count`` more instances and wait until the proxy serves from each."""
        before = set(self.servers())
        for _ in range(count):
            reply = requests.get(self.url + "/spawn", timeout=5)
            assert reply.status_code == 202, reply.text[:300]
        self.wait_for(lambda: len(set(self.servers()) - before) == count, timeout=40,
                      what=f"{count} spawned instances in servers")
        spawned = sorted(set(self.servers()) - before)
        seen = set()
        wait_for(lambda: seen.update({served_by(self.url + "/")}) or set(spawned) <= seen,
                 timeout=20, interval=0.01, what="every spawned instance through the proxy")
        return spawned

    def instance_pids(self, url: str) -> list[int]:
        """The processes of a process-driver instance (``url`` names its port)."""
        return _thd_scan(str(self.state_dir)).get(int(url.rsplit(":", 1)[1]), [])

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.1):
        """helpers.wait_for, with Redis's lists and infra's log in the failure."""
        try:
            return wait_for(predicate, timeout, interval=interval, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; {self.describe()}") from None

    def describe(self) -> str:
        """Redis's lists and infra's log, for a failure message."""
        client = self.redis.client()
        lists = {key: client.lrange(key, 0, -1) for key in client.keys("*")
                 if client.type(key) == "list"}
        return f"Redis lists: {lists}; infra log:\n{self.infra_log()}"

    def infra_log(self) -> str:
        return self.infra.output()[-3000:] if self.infra else "(no infra)"

    def stop(self) -> None:
        for daemon in (self.infra, self.proxy, self.web):
            if daemon is not None:
                daemon.stop()
        if self.driver == "process":
            for pids in _thd_scan(str(self.state_dir)).values():
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGCONT)
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        else:
            for container in self.containers(all=True):
                container.remove(force=True)
        self.redis.stop()
        shutil.rmtree(self.redis.dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def containers(self, all: bool = False) -> list:
        """Docker driver: this tier's instance containers (labelled with its Redis)."""
        from dockerkit import docker_client
        client = docker_client()
        tier = f"redis://127.0.0.1:{self.redis.port}/0"
        found = client.containers.list(all=all, filters={"label": f"dockpart.redis={tier}"})
        client.close()
        return found


@dataclass
class Outcome:
    started: float   # time.monotonic() when the request was sent
    waited: float    # seconds until the answer (or the error)
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


class RequestLoop:
    """``clients`` clients, each a thread sending ``GET`` requests one after another through the
    proxy, a new connection each time; bounded in count and time, so it stops by itself even
    if a test fails."""

    def __init__(self, url: str, clients: int = 1, max_requests: int = 20000,
                 max_seconds: float = 120, timeout: float = 30, pause: float = 0.005):
        self.url, self.timeout, self.pause = url, timeout, pause
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "RequestLoop":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while (not self._stop.is_set() and time.monotonic() < deadline
               and len(self.outcomes) < self.max_requests):
            started = time.monotonic()
            try:
                reply = requests.get(self.url, timeout=self.timeout,
                                     headers={"Connection": "close"})
                outcome = Outcome(started, time.monotonic() - started, reply.status_code,
                                  None if reply.status_code == 200 else reply.text[:200])
            except requests.RequestException as e:
                outcome = Outcome(started, time.monotonic() - started, None, repr(e)[:200])
            self.outcomes.append(outcome)  # list.append is atomic: no lock needed
            time.sleep(self.pause)

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= moment]

    def wait_served(self, count: int, after: float | None = None, timeout: float = 30) -> None:
        """Until ``count`` requests sent after ``after`` (default: now) were answered 200."""
        after = time.monotonic() if after is None else after
        wait_for(lambda: sum(o.ok for o in self.since(after)) >= count, timeout=timeout,
                 interval=0.02, what=f"{count} requests served through the proxy")

    def failures(self, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.since(since) if not o.ok]

    def summary(self) -> str:
        bad = self.failures()
        return (f"{len(bad)} failed of {len(self.outcomes)}; longest wait "
                f"{max((o.waited for o in self.outcomes), default=0):.2f} s; first failures: "
                f"{[(o.status, o.error) for o in bad[:3]]}")
