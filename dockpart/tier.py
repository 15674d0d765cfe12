"""The tier: what an instance URL is, and the ``servers`` list and the queues that feed it.

Shared by the web app (which requests spawns and destroys), dockpart-infra (which carries
them out) and the proxies (which read ``servers``).  An instance is ``http://HOST:PORT``;
:func:`parse_instance_url` is the one place that decides what else is refused.

Every change to the lists is one Lua script here, so it is atomic in Redis: two web apps
cannot allocate the same port, and an instance is never in no list while it moves from
"spawning" to ``servers``.  Every change to ``servers`` publishes on
:data:`keys.SERVERS_CHANNEL` so that proxies learn of it at once.

Producers ``LPUSH`` onto a queue; consumers ``LMOVE queue processing RIGHT LEFT``
(oldest first).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from dockpart import keys
from dockpart.redisconn import RedisService

#: The first instance's port: no daemon starts or destroys it; it keeps itself in ``servers``.
FIRST_PORT = 3000

#: Ceiling on instances, the first included, unless a daemon's ``--max-instances`` says
#: otherwise (dockpart-web's /spawn, infra's autoscaler and its dashboard).
DEFAULT_MAX_INSTANCES = 10

#: The highest TCP port: spawned instances take ports above the first one up to it.
MAX_PORT = 65535


class BadInstanceURL(ValueError):
    """An entry that is not ``http://HOST:PORT`` with a port in range."""


def instance_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def parse_instance_url(url: str, low: int = 1, high: int = MAX_PORT) -> tuple[str, int]:
    """Split ``http://HOST:PORT`` into host and port, refusing anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadInstanceURL(f"{url!r} is not a URL: {e}") from None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise BadInstanceURL(f"{url!r} is not of the form http://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise BadInstanceURL(f"{url!r} has more than a host and a port")
    if not low <= port <= high:
        raise BadInstanceURL(f"{url!r} names port {port}, outside {low}-{high}")
    return parts.hostname, port


def instance_port(url: str) -> int | None:
    """The port of an instance URL, or None for a URL that is not one."""
    try:
        return parse_instance_url(url)[1]
    except BadInstanceURL:
        return None


# Ports in an entry: the digits after the last colon.
_PORT = "local function port_of(url) return tonumber(string.match(url, ':(%d+)/?$')) end\n"

_REGISTER = """
if ARGV[2] ~= '' then redis.call('LREM', ARGV[2], 0, ARGV[1]) end
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], 'add ' .. ARGV[1])
return 1
"""

_UNREGISTER = """
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
if removed > 0 then redis.call('PUBLISH', KEYS[2], 'remove ' .. ARGV[1]) end
return removed
"""

_REPLACE = """
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('RPUSH', KEYS[1], unpack(ARGV)) end
redis.call('PUBLISH', KEYS[2], 'replace ' .. table.concat(ARGV, ' '))
return #ARGV
"""

_REQUEST_SPAWN = _PORT + """
-- KEYS: servers, spawn queue, spawning, destroy queue, destroying
-- ARGV: host, first port, max instances, max port
local top = tonumber(ARGV[2])
local leaving = {}
for i = 4, 5 do
  for _, url in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do
    local port = port_of(url)
    if port then leaving[port] = true; if port > top then top = port end end
  end
end
local live, count = {}, 0
for i = 1, 3 do
  for _, url in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do
    local port = port_of(url)
    if port then
      if port > top then top = port end
      if not live[port] and not leaving[port] then live[port] = true; count = count + 1 end
    end
  end
end
if count >= tonumber(ARGV[3]) then return {'full', tostring(count)} end
if top + 1 > tonumber(ARGV[4]) then return {'noport', tostring(top)} end
local url = 'http://' .. ARGV[1] .. ':' .. (top + 1)
redis.call('LPUSH', KEYS[2], url)
return {'ok', url}
"""

_REQUEST_DESTROY = _PORT + """
-- KEYS: servers, destroy queue, destroying; ARGV: first port, a random number
local taken = {}
for i = 2, 3 do
  for _, url in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do taken[url] = true end
end
local candidates = {}
for _, url in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if port_of(url) ~= tonumber(ARGV[1]) and not taken[url] then
    table.insert(candidates, url)
  end
end
if #candidates == 0 then return false end
local url = candidates[(tonumber(ARGV[2]) % #candidates) + 1]
redis.call('LPUSH', KEYS[2], url)
return url
"""

_REQUEST_DESTROY_URL = _PORT + """
-- KEYS: servers, destroy queue, destroying; ARGV: the URL, first port
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return 'unknown' end
if port_of(ARGV[1]) == tonumber(ARGV[2]) then return 'first' end
for i = 2, 3 do
  if redis.call('LPOS', KEYS[i], ARGV[1]) then return 'queued' end
end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 'ok'
"""


_SNAPSHOT = """
local lists = {}
for i, key in ipairs(KEYS) do lists[i] = redis.call('LRANGE', key, 0, -1) end
return lists
"""

#: The lists an instance moves through: asked for, being spawned, live, leaving.
TIER_LISTS = (keys.SERVERS, keys.SPAWN_QUEUE, keys.SPAWNING, keys.DESTROY_QUEUE, keys.DESTROYING)


class InstancesFull(Exception):
    """The ceiling on instances is reached."""


class NoPortLeft(Exception):
    """The next port would be past the highest allowed."""


class CannotDestroy(Exception):
    """A named instance that is not in ``servers`` (``kind`` "unknown"), is the first
    ("first"), or is already leaving ("queued")."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def register(redis: RedisService, url: str, processing: str = "", list_key: str = keys.SERVERS):
    """Add ``url`` to ``servers`` once (and drop it from ``processing``); fires 1 if added."""
    return redis.eval(_REGISTER, [list_key, keys.changes_channel(list_key)], [url, processing])


def unregister(redis: RedisService, url: str, list_key: str = keys.SERVERS):
    """Remove ``url`` from ``servers``; fires how many entries went."""
    return redis.eval(_UNREGISTER, [list_key, keys.changes_channel(list_key)], [url])


def replace(redis: RedisService, urls: list[str], list_key: str):
    """Make ``list_key`` exactly ``urls`` in one step (never empty in between); fires the count."""
    return redis.eval(_REPLACE, [list_key, keys.changes_channel(list_key)], urls)


async def snapshot(redis: RedisService, lists: keys.TierKeys = keys.SEED
                   ) -> dict[str, list[str]]:
    """Every list of :data:`TIER_LISTS` (or an app's ``lists``) as of one moment.

    Read one by one, an instance that moved from "spawning" to ``servers`` between two
    reads was in neither, and the tier looked one instance smaller than it was.
    """
    return dict(zip(lists.lists, await redis.eval(_SNAPSHOT, lists.lists)))


async def request_spawn(redis: RedisService, host: str, first_port: int,
                        max_instances: int, max_port: int = MAX_PORT) -> str:
    """Queue a new instance one port above the highest in use; return its URL."""
    status, value = await redis.eval(
        _REQUEST_SPAWN,
        [keys.SERVERS, keys.SPAWN_QUEUE, keys.SPAWNING, keys.DESTROY_QUEUE, keys.DESTROYING],
        [host, first_port, max_instances, max_port])
    if status == "full":
        raise InstancesFull(f"{value} instances already run or are requested "
                            f"(the ceiling is {max_instances})")
    if status == "noport":
        raise NoPortLeft(f"the highest port in use is {value}; no port is left above it")
    return value


async def request_destroy(redis: RedisService, first_port: int, random_number: int,
                          lists: keys.TierKeys = keys.SEED) -> str | None:
    """Queue one live instance, never the first, for removal; None if there is none."""
    return await redis.eval(
        _REQUEST_DESTROY, [lists.servers, lists.destroy_queue, lists.destroying],
        [first_port, random_number])


async def request_destroy_url(redis: RedisService, url: str, first_port: int,
                              lists: keys.TierKeys = keys.SEED) -> None:
    """Queue the named live instance for removal, with the checks of :func:`request_destroy`."""
    status = await redis.eval(_REQUEST_DESTROY_URL,
                              [lists.servers, lists.destroy_queue, lists.destroying],
                              [url, first_port])
    reasons = {"unknown": f"{url} is not in {lists.servers}",
               "first": f"{url} is the first instance; it is never destroyed",
               "queued": f"{url} is already queued for removal"}
    if status != "ok":
        raise CannotDestroy(status, reasons[status])
