"""Periodic: the rounds go on, on time, after one raised or failed, and stop with the service."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger

from dockpart.periodic import Outage, Periodic


class Rounds(Periodic):
    def __init__(self, clock, outcomes, now=False):
        super().__init__(2.0, clock, now=now)
        self.outcomes = list(outcomes)
        self.times = []

    def tick(self):
        self.times.append(self.clock.seconds())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome == "raise":
            raise RuntimeError("a bad round")
        if outcome == "fail":
            return defer.fail(RuntimeError("a failed round"))
        return outcome


def test_a_round_that_raises_or_fails_is_logged_and_the_next_comes_on_time():
    clock = Clock()
    rounds = Rounds(clock, ["raise", "fail", None])
    logged = []
    rounds.log = Logger(observer=logged.append)
    rounds.startService()
    clock.pump([2.0] * 4)
    assert rounds.times == [2.0, 4.0, 6.0, 8.0]
    assert [str(e["log_failure"].value) for e in logged] == ["a bad round", "a failed round"]
    rounds.stopService()
    clock.pump([2.0] * 3)
    assert rounds.times == [2.0, 4.0, 6.0, 8.0]


def test_rounds_never_overlap_and_may_start_at_once():
    clock = Clock()
    pending = defer.Deferred()
    rounds = Rounds(clock, [pending], now=True)
    rounds.startService()
    clock.pump([2.0] * 3)
    assert rounds.times == [0.0]  # the first round is still running
    pending.callback(None)
    clock.advance(2.0)
    assert rounds.times == [0.0, 8.0]
    rounds.stopService()


def test_an_outage_is_said_once_and_its_end_once_in_the_owners_words():
    from twisted.logger import formatEvent, globalLogPublisher
    said = []
    observer = lambda event: said.append(formatEvent(event))  # noqa: E731
    outage = Outage(Logger(namespace="test.outage"), "{what} fails ({error})",
                    "{what} works again", what="the thing")
    quiet = Outage(Logger(namespace="test.outage"), "it fails ({error})")  # no end said
    globalLogPublisher.addObserver(observer)
    try:
        assert outage.failed("refused") and not outage.failed("refused again")
        outage.ok()
        outage.ok()
        quiet.failed("x")
        quiet.ok()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert said == ["the thing fails (refused)", "the thing works again", "it fails (x)"]
