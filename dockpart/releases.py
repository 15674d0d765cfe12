"""An app's releases, as Redis records both the push (a blocking program) and infra read.

A release is what an app's instances run, fixed once made: a checked-out directory of one
commit and the ``web`` command of its ``Procfile`` (the process driver, Piku's way), or an
image built from its ``Dockerfile`` and run by digest (the docker drivers); either way with
the app's environment (``dockpart apps config``) as it was when the release was made, so a
config change is a new release, and a rollback brings back the old environment too.

Releases are numbered per app (``v1``, ``v2``, ...) and kept in the hash
:func:`keys.app_releases`.  The app's record names the live one (``release``) and, while
infra replaces the instances, the one it rolls over to (``rollover``); only one roll-over
runs per app at a time.  Infra tells how it goes on :func:`keys.app_rollover_news`, a list
whose last line says whether the roll-over is done or why it failed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields

from dockpart import keys
from dockpart.apps import BadApp, _then, check_name

#: An environment variable's name, as POSIX shells take them.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class BadRelease(ValueError):
    """A pushed tree that cannot be a release; the message says why, for the pusher."""


@dataclass(frozen=True)
class Release:
    id: str
    commit: str = ""
    at: float = 0.0
    #: Process driver: the command its instances run (``sh -c``), in ``dir``.
    command: str = ""
    dir: str = ""
    #: Docker drivers: ``REGISTRY/NAME@sha256:...``, what its instances run.
    image: str = ""
    env: dict = field(default_factory=dict)
    #: How it came to be: ``push 1a2b3c4``, ``config``, ...
    note: str = ""

    @property
    def number(self) -> int:
        try:
            return int(self.id.lstrip("v"))
        except ValueError:
            return 0

    @property
    def what(self) -> str:
        """What runs, in one word for a person: the image digest or the directory."""
        return self.image or self.dir or self.command

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, text) -> Release | None:
        """A record as stored; None for one that does not parse (it is skipped)."""
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            release = cls(**{k: v for k, v in raw.items() if k in known})
        except (TypeError, ValueError):
            return None
        return release if isinstance(release.env, dict) else None

    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.at))


def web_command(procfile: str) -> str:
    """The ``web:`` command of a Procfile's text; BadRelease without one."""
    for line in procfile.splitlines():
        kind, sep, command = line.partition(":")
        if sep and kind.strip() == "web" and command.strip():
            return command.strip()
    raise BadRelease("the Procfile has no 'web: COMMAND' line (the command that listens on "
                     "$PORT)")


def parse_env(assignments, unset=()) -> tuple[dict, list[str]]:
    """``KEY=VALUE`` words and names to unset, checked; BadApp for a bad one."""
    env = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise BadApp(f"{item!r} is not KEY=VALUE with KEY a variable name")
        env[name] = value
    for name in unset:
        if not _ENV_NAME.match(name):
            raise BadApp(f"{name!r} is not a variable name")
    return env, list(unset)


def _decode_all(flat) -> list[Release]:
    """Releases from HGETALL (a list or a dict), newest first."""
    values = flat.values() if isinstance(flat, dict) else (flat or [])[1::2]
    found = [r for r in map(Release.decode, values) if r is not None]
    return sorted(found, key=lambda r: r.number, reverse=True)


def read(redis, name: str):
    """The app's releases, newest first."""
    return _then(redis.eval("return redis.call('HGETALL', KEYS[1])",
                            [keys.app_releases(name)], []), _decode_all)


def find(found: list[Release], wanted: str | None, live: str) -> Release:
    """The release named ``wanted`` (``v3`` or ``3``, or a commit's first 4+ letters), or
    the newest one before the live one; BadApp when there is none."""
    if wanted is None:
        older = [r for r in found if r.number < int(live.lstrip("v") or 0)]
        if not older:
            raise BadApp("there is no release before the live one to roll back to")
        return older[0]
    for release in found:
        if wanted in (release.id, release.id.lstrip("v")) or (
                len(wanted) >= 4 and release.commit.startswith(wanted)):
            return release
    raise BadApp(f"no release {wanted!r} (kept: {', '.join(r.id for r in found) or 'none'})")


# KEYS: apps, counter; ARGV: name.
_NEXT_ID = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'unknown' end
return 'v' .. redis.call('INCR', KEYS[2])
"""


def next_id(redis, name: str):
    """A new release id for the app (``v1``, ``v2``, ...): its directory is named first."""
    check_name(name)

    def numbered(status):
        if isinstance(status, bytes):
            status = status.decode()
        if not status.startswith("v"):
            raise BadApp(f"no app named {name}")
        return status
    return _then(redis.eval(_NEXT_ID, [keys.APPS, keys.app_release_counter(name)], [name]),
                 numbered)


def keep(redis, name: str, release: Release):
    """Keep ``release`` among the app's releases."""
    return redis.eval("return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])",
                      [keys.app_releases(name)], [release.id, release.encode()])


def forget(redis, name: str, ids):
    """Drop releases no longer kept (or never live)."""
    return redis.eval("for i = 1, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end",
                      [keys.app_releases(name)], list(ids)) if ids else None


# KEYS: apps, record, channel, news; ARGV: name, release.
_START = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'unknown' end
local busy = redis.call('HGET', KEYS[2], 'rollover')
if busy and busy ~= '' then return 'busy ' .. busy end
redis.call('HSET', KEYS[2], 'rollover', ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', KEYS[3], 'update ' .. ARGV[1])
return 'ok'
"""

# KEYS: record, channel, news; ARGV: name, release, done ('1' live now, '0' failed), news line.
_FINISH = """
if redis.call('HGET', KEYS[1], 'rollover') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'rollover', '')
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'release', ARGV[2]) end
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], 0, 999)
redis.call('PUBLISH', KEYS[2], 'update ' .. ARGV[1])
return 1
"""


def start_rollover(redis, name: str, release_id: str):
    """Ask infra to replace the app's instances with ``release_id``'s."""
    def outcome(status):
        if isinstance(status, bytes):
            status = status.decode()
        if status == "unknown":
            raise BadApp(f"no app named {name}")
        if status.startswith("busy "):
            raise BadApp(f"app {name} is rolling over to {status[5:]} already")
    return _then(redis.eval(_START, [keys.APPS, keys.app_record(name), keys.APPS_CHANNEL,
                                     keys.app_rollover_news(name)], [name, release_id]),
                 outcome)


def finish_rollover(redis, name: str, release_id: str, live: bool, reason: str = ""):
    """Infra: the roll-over is done (``live``) or failed, and why; said to whoever waits."""
    line = json.dumps({"done": live, "release": release_id, "reason": reason})
    return redis.eval(_FINISH, [keys.app_record(name), keys.APPS_CHANNEL,
                                keys.app_rollover_news(name)],
                      [name, release_id, "1" if live else "0", line])


def tell(redis, name: str, text: str):
    """Infra: one step of the roll-over, for whoever waits on it."""
    return redis.call("LPUSH", keys.app_rollover_news(name), json.dumps({"say": text}))
