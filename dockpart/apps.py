"""Apps: the user's own web apps on the tier, as Redis records every daemon reads the same way.

An app is a name (a DNS label), what runs it (``image`` for the docker and swarm drivers,
``command`` for the process driver; either way the instance's port is in ``PORT``), the host
names it answers (``domains``, besides ``NAME.<apps domain>``), and how many instances it
has: ``desired`` (set by ``dockpart apps scale``, or by the autoscaler within ``min``/``max``
when ``autoscale`` is on).  ``release`` names the live release (``git push``, rollback or
config: :mod:`dockpart.releases`); ``rollover`` the release infra is rolling the instances over
to, while it does (the autoscaler leaves the count alone meanwhile).

Records (names in :mod:`dockpart.keys`):

- ``dockpart:apps``: the set of app names; ``dockpart:app:NAME``: its hash (:class:`App`).
- ``dockpart:app:NAME:servers`` and its queues (:func:`keys.app_tier`): what ``servers`` and
  its queues are to the seed app, worked by the same infra worker.
- ``dockpart:apps:ports``: port -> app, so that no two apps ever share a port.
- ``dockpart:apps:destroyed``: apps destroyed whose instances infra still drains and removes.
- Every change to a record is published on ``dockpart:apps:changed`` (``create NAME``,
  ``update NAME``, ``destroy NAME``); every change to an app's list on its own channel.

Every change is one Lua script, run through any client with ``eval(script, keys, args)``:
the daemons' :class:`~dockpart.redisconn.RedisService` (a Deferred) or the ``dockpart``
command's blocking client (the value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dockpart import keys

#: A DNS label (RFC 1123): lower-case letters, digits and ``-``, not at either end, 1 to 63.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

#: Default scale settings of a new app.
DEFAULT_TARGET = 4.0
DEFAULT_MAX = 10


class BadApp(ValueError):
    """A name, domain or setting that cannot be; nothing was changed."""


def check_name(name: str) -> str:
    """``name`` when it is a DNS label, else BadApp saying what an app name is."""
    if not isinstance(name, str) or not _LABEL.match(name):
        raise BadApp(f"app name {name!r} is not a DNS label: use 1 to 63 lower-case letters, "
                     f"digits and '-', starting and ending with a letter or digit")
    return name


def check_domain(domain: str) -> str:
    """A host name (labels joined by dots), lower-cased; BadApp otherwise."""
    host = domain.lower().rstrip(".")
    if not host or len(host) > 253 or not all(_LABEL.match(part) for part in host.split(".")):
        raise BadApp(f"domain {domain!r} is not a host name (e.g. shop.example.com)")
    return host


@dataclass(frozen=True)
class App:
    """One app's record, as ``dockpart:app:NAME`` holds it."""
    name: str
    image: str = ""
    command: str = ""
    domains: tuple[str, ...] = ()
    desired: int = 1
    autoscale: bool = False
    min: int = 1
    max: int = DEFAULT_MAX
    target: float = DEFAULT_TARGET
    release: str = ""
    rollover: str = ""
    #: Seconds without a request in flight or held after which an app with ``min`` 0 is
    #: drained to zero instances (0: never; ``dockpart apps autoscale --scale-to-zero-after``).
    zero_after: float = 0.0
    #: Not a field of the hash: the URLs in the app's ``servers`` when it was read.
    instances: tuple[str, ...] = field(default=(), compare=False)

    def encode(self) -> dict[str, str]:
        return {"image": self.image, "command": self.command, "domains": " ".join(self.domains),
                "desired": str(self.desired), "autoscale": "1" if self.autoscale else "0",
                "min": str(self.min), "max": str(self.max), "target": f"{self.target:g}",
                "release": self.release, "rollover": self.rollover,
                "zero_after": f"{self.zero_after:g}"}

    @classmethod
    def decode(cls, name: str, flat: list[str] | dict, instances=()) -> App:
        """A record as read; a field that does not parse keeps its default."""
        raw = dict(zip(flat[::2], flat[1::2])) if isinstance(flat, list) else dict(flat)
        numbers: dict[str, Any] = {}
        for name_, kind in (("desired", int), ("min", int), ("max", int), ("target", float),
                            ("zero_after", float)):
            try:
                value = kind(raw[name_])
            except (KeyError, ValueError):
                continue
            if value >= 0:
                numbers[name_] = value
        return cls(name, image=raw.get("image", ""), command=raw.get("command", ""),
                   domains=tuple(raw.get("domains", "").split()), release=raw.get("release", ""),
                   rollover=raw.get("rollover", ""),
                   autoscale=raw.get("autoscale") == "1", instances=tuple(instances), **numbers)

    @property
    def activates(self) -> bool:
        """Autoscaled from zero: a request at zero instances is held while one starts."""
        return self.autoscale and self.min == 0

    @property
    def tier(self) -> keys.TierKeys:
        return keys.app_tier(self.name)

    def as_json(self) -> dict:
        return {"name": self.name, "image": self.image or None, "command": self.command or None,
                "domains": list(self.domains), "desired": self.desired,
                "autoscale": ({"min": self.min, "max": self.max, "target": self.target,
                               **({"scale_to_zero_after": self.zero_after}
                                  if self.zero_after else {})}
                              if self.autoscale else None),
                "release": self.release or None, "rollover": self.rollover or None,
                "instances": list(self.instances)}


def _flat(mapping: dict[str, str]) -> list[str]:
    return [item for pair in mapping.items() for item in pair]


# KEYS: apps, record, destroyed, channel; ARGV: name, domains, record prefix, field/values...
_CREATE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 'exists' end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 'destroying' end
local mine = {}
for d in string.gmatch(ARGV[2], '%S+') do mine[d] = true end
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local theirs = redis.call('HGET', ARGV[3] .. other, 'domains') or ''
  for d in string.gmatch(theirs, '%S+') do
    if mine[d] then return 'domain ' .. d .. ' ' .. other end
  end
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[4], 'create ' .. ARGV[1])
return 'ok'
"""

# KEYS: apps, record, channel; ARGV: name, field/values...
_UPDATE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'unknown' end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('PUBLISH', KEYS[3], 'update ' .. ARGV[1])
return 'ok'
"""

# KEYS: apps, record, destroyed, channel, roll-over news; ARGV: name.  The record stays
# until infra has removed the app's instances (it says how they run); the routes go at once;
# a push waiting on a roll-over is told.
_DESTROY = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'unknown' end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[2], 'desired', '0', 'autoscale', '0')
local rolling = redis.call('HGET', KEYS[2], 'rollover')
if rolling and rolling ~= '' then  -- a push waits on it: it ends here
  redis.call('HSET', KEYS[2], 'rollover', '')
  redis.call('LPUSH', KEYS[5], cjson.encode({done = false, release = rolling,
                                             reason = 'the app was destroyed'}))
end
redis.call('PUBLISH', KEYS[4], 'destroy ' .. ARGV[1])
return 'ok'
"""

# KEYS: the set to read; ARGV: record prefix, one name or ''.  {name, hash, servers, ...}
_READ = """
local names = ARGV[2] ~= '' and {ARGV[2]} or redis.call('SMEMBERS', KEYS[1])
table.sort(names)
local out = {}
for _, name in ipairs(names) do
  if redis.call('SISMEMBER', KEYS[1], name) == 1 then
    table.insert(out, name)
    table.insert(out, redis.call('HGETALL', ARGV[1] .. name))
    table.insert(out, redis.call('LRANGE', ARGV[1] .. name .. ':servers', 0, -1))
  end
end
return out
"""

# KEYS: destroyed, record, ports, channel, the app's lists...; ARGV: name.
# Run once infra removed the last instance of a destroyed app.
_FORGET = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  if held[i + 1] == ARGV[1] then redis.call('HDEL', KEYS[3], held[i]) end
end
redis.call('PUBLISH', KEYS[4], 'forget ' .. ARGV[1])
return 1
"""

# KEYS: ports, the app's spawn queue, its instances' releases; ARGV: app, low, high, host,
# how many, release.  The lowest free ports of the range, each held for the app, each spawn
# queued, each URL marked with the release it is to run.
_ALLOCATE = """
local urls, port, want = {}, tonumber(ARGV[2]), tonumber(ARGV[5])
while #urls < want and port <= tonumber(ARGV[3]) do
  if redis.call('HSETNX', KEYS[1], port, ARGV[1]) == 1 then
    local url = 'http://' .. ARGV[4] .. ':' .. port
    redis.call('HSET', KEYS[3], url, ARGV[6])
    redis.call('LPUSH', KEYS[2], url)
    table.insert(urls, url)
  end
  port = port + 1
end
return urls
"""

# KEYS: ports; ARGV: app, ports...  Gives back ports the app no longer uses.
_RELEASE_PORTS = """
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i]); n = n + 1
  end
end
return n
"""

_STATUS = {"exists": "an app named {name} exists already",
           "destroying": "app {name} is still being destroyed; try again in a moment",
           "unknown": "no app named {name}"}


def _outcome(status, name: str):
    if status == "ok":
        return None
    if isinstance(status, bytes):
        status = status.decode()
    if status.startswith("domain "):
        _, domain, other = status.split(" ", 2)
        raise BadApp(f"domain {domain} belongs to app {other} already")
    raise BadApp(_STATUS.get(status, "{name}: " + status).format(name=name))


def _then(result, f):
    """``f(result)`` now for a blocking client, later for a Deferred."""
    if hasattr(result, "addCallback"):
        return result.addCallback(f)
    return f(result)


def create(redis, app: App):
    """Add ``app``; BadApp when the name or a domain is taken."""
    check_name(app.name)
    return _then(redis.eval(_CREATE, [keys.APPS, keys.app_record(app.name), keys.APPS_DESTROYED,
                                      keys.APPS_CHANNEL],
                            [app.name, " ".join(app.domains), keys.APP_PREFIX,
                             *_flat(app.encode())]),
                 lambda status: _outcome(status, app.name))


def update(redis, name: str, **fields):
    """Set fields of an existing app's record (values as :meth:`App.encode` writes them)."""
    check_name(name)
    return _then(redis.eval(_UPDATE, [keys.APPS, keys.app_record(name), keys.APPS_CHANNEL],
                            [name, *_flat({k: str(v) for k, v in fields.items()})]),
                 lambda status: _outcome(status, name))


def scale(redis, name: str, count: int):
    """A fixed number of instances (the autoscaler lets go of the app)."""
    if count < 0:
        raise BadApp(f"the number of instances cannot be negative ({count})")
    return update(redis, name, desired=count, autoscale=0)


def autoscale(redis, name: str, low: int, high: int, target: float, desired: int,
              zero_after: float = 0.0):
    """The autoscaler decides the count within ``low``..``high`` at ``target`` in flight each;
    with ``low`` 0, ``zero_after`` idle seconds take the app to zero instances."""
    if not 0 <= low <= high or high < 1:
        raise BadApp(f"need 0 <= --min <= --max and --max >= 1 (got {low} and {high})")
    if target <= 0:
        raise BadApp(f"--target must be positive (got {target:g})")
    if zero_after < 0 or (zero_after and low):
        raise BadApp(f"--scale-to-zero-after needs --min 0 and a number of seconds >= 0 "
                     f"(got --min {low}, {zero_after:g})")
    return update(redis, name, autoscale=1, min=low, max=high, target=f"{target:g}",
                  desired=min(max(desired, low, 1 if low else 0), high),
                  zero_after=f"{zero_after:g}")


def destroy(redis, name: str):
    """Routes go at once; infra drains and removes the instances, then forgets the record."""
    check_name(name)
    return _then(redis.eval(_DESTROY, [keys.APPS, keys.app_record(name), keys.APPS_DESTROYED,
                                       keys.APPS_CHANNEL, keys.app_rollover_news(name)], [name]),
                 lambda status: _outcome(status, name))


def _decode_all(flat) -> list[App]:
    return [App.decode(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat or ()), 3)]


def read_all(redis, which: str = keys.APPS):
    """Every app of ``which`` (live apps, or ``keys.APPS_DESTROYED``), by name."""
    return _then(redis.eval(_READ, [which], [keys.APP_PREFIX, ""]), _decode_all)


def read_one(redis, name: str):
    """One live app, with its instances; BadApp when there is none."""
    check_name(name)

    def one(apps):
        if not apps:
            raise BadApp(f"no app named {name}")
        return apps[0]
    return _then(redis.eval(_READ, [keys.APPS], [keys.APP_PREFIX, name]),
                 lambda flat: one(_decode_all(flat)))


def forget(redis, name: str):
    """The last instance of a destroyed app is gone: its records go too."""
    return redis.eval(_FORGET, [keys.APPS_DESTROYED, keys.app_record(name), keys.APP_PORTS,
                                keys.APPS_CHANNEL, *keys.app_keys(name)], [name])


# KEYS: apps, the app's activation key, the activation channel; ARGV: name, proxy, held.
# The key is a hash: per proxy (or --workers process), the requests it holds.  The first ask
# of many creates it (1); a proxy whose held requests grew updates its count (2): each wakes
# infra.  Any other ask changes nothing (0).
_ACTIVATE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
local first = redis.call('EXISTS', KEYS[2]) == 0
local before = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if not first and tonumber(ARGV[3]) <= before then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], 'activate ' .. ARGV[1])
if first then return 1 end
return 2
"""

# KEYS: activation keys.  Per key, the requests held over every proxy (-1: no activation).
_ASKED = """
local out = {}
for i, key in ipairs(KEYS) do
  local total = -1
  if redis.call('EXISTS', key) == 1 then
    total = 0
    for _, n in ipairs(redis.call('HVALS', key)) do total = total + (tonumber(n) or 0) end
  end
  out[i] = total
end
return out
"""


def activate(redis, name: str, proxy: str, held: int):
    """Ask for the app's first instance (however many ask, infra sees one activation and the
    sum of what they hold); 1: this asked first, 2: it told a larger count, 0: nothing new."""
    return redis.eval(_ACTIVATE, [keys.APPS, keys.app_activation(name), keys.APPS_ACTIVATION],
                      [name, proxy, held])


def asked(redis, names: list[str]):
    """Per app of ``names`` (at least one) with an activation pending, the requests held."""
    return _then(redis.eval(_ASKED, [keys.app_activation(n) for n in names], []),
                 lambda held: {n: int(h) for n, h in zip(names, held) if int(h) >= 0})


def allocate(redis, name: str, low: int, high: int, host: str, count: int,
             release: str = ""):
    """Queue ``count`` spawns of ``release`` for the app on the lowest free ports; fires
    their URLs."""
    return redis.eval(_ALLOCATE, [keys.APP_PORTS, keys.app_tier(name).spawn_queue,
                                  keys.app_instance_releases(name)],
                      [name, low, high, host, count, release])


def release_ports(redis, name: str, ports):
    return redis.eval(_RELEASE_PORTS, [keys.APP_PORTS], [name, *ports])


def ports_of(flat: list[str], name: str) -> set[int]:
    """The ports ``dockpart:apps:ports`` (as HGETALL read it) holds for ``name``."""
    return {int(port) for port, app in zip(flat[::2], flat[1::2]) if app == name}
