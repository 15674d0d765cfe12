"""dockpart-infra's autoscaler: sizes the tier on the load the proxies measured.

The policy is the Kubernetes Horizontal Pod Autoscaler's, on requests in flight per instance:
``desired = ceil(current * per_instance / target)``, no change within a tolerance band around
the target, at most double (or +step) per scale-up, a short cooldown between scale-ups, and a
long stabilisation before scaling down (the highest recommendation over the window wins, so a
dip does not shed instances).  Instances still spawning count toward ``current`` and carry no
load yet, so a warming instance is never spawned twice.  A spawn that was dead-lettered holds
further scale-ups for a while that doubles with each failure in a row: asking again after
every cooldown would only fail the same way (a broken image, a port taken by a stranger).

:class:`Policy` is the arithmetic (no I/O; tested with ``Clock``).  :class:`Autoscaler` is the
service: while this infra holds the lease it reads every proxy's report, asks the policy and
acts only through the spawn and destroy queues (:func:`tier.request_spawn`,
:func:`tier.request_destroy`), so the health gate, the drain, dead letters and reconcile apply
unchanged.  Missing or stale figures mean no decision, never a scale-down.
"""

import math
import random
from collections import deque
from dataclasses import dataclass

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from dockpart import keys, load, records, tier
from dockpart.records import Decision, DeadLetter, LoadReport
from dockpart.periodic import Outage, Periodic
from dockpart.redisconn import RedisService, RedisUnavailable

#: Decisions kept in keys.AUTOSCALE_DECISIONS.
DECISIONS_KEPT = 50
#: Newest dead letters read per evaluation, to learn of spawns that failed.
LETTERS_READ = 20
#: Longest part of a dead letter's reason quoted in a decision.
REASON_QUOTED = 120

@dataclass(frozen=True)
class Settings:
    min_instances: int = 1
    max_instances: int = tier.DEFAULT_MAX_INSTANCES
    target: float = 4.0  # requests in flight per instance
    tolerance: float = 0.1
    step: int = 4  # a scale-up may add max(current, step) instances
    cooldown: float = 5.0  # seconds between scale-ups
    window: float = 60.0  # scale-down stabilisation, seconds
    failed_spawn_hold: float = 10.0  # no scale-up this long after a dead-lettered spawn,
    failed_spawn_hold_max: float = 300.0  # doubling with each failure in a row up to this


@dataclass(frozen=True)
class Observed:
    """The inputs of one evaluation."""
    ready: int  # instances in servers, not leaving
    spawning: int  # instances asked for that do not serve yet
    inflight: int  # requests in flight over every proxy


class Policy:
    """The arithmetic: a recommendation per evaluation, cooldown and stabilisation windows."""

    def __init__(self, settings: Settings, clock):
        self.settings = settings
        self.clock = clock
        self.started = clock.seconds()
        self.recommendations: deque[tuple[float, int]] = deque()
        self.last_scale_up = -math.inf
        self.failures = 0  # dead-lettered spawns noticed in a row, with no success between
        self.failure_reason = ""
        self.held_until = -math.inf  # no scale-up before this, after a failed spawn
        self._hold = backoffPolicy(settings.failed_spawn_hold, settings.failed_spawn_hold_max,
                                   factor=2.0, jitter=lambda: 0.0)

    def restart(self) -> None:
        """Forget the history (this infra just took the lease: it saw none of it)."""
        self.started = self.clock.seconds()
        self.recommendations.clear()
        self.last_scale_up = -math.inf
        self.spawns_succeed()

    def spawn_failed(self, reason: str) -> float:
        """A spawn was dead-lettered: hold scale-ups (longer for each failure in a row).

        Returns the seconds held from now.
        """
        hold = self._hold(self.failures)
        self.failures += 1
        self.failure_reason = reason
        self.held_until = self.clock.seconds() + hold
        return hold

    def spawns_succeed(self) -> None:
        """A scale-up after the last failure went through: the next failure holds briefly."""
        self.failures = 0
        self.failure_reason = ""
        self.held_until = -math.inf

    def unknown(self, reason: str, seen: Observed) -> Decision:
        """No decision: the size stays what it is, whatever the load might be."""
        current = seen.ready + seen.spawning
        return Decision(self.clock.seconds(), current, seen.spawning, 0, None,
                        self.settings.target, current, "none", reason)

    def decide(self, seen: Observed, low: int | None = None, high: int | None = None) -> Decision:
        """What to do now; ``low``/``high`` override the settings' min/max when given."""
        s = self.settings
        low = s.min_instances if low is None else low
        high = s.max_instances if high is None else high
        now = self.clock.seconds()
        current = seen.ready + seen.spawning
        if not current:
            return self.unknown("no instance is in servers yet", seen)
        per = seen.inflight / current  # instances still spawning carry nothing yet
        ratio = per / s.target
        if abs(ratio - 1) <= s.tolerance:
            wanted, why = current, f"within {s.tolerance:.0%} of the target"
        else:
            wanted, why = math.ceil(current * ratio), None
        if wanted > current:
            limit = current + max(current, s.step)
            if wanted > limit:
                wanted, why = limit, f"at most +{max(current, s.step)} per step"
        if wanted > high:
            wanted, why = high, f"at most {high} instances"
        elif wanted < low:
            wanted, why = low, f"at least {low} instance{'s' if low != 1 else ''}"
        self.recommendations.append((now, wanted))
        while self.recommendations and self.recommendations[0][0] < now - s.window:
            self.recommendations.popleft()
        inputs = (f"{current} instance{'s' if current != 1 else ''}"
                  + (f" ({seen.spawning} spawning)" if seen.spawning else "")
                  + f", {per:.1f} in flight each (target {s.target:g})")

        def decision(desired, action, note):
            reason = f"{inputs} -> {desired}" + (f" ({note})" if note else "")
            return Decision(now, current, seen.spawning, seen.inflight, round(per, 3),
                            s.target, desired, action, reason)

        if wanted > current:
            held = self.held_until - now
            if held > 0:
                return decision(current, "hold", f"wants {wanted}; a spawn was dead-lettered "
                                                 f"({self.failure_reason}), next try in "
                                                 f"{held:.1f} s")
            wait = self.last_scale_up + s.cooldown - now
            if wait > 0:
                return decision(current, "hold", f"wants {wanted}; scale-up cooldown, "
                                                 f"{wait:.1f} s left")
            self.last_scale_up = now
            return decision(wanted, "up", why)
        if wanted < current:
            highest = min(max(n for _, n in self.recommendations), high)
            if now - self.started < s.window:
                return decision(current, "hold", f"wants {wanted}; no scale-down in the first "
                                                  f"{s.window:g} s (stabilisation window)")
            if highest < current:
                return decision(highest, "down", why if highest == wanted else
                                f"highest recommendation in the last {s.window:g} s")
            return decision(current, "hold", f"wants {wanted}; highest recommendation in the "
                                              f"last {s.window:g} s is {highest}")
        return decision(current, "hold", why)


def observe(lists: dict[str, list[str]], reports: list[LoadReport],
            tier_keys: keys.TierKeys = keys.SEED) -> Observed:
    """Current size from the tier's lists (as request_spawn counts it) and load from reports
    (those of the proxies' rotation over ``tier_keys.servers``: the seed's, or an app's)."""
    t = tier_keys
    leaving = set(lists[t.destroy_queue]) | set(lists[t.destroying])
    ready = set(lists[t.servers]) - leaving
    spawning = (set(lists[t.spawn_queue]) | set(lists[t.spawning])) - ready - leaving
    ours = [r for r in reports if r.list == t.servers]
    inflight = sum(f["inflight"] for f in load.merge(ours).values())
    # Requests a proxy holds for an app at zero (dockpart.proxy_hold) are load too.
    inflight += sum(r.held for r in ours)
    return Observed(len(ready), len(spawning), inflight)


class AutoscaleOptions(usage.Options):
    """dockpart-infra's autoscaling options (a mix-in for its Options)."""

    optFlags = [["autoscale", None, "Size the tier on the proxies' measured load (off: only "
                                    "/spawn and /destroy change it)."]]
    optParameters = [
        ["min-instances", None, 1, "Autoscale: fewest instances (1: the first instance).", int],
        ["max-instances", None, tier.DEFAULT_MAX_INSTANCES,
         "Most instances: the autoscaler's ceiling and the dashboard's (match dockpart-web's "
         "--max-instances).", int],
        ["target-inflight", None, 4.0, "Autoscale: requests in flight per instance aimed at.",
         float],
        ["evaluate-interval", None, 2.0, "Autoscale: seconds between evaluations.", float],
        ["tolerance", None, 0.1, "Autoscale: no change within this fraction of the target.",
         float],
        ["scale-up-step", None, 4, "Autoscale: a scale-up adds at most max(current, this).", int],
        ["scale-up-cooldown", None, 5.0, "Autoscale: seconds between scale-ups.", float],
        ["scale-down-window", None, 60.0, "Autoscale: seconds of stabilisation before a "
                                          "scale-down (the highest recommendation wins).", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not 1 <= self["min-instances"] <= self["max-instances"]:
            raise usage.UsageError(f"need 1 <= --min-instances ({self['min-instances']}) <= "
                                   f"--max-instances ({self['max-instances']})")
        for name in ("target-inflight", "evaluate-interval"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be positive, not {self[name]:g}")
        if not 0 <= self["tolerance"] < 1:
            raise usage.UsageError(f"--tolerance must be from 0 to below 1, "
                                   f"not {self['tolerance']:g}")
        if self["scale-up-step"] < 1:
            raise usage.UsageError("--scale-up-step must be at least 1")
        for name in ("scale-up-cooldown", "scale-down-window"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")


def settings_from(config) -> Settings:
    return Settings(config["min-instances"], config["max-instances"], config["target-inflight"],
                    config["tolerance"], config["scale-up-step"], config["scale-up-cooldown"],
                    config["scale-down-window"])


class Autoscaler(Periodic):
    """Evaluates every ``interval`` while ``worker`` holds the lease; acts through the queues."""

    log = Logger()

    def __init__(self, redis: RedisService, worker, policy: Policy, *, host: str, first_port: int,
                 max_port: int = tier.MAX_PORT, interval: float = 2.0, clock):
        super().__init__(interval, clock)
        self.redis = redis
        self.worker = worker  # has .leased
        self.policy = policy
        self.host = host
        self.first_port = first_port
        self.max_port = max_port
        self.clock = clock
        self._leased = False
        self._last: tuple | None = None  # (action, desired) of the last decision recorded
        self._bad_limits: str | None = None
        self._redis = Outage(self.log, "autoscale: Redis is away ({error}); no decision until "
                                       "it is back", "autoscale: Redis is back")
        self._evaluation: defer.Deferred | None = None  # under way
        self._letters_seen = clock.seconds()  # dead letters up to this time are known
        self._last_up = -math.inf  # when this autoscaler last asked for spawns

    def startService(self):
        super().startService()
        s = self.policy.settings
        self.log.info("autoscaling {low}-{high} instances at {target:g} in flight each "
                      "(every {interval:g} s; scale-down after {window:g} s)",
                      low=s.min_instances, high=s.max_instances, target=s.target,
                      interval=self.interval, window=s.window)

    def stopService(self):
        """Stop evaluating; one under way ends here too, so a stopped infra asks for nothing."""
        super().stopService()
        if self._evaluation is not None:
            self._evaluation.cancel()

    def tick(self) -> defer.Deferred | None:
        """One evaluation unless one is still running; never raises (the loop must go on)."""
        if self._evaluation is not None:
            return None
        d = self._evaluation = defer.ensureDeferred(self.evaluate())
        d.addErrback(self._failed)
        d.addBoth(self._done)
        return d

    def _done(self, result):
        self._evaluation = None
        return result

    def _failed(self, failure) -> None:
        if failure.check(defer.CancelledError):
            return  # stopped
        if failure.check(RedisUnavailable):
            self._redis.failed(failure.getErrorMessage())
        else:
            self.log.failure("autoscale evaluation", failure)

    async def evaluate(self) -> Decision | None:
        leased = bool(self.worker.leased)
        if leased != self._leased:
            self._leased = leased
            self.policy.restart()
            self._letters_seen = self.clock.seconds()
        if not leased:
            return None
        low, high = await self.limits()
        lists = await tier.snapshot(self.redis)
        # After the lists: a spawn that left them for the dead letters is among these.
        letters = await records.read_dead_letters(self.redis, LETTERS_READ)
        reports = await records.read_load_reports(self.redis, self.clock.seconds())
        self._redis.ok()
        seen = observe(lists, reports)
        self._learn_from_spawns(letters, seen)
        if not reports:
            decision = self.policy.unknown(
                f"no load figures (no proxy reported in the last {records.REPORT_TTL:g} s)", seen)
        else:
            decision = self.policy.decide(seen, low, high)
        await self._record(decision)
        if decision.action == "up":
            self._last_up = self.clock.seconds()
            await self._spawn(decision.desired - decision.current, decision.desired, high)
        elif decision.action == "down":
            await self._destroy(decision.current - decision.desired)
        return decision

    def _learn_from_spawns(self, letters: list[DeadLetter], seen: Observed) -> None:
        """Hold scale-ups after a spawn newer than the last one known was dead-lettered;
        end the hold once a scale-up asked for after it has no spawn left and no letter."""
        newest: tuple[float, DeadLetter] | None = None
        for letter in letters:
            at = letter.time
            if letter.queue == "spawn" and at is not None and at > self._letters_seen \
                    and letter.list in (None, keys.SERVERS) \
                    and (newest is None or at > newest[0]):
                newest = (at, letter)
        if newest is not None:
            self._letters_seen, letter = newest
            reason = letter.reason
            if len(reason) > REASON_QUOTED:
                reason = reason[:REASON_QUOTED - 3] + "..."
            hold = self.policy.spawn_failed(reason)
            self.log.warn("autoscale: the spawn of {entry} was dead-lettered ({reason}); no "
                          "scale-up for {hold:g} s ({n} failed in a row)",
                          entry=letter.entry, reason=reason, hold=hold,
                          n=self.policy.failures)
        elif self.policy.failures and not seen.spawning and self._last_up > self._letters_seen:
            self.policy.spawns_succeed()
            self.log.info("autoscale: spawns succeed again")

    async def limits(self) -> tuple[int, int]:
        """min/max from keys.AUTOSCALE_LIMITS when valid there, else the options'."""
        s = self.policy.settings
        limits = await records.read_limits(self.redis)
        low = s.min_instances if limits.min is None else limits.min
        high = s.max_instances if limits.max is None else limits.max
        problem = limits.problem
        if problem is None and not 1 <= low <= high <= s.max_instances:
            problem = f"min {low}, max {high}: need 1 <= min <= max <= {s.max_instances}"
        if problem is not None:
            if problem != self._bad_limits:
                self._bad_limits = problem
                self.log.warn("autoscale: ignoring {key} {problem}", key=keys.AUTOSCALE_LIMITS,
                              problem=problem)
            return s.min_instances, s.max_instances
        self._bad_limits = None
        return low, high

    async def _record(self, decision: Decision) -> None:
        key = (decision.action, decision.desired, decision.action == "none" and decision.reason)
        new = decision.action in ("up", "down") or key != self._last
        self._last = key
        if new:
            log = self.log.warn if decision.action == "none" else self.log.info
            log("autoscale {action}: {reason}", action=decision.action, reason=decision.reason)
        await records.record_decision(self.redis, decision, DECISIONS_KEPT, new)

    async def _spawn(self, count: int, desired: int, high: int) -> None:
        # The ceiling passed is the size wanted: the script counts what is live or asked for,
        # so a repeated or concurrent request never takes the tier past it.
        for _ in range(count):
            try:
                url = await tier.request_spawn(self.redis, self.host, self.first_port,
                                               min(desired, high), self.max_port)
            except (tier.InstancesFull, tier.NoPortLeft) as e:
                self.log.info("autoscale: no more spawns now: {e}", e=e)
                return
            self.log.info("autoscale: spawn requested for {url}", url=url)

    async def _destroy(self, count: int) -> None:
        for _ in range(count):
            url = await tier.request_destroy(self.redis, self.first_port,
                                             random.getrandbits(31))
            if url is None:
                return  # the rest are still spawning, or the first instance
            self.log.info("autoscale: destroy requested for {url}", url=url)


def attach(config, redis: RedisService, worker, parent, reactor) -> None:
    """Add the autoscaler to dockpart-infra's services when ``--autoscale`` is on."""
    if not config["autoscale"]:
        return
    low, high = config["port-range"]
    Autoscaler(redis, worker, Policy(settings_from(config), reactor),
               host=config["advertise-host"], first_port=config["first-port"], max_port=high,
               interval=config["evaluate-interval"], clock=reactor).setServiceParent(parent)
