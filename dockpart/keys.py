"""Every Redis key and channel dockpart uses, in one place.

``servers`` keeps the seed's exact name: the proxy, the web app and the
infrastructure daemon all agree on it, and so can a seed-era tool.
"""

from __future__ import annotations

#: The live instances' URLs, the list the proxy rotates over.
SERVERS = "servers"



def changes_channel(list_key: str) -> str:
    """The pub/sub channel that hears about every change to a list of backends.

    ``dockpart:servers:changed`` for ``servers``; a key in our namespace is not prefixed
    twice: ``dockpart:deploy:live:changed`` for ``dockpart:deploy:live``.
    """
    namespaced = list_key if list_key.startswith("dockpart:") else f"dockpart:{list_key}"
    return f"{namespaced}:changed"


#: Pub/sub channel that hears about every change to SERVERS.
SERVERS_CHANNEL = changes_channel(SERVERS)

#: The front route of git-push deployment: the live slice's URL (``dockpart deploy switch``).
DEPLOY_LIVE = "dockpart:deploy:live"

#: Spawn requests: URLs queued by /spawn, moved to SPAWNING while handled.
SPAWN_QUEUE = "dockpart:spawn:queue"
SPAWNING = "dockpart:spawn:processing"

#: Destroy requests: URLs queued by /destroy, moved to DESTROYING while handled.
DESTROY_QUEUE = "dockpart:destroy:queue"
DESTROYING = "dockpart:destroy:processing"

#: Requests that could not be carried out, as JSON with the reason.
DEAD_LETTERS = "dockpart:deadletter"

#: Held (with an expiry) by the one dockpart-infra that works the queues of this Redis.
INFRA_LEASE = "dockpart:infra:lease"

#: The most recently visited URLs (newest first, trimmed).
RECENT = "dockpart:recent"

#: Uploaded images waiting for /meow (newest first).
IMAGES = "dockpart:images"

#: Namespace of the keys that users name in /set/<key> and /get/<key>.
USER_PREFIX = "dockpart:user:"


def user_key(name: str) -> str:
    """The Redis key for a user-chosen cache key, kept apart from ours."""
    return USER_PREFIX + name


#: Load figures: each dockpart-proxy process writes its report (JSON, see
#: :class:`dockpart.records.LoadReport`) under ``proxy_load(proxy_id)`` with an expiry of
#: ``records.REPORT_TTL`` seconds, and scores its id by the report's time in LOAD_PROXIES.
LOAD_PREFIX = "dockpart:load:proxy:"
LOAD_PROXIES = "dockpart:load:proxies"


def proxy_load(proxy_id: str) -> str:
    """The key of one proxy process's latest load report."""
    return LOAD_PREFIX + proxy_id


#: The autoscaler (dockpart-infra --autoscale): its last decisions (records.Decision, newest first,
#: capped), the size it wants now, and min/max set at run time (a hash with fields
#: ``min`` and ``max``; the dashboard writes it; absent fields mean the options' values).
AUTOSCALE_DECISIONS = "dockpart:autoscale:decisions"
AUTOSCALE_DESIRED = "dockpart:autoscale:desired"
AUTOSCALE_LIMITS = "dockpart:autoscale:limits"


class TierKeys:
    """The lists one tier's instances move through: asked for, being spawned, live, leaving,
    and the lease on its queues.  The seed app's are :data:`SEED`; an app's,
    :func:`app_tier`."""

    __slots__ = ("servers", "spawn_queue", "spawning", "destroy_queue", "destroying", "lease")

    def __init__(self, servers: str, spawn_queue: str, spawning: str, destroy_queue: str,
                 destroying: str, lease: str):
        self.servers = servers
        self.spawn_queue = spawn_queue
        self.spawning = spawning
        self.destroy_queue = destroy_queue
        self.destroying = destroying
        self.lease = lease

    @property
    def lists(self) -> tuple[str, ...]:
        """Every list, ``servers`` first."""
        return (self.servers, self.spawn_queue, self.spawning, self.destroy_queue,
                self.destroying)

    def __eq__(self, other):
        return isinstance(other, TierKeys) and self.lists == other.lists

    def __hash__(self):
        return hash(self.lists)


#: The seed app's tier, with the seed's key names.
SEED = TierKeys(SERVERS, SPAWN_QUEUE, SPAWNING, DESTROY_QUEUE, DESTROYING, INFRA_LEASE)

#: Apps (``dockpart apps``): the set of app names, and per app a hash (see
#: :mod:`dockpart.apps`).  Every change to an app's record is published on APPS_CHANNEL
#: with the app's name.
APPS = "dockpart:apps"
APPS_CHANNEL = "dockpart:apps:changed"
APP_PREFIX = "dockpart:app:"

#: Apps destroyed whose instances infra still has to drain and remove (a set of names).
APPS_DESTROYED = "dockpart:apps:destroyed"

#: The port each app instance holds (a hash port -> app name): one range, never shared.
APP_PORTS = "dockpart:apps:ports"


def app_record(name: str) -> str:
    """The hash of one app's settings (image or command, domains, scale, release)."""
    return APP_PREFIX + name


def app_tier(name: str) -> TierKeys:
    """An app's own lists, mirroring the seed's: ``dockpart:app:NAME:servers`` and so on."""
    base = f"{APP_PREFIX}{name}:"
    return TierKeys(base + "servers", base + "spawn:queue", base + "spawn:processing",
                    base + "destroy:queue", base + "destroy:processing", base + "lease")


def app_activation(name: str) -> str:
    """An app at zero asked for an instance (scale to zero): set once by the first proxy
    holding a request for it, deleted by infra when an instance serves or the spawn failed."""
    return f"{APP_PREFIX}{name}:activate"


#: Activation notices: proxies publish ``activate NAME`` (infra acts at once), infra
#: publishes ``failed NAME SECONDS`` (proxies answer the held requests 503 and hold none
#: for that long).
APPS_ACTIVATION = "dockpart:apps:activation"

#: Pattern of the change channels of every app's ``servers`` list.
APP_SERVERS_PATTERN = changes_channel(APP_PREFIX + "*:servers")


def app_of_channel(channel: str) -> str | None:
    """The app whose ``servers`` channel this is, else None."""
    head, tail = APP_PREFIX, ":servers:changed"
    if channel.startswith(head) and channel.endswith(tail):
        return channel[len(head):-len(tail)]
    return None


#: Releases (``git push`` to an app, :mod:`dockpart.releases`): per app a hash id -> release
#: (JSON), the counter that numbers them, the release each instance runs (a hash URL -> id,
#: written when its spawn is asked for), and the roll-over's news for whoever waits on it (a
#: list of JSON lines, the oldest on the right).
def app_releases(name: str) -> str:
    return f"{APP_PREFIX}{name}:releases"


def app_release_counter(name: str) -> str:
    return f"{APP_PREFIX}{name}:releases:last"


def app_instance_releases(name: str) -> str:
    return f"{APP_PREFIX}{name}:instances"


def app_rollover_news(name: str) -> str:
    return f"{APP_PREFIX}{name}:rollover:news"


def app_log(name: str) -> str:
    """A capped stream of the app's instances' output lines (fields ``port`` and ``line``)."""
    return f"{APP_PREFIX}{name}:log"


def app_keys(name: str) -> tuple[str, ...]:
    """Every key of an app besides its record, for forgetting a destroyed app."""
    return (*app_tier(name).lists, app_releases(name), app_release_counter(name),
            app_instance_releases(name), app_rollover_news(name), app_log(name),
            app_activation(name))


#: The driver the dockpart-infra that runs apps uses (``process``, ``docker``, ``swarm``): a
#: push asks it whether to build an image or check out a directory.
APPS_DRIVER = "dockpart:infra:driver"
