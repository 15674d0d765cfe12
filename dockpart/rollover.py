"""dockpart-infra's roll-over: an app's instances replaced by a new release's, none lost.

Infra runs it because infra owns the instances: their ports, the driver that starts them, the
queues, the health gate and the drain (:mod:`dockpart.infra_worker`).  The push (or rollback,
or config change) only asks, by naming the release in the app's ``rollover`` field
(:func:`releases.start_rollover`), and reads the news infra writes until the last line says
done or why not.

Each step of :class:`~dockpart.infra_apps.AppsRunner` on an app with ``rollover`` set, instead
of keeping the count:

1. while a new-release spawn is under way, nothing else (one at a time: two cores);
2. while there are more instances than the app's scale, one old instance that serves is
   queued for destroy: it leaves the rotation first and stops after the drain;
3. while fewer new instances serve than the scale, one new spawn is asked for, on a free
   port; the worker starts it beside the old ones and lists it only once it answers;
4. no old instance left in the rotation: the release is live.

So the app never has fewer serving instances than its scale, and never more than one
beyond it.  A new instance that never serves (it exits, never answers within
``--spawn-timeout``, or cannot start) fails the roll-over: the new release's instances
that serve are drained and removed, and the ordinary count brings the app back to its
scale on the live release.  The autoscaler leaves the count alone while ``rollover`` is set.

Which release each instance runs is marked when its spawn is asked for
(:func:`keys.app_instance_releases`), so a restarted infra finishes a roll-over where the
last one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.logger import Logger

from dockpart import apps, keys, records, releases, tier
from dockpart.tier import CannotDestroy, instance_port

log = Logger()

#: How far back in the dead letters a failed spawn's reason is looked for.
_LETTERS_READ = 50


def _pairs(reply) -> dict[str, str]:
    """HGETALL's reply (a flat list, or a dict) as a dict."""
    if isinstance(reply, dict):
        return dict(reply)
    reply = reply or []
    return dict(zip(reply[::2], reply[1::2]))


@dataclass
class Rolling:
    """What infra holds on one app's roll-over."""
    release: str
    began: float
    asked: set[str] = field(default_factory=set)  # new spawns not yet seen serving


async def read_marks(redis, name: str) -> dict[str, str]:
    """Which release each instance URL was asked to run."""
    return _pairs(await redis.call("HGETALL", keys.app_instance_releases(name)))


async def plan(redis, app: apps.App, driver, marks: dict[str, str], lists) -> None:
    """Tell the app's driver which release each port runs; forget marks of URLs gone from
    every list (``marks`` was read before ``lists``: a spawn asked for in between is kept)."""
    everywhere = {url for urls in lists.values() for url in urls}
    stale = [url for url in marks if url not in everywhere]
    if stale:
        await redis.call("HDEL", keys.app_instance_releases(app.name), *stale)
    if not (app.release or app.rollover or any(marks.values())):
        driver.releases, driver.live, driver.known = {}, None, {}
        return
    found = driver.known = {r.id: r for r in await releases.read(redis, app.name)}
    driver.releases = {instance_port(url): found[mark] for url, mark in marks.items()
                       if mark in found and url in everywhere}
    driver.live = found.get(app.release)


class Rollover:
    """One step of an app's roll-over at a time (see the module's docstring)."""

    def __init__(self, redis, host: str, ports: tuple[int, int], clock):
        self.redis = redis
        self.host = host
        self.ports = ports
        self.clock = clock

    async def step(self, one, app: apps.App, lists, marks: dict[str, str]) -> None:
        t, target = app.tier, app.rollover
        rolling = one.rolling
        leaving = set(lists[t.destroy_queue]) | set(lists[t.destroying])
        listed = [url for url in lists[t.servers] if url not in leaving]
        pending = [url for url in (*lists[t.spawn_queue], *lists[t.spawning])
                   if url not in leaving]
        new_up = [url for url in listed if marks.get(url) == target]
        new_pending = [url for url in pending if marks.get(url) == target]
        old = [url for url in (*listed, *pending) if marks.get(url) != target]
        if rolling is None or rolling.release != target:
            rolling = one.rolling = Rolling(target, self.clock.seconds(),
                                            set(new_pending))
            await self._tell(app, f"{len(old)} instance(s) to replace, one at a time, "
                                  f"{app.desired} wanted on {target}" if old or app.desired
                             else f"no instance runs: {target} is live at once")
        everywhere = {url for urls in lists.values() for url in urls}
        for url in sorted(rolling.asked):
            if url in lists[t.servers]:
                rolling.asked.discard(url)
                await self._tell(app, f"{url} runs {target}, answers, and is in the rotation")
            elif url not in everywhere:
                return await self._fail(one, app, new_up, await self._why(app, url, one))
        if new_pending:
            return None
        if old and len(new_up) + len(old) > app.desired:
            serving_old = [url for url in listed if marks.get(url) != target]
            if serving_old:  # an old one still spawning: it is counted once it serves
                await self._retire(app, serving_old[0], marks)
            return None
        if len(new_up) < app.desired:
            if target not in one.driver.known:
                return await self._fail(one, app, new_up, f"release {target} is not recorded")
            urls = await apps.allocate(self.redis, app.name, *self.ports, self.host, 1,
                                       target)
            if not urls:
                return await self._fail(one, app, new_up, f"no free port in "
                                        f"{self.ports[0]}-{self.ports[1]} for a new instance")
            one.driver.assign(instance_port(urls[0]), target)
            rolling.asked.update(urls)
            await self._tell(app, f"starting {urls[0]} on {target} beside the others; it joins "
                                  f"the rotation once it answers")
            return None
        if not old:
            seconds = self.clock.seconds() - rolling.began
            one.rolling = None
            await releases.finish_rollover(
                self.redis, app.name, target, True,
                f"{app.name} serves {target} on {len(new_up)} instance(s) "
                f"({seconds:.1f} s of roll-over)")
            log.info("rollover: {name} serves {release}", name=app.name, release=target)
        return None

    async def _retire(self, app: apps.App, url: str, marks) -> None:
        try:
            await tier.request_destroy_url(self.redis, url, 0, app.tier)
        except CannotDestroy:
            return  # queued meanwhile: seen next step
        await self._tell(app, f"{url} ({marks.get(url) or 'its first command'}) leaves the "
                              f"rotation; it stops after the drain")

    async def _fail(self, one, app: apps.App, new_up: list[str], reason: str) -> None:
        """The new release's serving instances go; the count brings back the live one's."""
        for url in new_up:
            try:
                await tier.request_destroy_url(self.redis, url, 0, app.tier)
            except CannotDestroy:
                pass
        one.rolling = None
        live = app.release or "its first command"
        await releases.finish_rollover(self.redis, app.name, app.rollover, False, reason)
        log.warn("rollover: {name} to {release} failed ({reason}); it keeps {live}",
                 name=app.name, release=app.rollover, reason=reason, live=live)

    async def _why(self, app: apps.App, url: str, one) -> str:
        """Why the spawn of ``url`` never served: its dead letter, and its log's path."""
        reason = f"the new instance {url} never joined the rotation"
        for letter in await records.read_dead_letters(self.redis, _LETTERS_READ):
            if letter.entry == url and letter.list == app.tier.servers:
                reason = letter.reason or reason
                break
        log_path = getattr(one.driver, "log_path", None)
        port = instance_port(url)
        if log_path is not None and port is not None:
            reason += f" (log: {log_path(port)})"
        return reason

    async def _tell(self, app: apps.App, text: str) -> None:
        await releases.tell(self.redis, app.name, text)
