"""How dockpart-infra runs web app instances: one driver per kind of host.

A driver (:class:`Driver`) starts, removes and lists the instances it manages, one per
port, always named :func:`instance_name`; it lists them as :class:`Instance` values.  Every
action is idempotent, so a request finished twice (after a crash) has the effect of
finishing it once.  Blocking work runs in a :class:`ThreadPoolService`, in functions named
``_thd_*`` that never touch the reactor.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Protocol
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

#: Container and process names, labels and environment markers share this prefix.
NAME_PREFIX = "dockpart-web-"


def instance_name(port: int) -> str:
    """The one name an instance on ``port`` has, whatever the driver."""
    return f"{NAME_PREFIX}{port}"


#: Where the process and Docker drivers' instances listen (loopback), for the probes.
INSTANCE_HOST = "127.0.0.1"


def probe_host(url: str | None) -> str:
    """Where to probe an instance: the host of the URL its driver placed it at, else loopback."""
    return (urlsplit(url).hostname or INSTANCE_HOST) if url else INSTANCE_HOST


class Status(enum.Enum):
    """What reconcile makes of an instance."""
    RUNNING = "running"  # up, or the engine is restarting it in place (Docker): probe it
    EXITED = "exited"  # stopped and still there: reconcile removes it (and may replace it)
    RESTARTING = "restarting"  # no task up while the engine starts one (Swarm): left to it


@dataclass(frozen=True)
class Instance:
    """One managed instance as its driver sees it."""
    port: int
    status: Status
    #: Where it answers, for a driver that places instances on other hosts (Swarm); None:
    #: on this infra's host, at the port.
    url: str | None = None
    state: str = ""  # the engine's own word, for a person (exited, paused, starting ...)
    id: str | None = None  # container, service or process id
    node: str | None = None  # the machine it runs on, where there are several

    @property
    def running(self) -> bool:
        return self.status is Status.RUNNING

    @property
    def probe_host(self) -> str:
        """The host to probe it on: where it was placed, else loopback."""
        return probe_host(self.url)

    def shown(self) -> dict:
        """As the dashboard describes it."""
        return {**asdict(self), "status": self.status.value, "running": self.running}


class Driver(Protocol):
    """What dockpart-infra asks of a driver."""

    #: ``--driver``'s value.
    name: str

    def describe(self, port: int) -> str:
        """How log lines name the instance on ``port``."""

    async def start(self, port: int) -> str | None:
        """Make sure it runs, adopting one that does: None when it answers at the spawn
        request's URL, else the URL where it answers (a driver that places instances)."""

    async def remove(self, port: int) -> None:
        """Stop and remove it, if there is one."""

    async def instances(self) -> dict[int, Instance]:
        """Every managed instance, by port."""


class Unavailable(Exception):
    """The engine behind the driver cannot be reached now; try again later."""


class DriverError(Exception):
    """The action cannot succeed as asked (retrying would not help)."""


class ThreadPoolService(Service):
    """A thread pool of its own, so blocking calls never starve the reactor's pool."""

    def __init__(self, name: str, *, reactor, max_threads: int = 4):
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        """Fires once calls in progress end; the threads are joined off the reactor thread."""
        super().stopService()
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self.pool.stop)

    def run(self, f, *args, **kw):
        """Run ``f`` in the pool; a Deferred of its result."""
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args, **kw)
