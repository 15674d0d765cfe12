"""dockpart-infra's reconciler: keeps ``servers`` and the instances that run in agreement.

Beside the queue worker (:mod:`dockpart.infra_worker`), on its own interval and while that
worker holds the lease: it probes what is listed and what runs (an instance that does not
answer leaves ``servers`` until it answers again, and is not destroyed), and replaces an
instance that exited.  Ports with a request queued or in the worker's hands are left to it.
"""

from twisted.internet import defer

from dockpart import tier
from dockpart.drivers import INSTANCE_HOST, Instance, Status, Unavailable
from dockpart.periodic import Periodic
from dockpart.redisconn import RedisUnavailable
from dockpart.tier import instance_url

class Reconciler(Periodic):
    """Every ``interval`` seconds, one pass (:meth:`reconcile`) for ``worker``'s tier.

    The worker lends what both need: the Redis handle, the driver, the entry rules, the probe,
    its per-port locks (a port in the worker's hands is busy here) and its outage logs.
    """

    def __init__(self, worker, interval: float):
        super().__init__(interval, worker.reactor)
        self.worker = worker
        self._passes: set[defer.Deferred] = set()  # under way
        self._reconciling = defer.DeferredLock()  # one pass at a time

    def tick(self) -> defer.Deferred:
        d = defer.ensureDeferred(self.reconcile())
        self._passes.add(d)
        d.addErrback(self._failed)
        d.addBoth(lambda _: self._passes.discard(d))
        return d

    def stopService(self):
        """A pass left running would list or unlist instances after the stop."""
        super().stopService()
        passes = list(self._passes)
        for d in passes:
            d.cancel()
        return defer.DeferredList(passes)

    def _failed(self, failure):
        if failure.check(defer.FirstError):  # from the probes, gathered
            failure = failure.value.subFailure
        if failure.check(defer.CancelledError):
            return  # stopped
        if failure.check(Unavailable, RedisUnavailable):
            self.worker.outages[failure.type].failed(failure.value)
        else:  # logged here, with the reason; Periodic would only say a round failed
            self.log.failure("reconciling", failure)

    async def reconcile(self) -> None:
        """Make ``servers`` list exactly the instances that answer; replace those that exited.

        An instance that runs but does not answer (frozen, overloaded) leaves ``servers`` and
        comes back once it answers: it is never destroyed for it.  The first instance is
        probed too (it puts itself back when it answers again).  Ports with a request queued
        or in hand are left to that request.
        """
        async with self._reconciling:
            if self.worker.leased:
                await self._reconcile()

    async def _reconcile(self) -> None:
        # The lists (as of one moment) first, instances second: an instance registered in
        # between is never dropped.
        t = self.worker.lists
        lists = await tier.snapshot(self.worker.redis, t)
        instances = await self.worker.driver.instances()
        rules = self.worker.rules
        pending = {rules.owns(url) for key, urls in lists.items() if key != t.servers
                   for url in urls}
        listed, first = {}, None
        for url in lists[t.servers]:
            port = rules.owns(url)
            if port is not None:
                listed[port] = url
            elif rules.is_first(url):
                first = url

        def busy(port):
            return port in pending or port in self.worker.port_locks

        def moved(port):  # swarm: the instance runs now on another node than listed
            found = instances.get(port)
            return found is not None and found.url is not None and listed[port] != found.url

        def away(port):  # gone, or Swarm restarts its task: back once placed and answering
            found = instances.get(port)
            return found is None or found.status is Status.RESTARTING

        # Where each instance answers, for those this infra's rules cover.
        urls = {port: self._url(found) for port, found in instances.items()}
        ours = {port: url for port, url in urls.items() if rules.owns(url) is not None}
        for port, found in sorted(instances.items()):
            if found.status is Status.EXITED and port in ours and not busy(port):
                await self._replace_exited(port, listed.get(port))
        for port, url in listed.items():
            if (away(port) or moved(port)) and not busy(port):
                if await tier.unregister(self.worker.redis, url, t.servers):
                    self.log.info("reconcile: {what} is {gone}; removed {url} from servers",
                                  what=self.worker.driver.describe(port), url=url,
                                  gone="restarting" if port in instances else "gone")
        await self._probe_and_list(
            {port: (ours[port], found.probe_host) for port, found in instances.items()
             if found.running and port in ours and not busy(port)},
            listed, first, busy)
        for outage in self.worker.outages.values():
            outage.ok()

    def _url(self, found: Instance) -> str:
        """Where an instance answers: the URL its driver reports (swarm places instances on
        nodes), else this infra's host."""
        return found.url or instance_url(self.worker.rules.host, found.port)

    async def _probe_and_list(self, candidates: dict[int, tuple[str, str]],
                              listed: dict[int, str], first: str | None, busy) -> None:
        """Probe every running instance (and a listed first one) at once; list what answers.

        ``candidates``: per port, the URL to list and the host to probe it on.
        """
        if first is not None:
            candidates[self.worker.rules.first_port] = (first, INSTANCE_HOST)
        ports = sorted(candidates)
        answers = await defer.gatherResults(
            [defer.ensureDeferred(self.worker.probe(self.clock, port, candidates[port][1]))
             for port in ports],
            consumeErrors=True)
        for port, answered in zip(ports, answers):
            url = candidates[port][0]
            # Asked again after the probe: a destroy taken meanwhile must not see it come back.
            if busy(port):
                continue
            what = ("the first instance" if url == first else self.worker.driver.describe(port))
            was_listed = listed.get(port) == url or url == first
            if answered and not was_listed:
                if await tier.register(self.worker.redis, url, "", self.worker.lists.servers):
                    self.log.info("reconcile: {what} answers; added {url} back to servers",
                                  what=what, url=url)
            elif not answered and was_listed:
                if await tier.unregister(self.worker.redis, url, self.worker.lists.servers):
                    self.log.warn("reconcile: {what} did not answer within {timeout:g} s; "
                                  "removed {url} from servers until it answers again",
                                  what=what, url=url, timeout=self.worker.probe_timeout)

    async def _replace_exited(self, port: int, listed_url: str | None) -> None:
        """An instance that exited leaves servers and is removed; a spawn replaces it unless
        someone else owns the count."""
        url = instance_url(self.worker.rules.host, port)
        what = self.worker.driver.describe(port)
        async with self.worker.port_lock(port):
            await tier.unregister(self.worker.redis, listed_url or url, self.worker.lists.servers)
            if self.worker.keep_count:
                # Queued before the removal: a crash in between still ends with the instance.
                await self.worker.redis.call("LPUSH", self.worker.lists.spawn_queue, url)
            await self.worker.driver.remove(port)
        self.log.warn("reconcile: {what} exited; removed it{then}", what=what,
                      then=f" and queued a spawn of {url} in its place" if self.worker.keep_count
                      else " (the count of instances is the autoscaler's)")
