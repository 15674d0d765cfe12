"""How dockpart-infra runs web app instances: one driver per kind of host.

A driver starts, removes and lists the instances it manages, one per port,
always named :func:`instance_name`.  Every action is idempotent, so a request
finished twice (after a crash) has the effect of finishing it once.  Blocking
work runs in a :class:`ThreadPoolService`, in functions named ``_thd_*`` that
never touch the reactor.
"""

from typing import Protocol

from twisted.application.service import Service
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

#: Container and process names, labels and environment markers share this prefix.
NAME_PREFIX = "dockpart-web-"


def instance_name(port: int) -> str:
    """The one name an instance on ``port`` has, whatever the driver."""
    return f"{NAME_PREFIX}{port}"


class Unavailable(Exception):
    """The engine behind the driver cannot be reached now; try again later."""


class DriverError(Exception):
    """The action cannot succeed as asked (retrying would not help)."""


class Driver(Protocol):
    name: str

    def describe(self, port: int) -> str:
        """How log lines name the instance on ``port``."""

    async def start(self, port: int) -> None:
        """Make sure the instance on ``port`` runs (adopting one that already does)."""

    async def remove(self, port: int) -> None:
        """Stop and remove the instance on ``port``, if there is one."""

    async def managed(self) -> dict[int, bool]:
        """Every managed instance's port, and whether it runs."""

    async def inventory(self) -> dict[int, dict]:
        """Every managed instance's port, and what a person asks of it: ``running`` (bool),
        ``state`` (the engine's word), ``id`` (container or process id) and, where instances
        run on several machines, ``node``."""


class ThreadPoolService(Service):
    """A thread pool of its own, so blocking calls never starve the reactor's pool."""

    def __init__(self, name: str, max_threads: int = 4, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
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
