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
#: :mod:`dockpart.load`) under ``proxy_load(proxy_id)`` with an expiry of
#: ``load.REPORT_TTL`` seconds, and scores its id by the report's time in LOAD_PROXIES.
LOAD_PREFIX = "dockpart:load:proxy:"
LOAD_PROXIES = "dockpart:load:proxies"


def proxy_load(proxy_id: str) -> str:
    """The key of one proxy process's latest load report."""
    return LOAD_PREFIX + proxy_id


#: The autoscaler (dockpart-infra --autoscale): its last decisions (JSON, newest first,
#: capped), the size it wants now, and min/max set at run time (a hash with fields
#: ``min`` and ``max``; the dashboard writes it; absent fields mean the options' values).
AUTOSCALE_DECISIONS = "dockpart:autoscale:decisions"
AUTOSCALE_DESIRED = "dockpart:autoscale:desired"
AUTOSCALE_LIMITS = "dockpart:autoscale:limits"
