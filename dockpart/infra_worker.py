"""dockpart-infra's worker: carries out the spawn and destroy queues, reliably, and reconciles.

Each request moves atomically from its queue to a processing list
(``LMOVE queue processing RIGHT LEFT``) and leaves it only when done, so a
crash loses nothing: what is left in processing at start is finished before
anything new is taken.  Actions are idempotent (one instance name per port), so
finishing a request twice does it once.  An entry that cannot be carried out
goes to the dead-letter list with the reason.  A spawned URL joins ``servers``
only once the instance answers HTTP; a destroyed one leaves ``servers`` first
and its instance stops only after a drain period.  Beside the queues, the
reconciler (:mod:`dockpart.infra_reconcile`) keeps ``servers`` and the instances
in agreement.
"""

import os
import socket
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from dockpart import keys, periodic, probe, tier
from dockpart.drivers import (INSTANCE_HOST, Driver, DriverError, Status, Unavailable,
                              probe_host)
from dockpart.infra_reconcile import Reconciler
from dockpart.periodic import Every
from dockpart.records import DeadLetter, add_dead_letter
from dockpart.tier import BadInstanceURL, parse_instance_url
from dockpart.redisconn import RedisService, RedisUnavailable

#: Seconds after start during which a dependency not answering yet is not reported.
STARTUP_GRACE = 1.0
#: Seconds between looks at a new instance until it answers.
HEALTH_POLL = 0.05
#: Seconds between looks, while a new instance does not answer yet, at whether it exited (a
#: release that crashes at start is refused at once, not after the whole --spawn-timeout).
EXIT_LOOK = 0.5
#: The first wait before a retry while the engine or Redis is away; it doubles up to retry_max.
RETRY_FIRST = 0.2

# KEYS: the lease; ARGV: this infra's id, milliseconds.  1 if this infra holds it now.
_HOLD_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""

@dataclass(frozen=True)
class Queue:
    """A request queue and the processing list its requests wait in while handled."""
    name: str
    waiting: str
    processing: str


SPAWN = Queue("spawn", keys.SPAWN_QUEUE, keys.SPAWNING)
DESTROY = Queue("destroy", keys.DESTROY_QUEUE, keys.DESTROYING)
QUEUES = (SPAWN, DESTROY)


class BadEntry(Exception):
    """A queue entry that no action could carry out; it is dead-lettered."""


@dataclass(frozen=True)
class EntryRules:
    """Which instance URLs this infra may act on."""
    host: str
    low: int
    high: int
    first_port: int
    #: Swarm: instances run on the cluster's nodes, so an entry's host is where its task runs.
    any_host: bool = False

    def check(self, queue: Queue, entry: str) -> int:
        """The port ``entry`` names, or BadEntry saying why it cannot be done."""
        try:
            host, port = parse_instance_url(entry)
        except BadInstanceURL as e:
            raise BadEntry(f"not a valid instance URL: {e}") from None
        if host != self.host and not self.any_host:
            raise BadEntry(f"host {host!r} is not this infra's host {self.host!r}")
        if queue.name == DESTROY.name and port == self.first_port:
            raise BadEntry(f"the first instance (port {port}) is never destroyed")
        if not self.low <= port <= self.high:
            raise BadEntry(f"port {port} is outside the allowed range {self.low}-{self.high}")
        return port

    def owns(self, url: str) -> int | None:
        """The port of a ``servers`` entry that the reconciler looks after, else None."""
        try:
            return self.check(DESTROY, url)
        except BadEntry:
            return None

    def is_first(self, url: str) -> bool:
        """Whether ``url`` is the first instance (probed by reconcile, never started by it)."""
        try:
            return parse_instance_url(url) == (self.host, self.first_port)
        except BadInstanceURL:
            return False


class Outage(periodic.Outage):
    """The engine or Redis is unreachable: said once, and once that it is reachable again.

    Failures before ``quiet_until`` (connections still being made at start) are not news.
    """

    log = Logger()

    def __init__(self, what: str, clock):
        super().__init__(self.log, "{what} is unreachable ({error}); keeping every request and "
                                   "retrying", "{what} is reachable again", clock=clock,
                         what=what)


def retry_policy(most: float):
    """The wait before each retry while the engine or Redis is away, as a function of the
    attempt (from 0): RETRY_FIRST, doubling, never more than ``most``, without jitter (one
    infra retries; there is no crowd to spread)."""
    return backoffPolicy(RETRY_FIRST, most, factor=2.0, jitter=lambda: 0.0)


class Worker(MultiService):
    """Takes requests off the queues and carries them out; its :class:`Reconciler` beside
    it keeps ``servers`` and the instances in agreement."""

    log = Logger()

    def __init__(self, redis: RedisService, driver: Driver, rules: EntryRules, *,
                 interval: float = 0.2,
                 reconcile_interval: float = 2.0, drain: float = 3.0, spawn_timeout: float = 30.0,
                 max_active: int = 10, retry_max: float = 5.0, lease: float = 5.0,
                 probe_timeout: float = 1.0, keep_count: bool = True, probe=None,
                 lists: keys.TierKeys = keys.SEED, reactor):
        super().__init__()
        self.redis = redis
        # Whose queues and ``servers``: the seed app's, or an app's (dockpart.infra_apps).
        self.lists = lists
        self.queues = (Queue(SPAWN.name, lists.spawn_queue, lists.spawning),
                       Queue(DESTROY.name, lists.destroy_queue, lists.destroying))
        self.driver = driver
        self.rules = rules
        self.interval = interval
        self.reconcile_interval = reconcile_interval
        self.drain = drain
        self.spawn_timeout = spawn_timeout
        self.max_active = max_active
        self.retry_max = retry_max
        self.lease = lease
        self.probe_timeout = probe_timeout
        # Whether an instance that exited is replaced (True), or only removed because someone
        # else (the autoscaler) decides how many instances there are.
        self.keep_count = keep_count
        # (reactor, port) -> Deferred or coroutine: whether the instance answers.
        self.probe = probe or self._answers
        self.reactor = reactor
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._leased: bool | None = None  # not known before the first look
        self.outages = {Unavailable: Outage(f"the {driver.name} driver's engine", reactor),
                        RedisUnavailable: Outage("Redis", reactor)}
        self._tasks: set[defer.Deferred] = set()
        self._inflight: Counter = Counter()  # (queue, entry) pairs in hand
        self.port_locks: dict[int, defer.DeferredLock] = {}
        self._recovery: list[defer.Deferred] | None = None
        self._retry_delay = retry_policy(retry_max)
        self._redis_failures = 0  # in a row, for the next take's delay
        self._take_error: str | None = None  # the last one logged, until a take works
        self._next_take = 0.0
        self.taking = Every(interval, reactor, self._tick, now=True)
        self.taking.setServiceParent(self)
        # Beside the queues, on its own interval; once more as soon as the lease is held.
        self.reconciler = Reconciler(self, reconcile_interval)
        self.reconciler.setServiceParent(self)

    @property
    def leased(self) -> bool:
        """Whether this infra holds the lease on the queues (as of its last look)."""
        return bool(self._leased)

    # -- life cycle

    def startService(self):
        for outage in self.outages.values():
            outage.quiet_until = self.reactor.seconds() + STARTUP_GRACE
        super().startService()
        self.log.info("dockpart-infra started (driver {driver}, ports {low}-{high})",
                      driver=self.driver.name, low=self.rules.low, high=self.rules.high)

    def stopService(self):
        """Stop taking requests; unfinished ones stay in processing for the next start."""
        tasks = [super().stopService(), *self._tasks]  # the loops, a reconcile pass too
        for task in tasks[1:]:  # a cancelled task leaves self._tasks at once
            task.cancel()
        done = defer.DeferredList(tasks)
        if self._leased:  # the next infra need not wait for the lease to expire
            done.addCallback(lambda _: self.redis.eval(_RELEASE_LEASE, [self.lists.lease],
                                                       [self.id]))
            done.addErrback(lambda f: None)
        return done

    # -- taking requests

    def take_now(self):
        """Look at the queues now, not at the next --interval (an app activating from zero)."""
        return self._tick()

    def _tick(self):
        if self.reactor.seconds() < self._next_take:
            return None
        d = defer.ensureDeferred(self._take())
        d.addErrback(self._tick_failed)
        return d

    def _tick_failed(self, failure):
        if failure.check(RedisUnavailable):
            self.outages[RedisUnavailable].failed(failure.value)
            self._next_take = self.reactor.seconds() + self._retry_delay(self._redis_failures)
            self._redis_failures += 1
        elif failure.getErrorMessage() != self._take_error:
            # Once, not every --interval: a broken queue key would flood the log.
            self._take_error = failure.getErrorMessage()
            self.log.failure("taking requests (said once until it works or fails otherwise)",
                             failure)

    async def _hold_lease(self) -> bool:
        """Renew this infra's lease on the queues; whether it holds it."""
        held = await self.redis.eval(_HOLD_LEASE, [self.lists.lease],
                                     [self.id, int(self.lease * 1000)])
        if bool(held) != self._leased:
            self._leased = bool(held)
            if held:
                self.log.info("holding the lease on the queues ({key})", key=self.lists.lease)
                self.reconciler.tick()
            else:
                holder = await self.redis.call("GET", self.lists.lease)
                self.log.warn("another dockpart-infra ({holder}) works these queues; waiting "
                              "until its lease ({key}) ends", holder=holder, key=self.lists.lease)
                self._recovery = None  # when the lease is back, first finish what it left
        return self._leased

    async def _take(self) -> None:
        # After each wait for Redis: stopped meanwhile, nothing new begins (stopService
        # cancelled what was in hand; an entry just moved waits in processing for the next start).
        if not await self._hold_lease() or not self.running:
            return
        if self._recovery is None:
            left = await self._left_in_processing()
            if not self.running:
                return
            if left:
                self.log.info("finishing {n} request(s) left in processing from before",
                              n=len(left))
            self._recovery = [self._begin(queue, entry) for queue, entry in left]
        if any(not d.called for d in self._recovery):
            return  # what was left from before is finished first
        more = True
        while more and len(self._tasks) < self.max_active:
            more = False
            for queue in self.queues:
                if len(self._tasks) >= self.max_active:
                    break
                entry = await self.redis.call("LMOVE", queue.waiting, queue.processing,
                                              "RIGHT", "LEFT")
                if not self.running:
                    return
                if entry is not None:
                    self._begin(queue, entry)
                    more = True
        self.outages[RedisUnavailable].ok()
        self._redis_failures = 0
        if self._take_error is not None:
            self._take_error = None
            self.log.info("taking requests works again")

    async def _left_in_processing(self) -> list[tuple[Queue, str]]:
        """What processing holds that is not in hand here, oldest first."""
        left = []
        busy = Counter(self._inflight)
        for queue in self.queues:
            for entry in reversed(await self.redis.call("LRANGE", queue.processing, 0, -1)):
                if busy[queue, entry]:
                    busy[queue, entry] -= 1  # still in hand here (the lease came back)
                else:
                    left.append((queue, entry))
        return left

    def _begin(self, queue: Queue, entry: str) -> defer.Deferred:
        self._inflight[queue, entry] += 1
        d = defer.ensureDeferred(self._handle(queue, entry))
        self._tasks.add(d)
        d.addErrback(self._task_failed, queue, entry)
        d.addBoth(lambda _: self._end(d, queue, entry))
        return d

    def _task_failed(self, failure, queue: Queue, entry: str) -> None:
        """Said, not swallowed: the entry stays in processing until the next start."""
        if not failure.check(defer.CancelledError):
            self.log.failure("{queue} {entry} left in processing", failure,
                             queue=queue.name, entry=entry)

    def _end(self, d: defer.Deferred, queue: Queue, entry: str) -> None:
        self._tasks.discard(d)
        self._inflight[queue, entry] -= 1

    async def _handle(self, queue: Queue, entry: str) -> None:
        try:
            port = self.rules.check(queue, entry)
        except BadEntry as e:
            return await self._dead_letter(queue, entry, str(e))
        async with self.port_lock(port):
            try:
                if queue.name == SPAWN.name:
                    await self._spawn(entry, port)
                else:
                    await self._destroy(entry, port)
            except defer.CancelledError:
                raise
            except DriverError as e:
                await self._dead_letter(queue, entry, str(e))
            except Exception as e:
                self.log.failure("{queue} {entry} failed", queue=queue.name, entry=entry)
                await self._dead_letter(queue, entry, f"unexpected error: {e!r}")

    @asynccontextmanager
    async def port_lock(self, port: int):
        """One action at a time on a port; a port with a lock here is busy for reconcile."""
        lock = self.port_locks.setdefault(port, defer.DeferredLock())
        await lock.acquire()
        try:
            yield
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self.port_locks.pop(port, None)

    async def _retrying(self, action):
        """Run ``action()`` until its engine and Redis answer; log each outage once."""
        attempt = 0
        outage = None
        while True:
            try:
                result = await action()
            except (Unavailable, RedisUnavailable) as e:
                outage = self.outages[type(e)]
                outage.failed(e)
                await deferLater(self.reactor, self._retry_delay(attempt), lambda: None)
                attempt += 1
            else:
                if outage is not None:
                    outage.ok()
                return result

    async def _dead_letter(self, queue: Queue, entry: str, reason: str) -> None:
        self.log.warn("dead-lettered {queue} request {entry!r}: {reason}",
                      queue=queue.name, entry=entry, reason=reason)
        letter = DeadLetter(queue.name, entry, reason, self.reactor.seconds(),
                            list=self.lists.servers)
        await self._retrying(lambda: add_dead_letter(self.redis, queue.processing, letter))

    # -- the actions

    async def _spawn(self, url: str, port: int) -> None:
        what = self.driver.describe(port)
        began = self.reactor.seconds()
        found = (await self._retrying(self.driver.instances)).get(port)
        if not (found and found.running) and await probe.accepts(self.reactor, INSTANCE_HOST,
                                                                 port):
            raise DriverError(f"port {port} is in use by something dockpart does not manage")
        self.log.info("starting {what} for {url}", what=what, url=url)
        try:
            # A driver that places instances (swarm) says where this one answers.
            placed = await self._retrying(lambda: self.driver.start(port))
        except DriverError:
            await self._retrying(lambda: self.driver.remove(port))
            raise
        served = placed or url
        answered = await self._answers_within(port, probe_host(placed), self.spawn_timeout)
        if answered is not True:
            await self._retrying(lambda: self.driver.remove(port))
            raise DriverError(f"{what} exited before it answered HTTP; removed it"
                              if answered == "exited" else
                              f"{what} did not answer HTTP within {self.spawn_timeout:g} s; "
                              f"removed it")
        await self._retrying(lambda: tier.register(self.redis, served, self.lists.spawning,
                                                   self.lists.servers))
        if served != url:  # in servers first: the instance is never in no list
            await self._retrying(lambda: self.redis.call("LREM", self.lists.spawning, 1, url))
        self.log.info("{url} answers and is in servers ({seconds:.2f} s)",
                      url=served, seconds=self.reactor.seconds() - began)

    async def reconcile(self) -> None:
        """One pass of the reconciler now (see :meth:`Reconciler.reconcile`)."""
        await self.reconciler.reconcile()

    def _answers(self, reactor, port: int, host: str = INSTANCE_HOST) -> defer.Deferred:
        return probe.answers(reactor, host, port, timeout=self.probe_timeout)

    async def _answers_within(self, port: int, host: str, timeout: float) -> bool | str:
        """True once the instance answers; ``"exited"`` when it stopped first; else False."""
        deadline = self.reactor.seconds() + timeout
        next_look = self.reactor.seconds() + EXIT_LOOK
        while self.reactor.seconds() < deadline:
            if await defer.ensureDeferred(self.probe(self.reactor, port, host)):
                return True
            if self.reactor.seconds() >= next_look:
                next_look = self.reactor.seconds() + EXIT_LOOK
                try:
                    found = (await self.driver.instances()).get(port)
                    if found is not None and found.status is Status.EXITED:
                        return "exited"
                except Unavailable:
                    pass  # the engine is away: the deadline decides
            await deferLater(self.reactor, HEALTH_POLL, lambda: None)
        return False

    async def _destroy(self, url: str, port: int) -> None:
        await self._retrying(lambda: tier.unregister(self.redis, url, self.lists.servers))
        self.log.info("{url} left servers; draining for {drain:g} s", url=url, drain=self.drain)
        await deferLater(self.reactor, self.drain, lambda: None)
        await self._retrying(lambda: self.driver.remove(port))
        await self._retrying(lambda: self.redis.call("LREM", self.lists.destroying, 1, url))
        self.log.info("destroyed {what} ({url})", what=self.driver.describe(port), url=url)
