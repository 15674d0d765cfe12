"""How dockpart-infra runs web app instances: one driver per kind of host.

A driver starts, removes and lists the instances it manages, one per port,
always named :func:`instance_name`.  Its interface: ``name``, ``describe(port)``
(how log lines name an instance), and the coroutines ``start(port)`` (make sure
it runs, adopting one that does; None when it answers at the spawn request's URL,
or the URL where it answers, for a driver that places instances on other hosts:
swarm), ``remove(port)`` (stop and remove it, if there is one) and ``managed()``
(every managed instance's port, and whether it runs: False for one that exited and
is still there, which reconcile replaces; swarm: the URL where it runs, or None while
Swarm itself restarts it, which reconcile leaves to Swarm) and
``inventory()`` (per port what a person asks of it, for the dashboard: ``running``,
``state`` (the engine's word), ``id`` (container or process id) and, where instances
run on several machines, ``node``).  Every
action is idempotent, so a request finished twice (after a crash) has the effect
of finishing it once.  Blocking work runs in a :class:`ThreadPoolService`, in
functions named ``_thd_*`` that never touch the reactor.
"""

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
