"""Real parts for tests: free ports, a redis-server, a twistd daemon, bounded waits."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import redis as redis_py
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def shipped_pypy_gc() -> dict[str, str]:
    """The ``PYPY_GC_*`` settings ``scripts/lib.sh`` gives dockpart-proxy on PyPy when the user
    sets none: their one home, which tests and benchmarks read rather than copy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPY_GC_")}
    printed = subprocess.run(["bash", "-c", '. "$1" && env -0', "-",
                              str(ROOT / "scripts" / "lib.sh")],
                             env=env, capture_output=True, text=True, check=True).stdout
    pairs = (entry.partition("=") for entry in printed.split("\0"))
    return {k: v for k, _, v in pairs if k.startswith("PYPY_GC_")}


def pypy_gc_env() -> dict[str, str]:
    """The ``PYPY_GC_*`` a PyPy proxy started here gets: the user's own where set, else
    what ships."""
    return {k: os.environ.get(k) or v for k, v in shipped_pypy_gc().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_block(count: int) -> int:
    """A first port with ``count`` free ones from it, below the ephemeral range (32768 up):
    the load's own connections cannot take a port an instance is about to listen on."""
    for _ in range(100):
        first = random.randrange(30000, 32700 - count)
        if not any(port_open(p) for p in range(first, first + count)):
            return first
    raise AssertionError(f"no block of {count} free ports in 30000-32700")


def entries(client, *lists: str) -> int:
    """How many entries the Redis ``lists`` hold together, read in one transaction: infra moves
    a request from its queue to its processing list between two separate reads, which then
    both read empty while the request is in hand."""
    pipe = client.pipeline()  # MULTI ... EXEC
    for name in lists:
        pipe.llen(name)
    return sum(pipe.execute())


def listening_addresses(port: int) -> set[str]:
    """The local addresses that TCP sockets in LISTEN state on ``port`` are bound to (IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def contains_run(argv: list[str], run: tuple) -> bool:
    """Whether ``run`` appears in ``argv`` as consecutive arguments."""
    return any(tuple(argv[i:i + len(run)]) == run for i in range(len(argv)))


class GaveUp(AssertionError):
    """Raised by a predicate when waiting longer is pointless (a daemon died)."""


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except GaveUp:
            raise
        except Exception as e:  # the thing waited for may not be up yet
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


SERVED_BY = re.compile(r"Served by the instance at <b>(http://[^<]+)</b>")


def served_by(url: str) -> str:
    """The instance URL that dockpart-web's page at ``url`` names (through a proxy: which one)."""
    reply = requests.get(url, timeout=5)
    assert reply.status_code == 200, (reply.status_code, reply.text[:300])
    match = SERVED_BY.search(reply.text)
    assert match, reply.text[:300]
    return match.group(1)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class RedisProcess:
    """A real redis-server on a free loopback port, with no persistence."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="dockpart-redis-")
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def start(self) -> "RedisProcess":
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (apt-get install redis-server)"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.client().ping(), what=f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


class Daemon:
    """``twistd -n PLUGIN ARGS`` in a subprocess, waited for by a line of its log."""

    def __init__(self, plugin: str, *args: str, ready: str, env: dict | None = None,
                 cwd: str | None = None, twistd: str | None = None):
        self.argv = [twistd or str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", plugin, *args]
        self.ready = ready
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = Path(tempfile.mkstemp(prefix=f"{plugin}-", suffix=".log")[1])
        self.proc = None

    def start(self, timeout: float = 20.0) -> "Daemon":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        try:
            wait_for(self._is_ready, timeout, what=f"{self.argv[4]} to log {self.ready!r}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"{self.argv} did not start:\n{self.output()}") from None
        return self

    def _is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise GaveUp(f"exited with {self.proc.returncode}:\n{self.output()}")
        return self.ready in self.output()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._log.close()
        code, self.proc = self.proc.returncode, None
        return code


def instance_pids(port: int) -> list[int]:
    """Processes whose command line makes them listen on ``port``, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"tcp:{port}:interface=127.0.0.1".encode() in argv and state != b"Z":
            pids.append(int(entry.name))
    return pids


def kill_instances(state_dir: Path) -> None:
    """Stop every instance an infra (process driver) started with ``state_dir``: they outlive
    the infra by design.

    Their files go first: an instance with a file and no process exited, and a running
    infra would replace it.
    """
    for marker in state_dir.glob("dockpart-web-*.instance"):
        marker.unlink()
    for log in state_dir.glob("dockpart-web-*.log"):
        port = int(log.stem.rsplit("-", 1)[1])
        for pid in instance_pids(port):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not instance_pids(port), 10, what=f"instance on {port} to exit")


def png_bytes(size: int = 0) -> bytes:
    """A real 1x1 PNG, padded with an ancillary chunk to reach about ``size`` bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00\xff\x00\x00")
    pad = chunk(b"tEXt", b"c\x00" + b"x" * size) if size else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pad + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def start_web(redis_url: str, *args: str, port: int | None = None, env: dict | None = None):
    port = port or free_port()
    daemon = Daemon("dockpart-web", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, *args, ready="dockpart-web listening on", env=env)
    daemon.port = port
    daemon.base = f"http://127.0.0.1:{port}"
    return daemon.start()


def start_apps_infra(redis_url: str, *args: str, driver: str = "process", app_ports: int = 8):
    """A dockpart-infra that runs apps on a block of ``app_ports`` free ports, started."""
    low = port_block(app_ports)
    return Daemon("dockpart-infra", "--driver", driver, "--redis", redis_url,
                  "--first-port", str(free_port()), "--app-ports", f"{low}-{low + app_ports - 1}",
                  "--interval", "0.05", *args, ready="dockpart-infra started").start()


def start_proxy(redis_url: str, *args: str, port: int | None = None):
    """A dockpart-proxy on 127.0.0.1 (``.port``, ``.base``), started and listening."""
    port = port or free_port()
    daemon = Daemon("dockpart-proxy", "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--redis", redis_url, *args, ready="dockpart-proxy listening on")
    daemon.port = port
    daemon.base = f"http://127.0.0.1:{port}"
    return daemon.start()


class SyncRedis:
    """``redis.call`` over a redis-py client, so dockpart's readers (``read_reports``) run in
    a test or a benchmark without a reactor."""

    def __init__(self, client: redis_py.Redis):
        self.client = client

    async def call(self, *args):
        return self.client.execute_command(*args)
