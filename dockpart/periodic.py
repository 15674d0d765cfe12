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


class Every(Periodic):
    """A Periodic that calls ``tick`` given: for a service with several loops of its own."""

    def __init__(self, interval: float, clock, tick, now: bool = False):
        super().__init__(interval, clock, now)
        self._tick = tick

    def tick(self):
        return self._tick()


class Outage:
    """Says once that something fails, and once that it works again: a retry loop that logs
    every attempt would flood the log for as long as Redis or the engine is away.

    ``failing`` and ``back`` are log formats (``back`` None: the recovery is not news); their
    fields are the ones given to :meth:`failed` and :meth:`ok`, plus ``error``.  Failures
    before ``quiet_until`` (connections still being made at start) are not news either.
    The lines go to ``log``, the owner's logger, so they carry its namespace.
    """

    def __init__(self, log: Logger, failing: str, back: str | None = None, *, clock=None,
                 **fields):
        self.log = log
        self.failing = failing
        self.back = back
        self.clock = clock
        self.fields = fields  # given with every line, e.g. what=...
        self.down = False
        self.quiet_until = 0.0

    def failed(self, error=None, *, failure=None, **fields) -> bool:
        """Whether this failure was said (the first of an outage, once the quiet is over).

        With ``failure``, the traceback goes with it (an error no one expected)."""
        if self.down:
            return False
        if self.clock is not None and self.clock.seconds() < self.quiet_until:
            return False
        self.down = True
        if failure is not None:
            self.log.failure(self.failing, failure, error=error, **self.fields, **fields)
        else:
            self.log.warn(self.failing, error=error, **self.fields, **fields)
        return True

    def ok(self, **fields) -> None:
        """It works (again): the end of the outage is said, if one was."""
        if self.down:
            self.down = False
            if self.back is not None:
                self.log.info(self.back, **self.fields, **fields)
