"""A service that does one thing every interval and goes on doing it whatever goes wrong."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Periodic(Service):
    """Calls :meth:`tick` every ``interval`` seconds from start to stop.

    A bare LoopingCall stops for good the first time its call raises; here the error is logged
    and the next call comes on time, so one bad round of checks or reports does not end them
    all.  A tick that returns a Deferred is waited for: two rounds never overlap.
    """

    log = Logger()

    def __init__(self, interval: float, clock, now: bool = False):
        self.interval = interval
        self.clock = clock
        self._now = now  # the first round at start, or one interval after it
        self._loop = LoopingCall(self._round)
        self._loop.clock = clock

    def tick(self):
        raise NotImplementedError

    def startService(self):
        super().startService()
        self._loop.start(self.interval, now=self._now)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _round(self) -> defer.Deferred:
        d = defer.maybeDeferred(self.tick)
        d.addErrback(lambda f: self.log.failure("{name}: one round failed; the next comes on "
                                                "time", f, name=type(self).__name__))
        return d
