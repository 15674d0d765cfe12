"""``--driver process``: each instance is a local ``twistd dockpart-web`` process.

For machines without a Docker engine.  An instance is found by the process
table, not by a pid file: its environment carries ``DOCKPART_MANAGED`` (the
infra's state directory, so that two infras with different directories never
adopt each other's instances) and ``DOCKPART_PORT``, as a container carries
labels.  Each instance runs in a session of its own and logs to a file in the
state directory, so it outlives a stopped, crashed or restarted infra; the next
infra started with the same state directory adopts it and reconciles.  A file
``dockpart-web-PORT.instance`` there lasts from an instance's start to its
removal: a port with the file and no process is an instance that exited (as an
exited container is), which reconcile replaces.
"""

import os
import signal
import sys
from pathlib import Path

from twisted.internet import protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from dockpart.drivers import (NAME_PREFIX, DriverError, Instance, Status, ThreadPoolService,
                              instance_name)

MANAGED_VAR = "DOCKPART_MANAGED"
PORT_VAR = "DOCKPART_PORT"
MARKER_SUFFIX = ".instance"

#: Runs twistd in a new session: signals to the infra's process group spare the instance.
LAUNCHER = ("import os, sys; os.setsid(); sys.argv[0] = 'twistd'; "
            "from twisted.scripts.twistd import run; run()")


def _thd_scan(mark: str) -> dict[int, list[int]]:
    """Pids of the live (not zombie) processes carrying ``mark``, by port."""
    found: dict[int, list[int]] = {}
    want = f"{MANAGED_VAR}={mark}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if want not in env or state in (b"Z", b"X"):
            continue
        for var in env:
            name, _, value = var.partition(b"=")
            if name == PORT_VAR.encode() and value.isdigit():
                found.setdefault(int(value), []).append(int(entry.name))
    return found


def _thd_instances(mark: str, state_dir: Path) -> dict[int, Instance]:
    """Every instance: its process, or its marker without a process (it exited)."""
    found = {port: Instance(port, Status.RUNNING, state="running", id=f"pid {pids[0]}")
             for port, pids in _thd_scan(mark).items()}
    for path in state_dir.glob(f"{NAME_PREFIX}*{MARKER_SUFFIX}"):
        port = path.name[len(NAME_PREFIX):-len(MARKER_SUFFIX)]
        if port.isdigit():
            found.setdefault(int(port), Instance(int(port), Status.EXITED, state="exited"))
    return found


def _thd_prepare(state_dir: Path, marker: Path, log_path: Path) -> int:
    """Make the state directory and the instance's marker; the log file opened for appending
    (its descriptor, which the caller closes)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


class _Instance(protocol.ProcessProtocol):
    """Says when an instance this infra started exits."""

    log = Logger()

    def __init__(self, port: int):
        self.port = port

    def processEnded(self, reason):
        self.log.info("{name} exited ({why})", name=instance_name(self.port),
                      why=reason.getErrorMessage())


class ProcessDriver:
    name = "process"
    log = Logger()

    def __init__(self, pool: ThreadPoolService, state_dir: str, redis_url: str,
                 advertise_host: str, first_port: int, stop_timeout: float, reactor):
        self.pool = pool
        self.state_dir = Path(state_dir).resolve()
        self.redis_url = redis_url
        self.advertise_host = advertise_host
        self.first_port = first_port
        self.stop_timeout = stop_timeout
        self.reactor = reactor

    @property
    def mark(self) -> str:
        return str(self.state_dir)

    def describe(self, port: int) -> str:
        return f"process {instance_name(port)}"

    async def _pids(self, port: int) -> list[int]:
        return (await self.pool.run(_thd_scan, self.mark)).get(port, [])

    def _marker(self, port: int) -> Path:
        return self.state_dir / f"{instance_name(port)}{MARKER_SUFFIX}"

    async def instances(self) -> dict[int, Instance]:
        return await self.pool.run(_thd_instances, self.mark, self.state_dir)

    def workdir(self, port: int) -> Path:
        """The directory the instance on ``port`` runs in."""
        return self.state_dir

    def log_path(self, port: int) -> Path:
        """Where the instance on ``port`` writes its output (kept after it is removed)."""
        return self.state_dir / f"{instance_name(port)}.log"

    def launch(self, port: int) -> tuple[list[str], dict[str, str]]:
        """What runs on ``port``: the argv and the environment it adds (dockpart-web here)."""
        return ([sys.executable, "-c", LAUNCHER, "-n", "--pidfile=", "--logfile=-",
                 "dockpart-web", "--listen", f"tcp:{port}:interface=127.0.0.1",
                 "--advertise-host", self.advertise_host, "--first-port", str(self.first_port)],
                {"DOCKPART_REDIS": self.redis_url})

    async def start(self, port: int) -> None:
        if await self._pids(port):
            return  # already runs: adopt it
        argv, env = self.launch(port)
        env = {**os.environ, **env, MANAGED_VAR: self.mark, PORT_VAR: str(port)}
        log_path = self.log_path(port)
        try:  # in the pool: the state directory may be on a slow or remote disk
            log_fd = await self.pool.run(_thd_prepare, self.state_dir, self._marker(port),
                                         log_path)
        except OSError as e:
            raise DriverError(f"cannot write {log_path}: {e}") from None
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            self.reactor.spawnProcess(_Instance(port), sys.executable, argv, env=env,
                                      path=str(self.workdir(port)),
                                      childFDs={0: devnull, 1: log_fd, 2: log_fd})
        except OSError as e:
            raise DriverError(f"cannot start {instance_name(port)}: {e}") from None
        finally:
            os.close(devnull)
            os.close(log_fd)
        self.log.info("started {name} (log: {log})", name=instance_name(port), log=log_path)

    async def remove(self, port: int) -> None:
        """SIGTERM, then SIGKILL after the stop timeout."""
        pids = await self._pids(port)
        self._signal(pids, signal.SIGTERM)
        deadline = self.reactor.seconds() + self.stop_timeout
        while pids:
            if self.reactor.seconds() > deadline:
                self._signal(pids, signal.SIGKILL)
                deadline = float("inf")
            await deferLater(self.reactor, 0.05, lambda: None)
            pids = await self._pids(port)
        await self.pool.run(self._marker(port).unlink, missing_ok=True)

    @staticmethod
    def _signal(pids: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
