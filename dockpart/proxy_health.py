"""dockpart-proxy's active health checks: ``GET PATH`` on every listed backend each interval.

Passive health (a refused connection, a time-out) only sees backends that get traffic; a frozen
instance still accepts connections, so only asking it tells it is gone, and only asking again
tells it is back.  The question is :mod:`dockpart.probe`'s, asked the same way everywhere.
"""

from __future__ import annotations

from twisted.logger import Logger

from dockpart import probe
from dockpart.periodic import Periodic
from dockpart.proxy_backends import Backend, BackendSet


class HealthChecks(Periodic):
    """Marks each backend down when its probe fails or times out, up when it answers again.

    A check still waiting for its answer is not started twice: a frozen backend costs one
    pending probe, and the others keep their pace.
    """

    log = Logger()

    def __init__(self, backends: BackendSet, path: str, interval: float, timeout: float,
                 reactor):
        super().__init__(interval, reactor)
        self.backends = backends
        self.path = path
        self.timeout = timeout
        self.reactor = reactor
        self._checking: set[str] = set()

    def tick(self) -> None:
        self.check_all()

    def check_all(self) -> None:
        for backend in list(self.backends.ring):
            if backend.url not in self._checking:
                self.check(backend)

    def check(self, backend: Backend):
        self._checking.add(backend.url)
        d = probe.status(self.reactor, backend.host, backend.port, self.path, self.timeout,
                         user_agent="dockpart-proxy health check")
        d.addCallbacks(self._answered, self._no_answer, callbackArgs=(backend,),
                       errbackArgs=(backend,))
        d.addErrback(lambda f: self.log.failure("health check of {url}", f, url=backend.url))
        d.addBoth(lambda _: self._checking.discard(backend.url))
        return d

    def _answered(self, code: int, backend: Backend) -> None:
        if probe.healthy_status(code):
            self.backends.healthy(backend)
        else:
            self.backends.failed(backend, count=False)

    def _no_answer(self, failure, backend: Backend) -> None:
        self.backends.failed(backend, count=False)
