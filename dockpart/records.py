"""The Redis records that cross daemons: one type, one encoder and one tolerant decoder each.

:mod:`dockpart.keys` names the keys; this module says what is stored under them.  Anyone with
the Redis password can write these rows, so a reader never trusts one: a row that is not what
its writer would have written (not JSON, a missing field, a string where a number goes, NaN, a
time in the future) is skipped with a warning (once per distinct row, not once per look) and
the others are used.  No reader parses a record's JSON itself.

Records:

- :class:`LoadReport`: each proxy's figures (``keys.proxy_load``), read by the autoscaler,
  the dashboard and the admin listener.
- :class:`Decision`: the autoscaler's last decisions (``keys.AUTOSCALE_DECISIONS``) and the
  size it wants (``keys.AUTOSCALE_DESIRED``).
- :class:`Limits`: min and max set at run time (``keys.AUTOSCALE_LIMITS``).
- :class:`DeadLetter`: a request infra could not carry out (``keys.DEAD_LETTERS``).
- :class:`TierView`: what the dashboard shows, read in one script (one moment).
- :class:`QueuedImage`: an upload waiting for ``/meow`` (``keys.IMAGES``), between web
  instances.

Records that belong to a tier carry ``app``: None is the seed tier (``servers``); a named
app's records say its name, and the seed's JSON stays what it always was.
"""

from __future__ import annotations

import binascii
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from twisted.logger import Logger

from dockpart import keys

log = Logger()

#: Seconds a load report stays in Redis; readers also ignore reports older than this.
REPORT_TTL = 5.0
#: A report dated further ahead than this (clocks of two hosts disagree a little) is refused:
#: it would count for as long as it is "new", whatever its figures.
MAX_CLOCK_AHEAD = REPORT_TTL
#: Upper bounds (seconds) of a report's latency histogram; a last bucket holds the rest.
LATENCY_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
HISTOGRAM_BUCKETS = len(LATENCY_BOUNDS) + 1
#: The autoscaler's words for what it did.
ACTIONS = ("up", "down", "hold", "none")
_LAST_TIME = 253402300800.0  # 10000-01-01
#: Distinct bad rows remembered, so each is warned about once.
_WARNED_KEPT = 256


class BadRecord(ValueError):
    """A row that is not what its writer writes."""


# -- checks shared by the decoders


def _no_constant(name: str):
    raise BadRecord(f"{name} is not a number JSON allows")


def _json(raw) -> object:
    """JSON as the writers make it: NaN and Infinity, which Python's json accepts, refused."""
    if not isinstance(raw, (str, bytes)):
        raise BadRecord(f"not text: {type(raw).__name__}")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:
        raise BadRecord(f"not JSON: {e}") from None


def _object(value, what: str = "the record") -> dict:
    if not isinstance(value, dict):
        raise BadRecord(f"{what} is not a JSON object")
    return value


def _number(value, what: str, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRecord(f"{what} is not a finite number: {value!r}")
    if value < low:
        raise BadRecord(f"{what} is below {low:g}: {value!r}")
    return value


def _time(value, what: str = "time") -> float:
    """Seconds since the epoch that a clock can show (time.localtime raises past year 9999)."""
    at = _number(value, what, 0)
    if at >= _LAST_TIME:
        raise BadRecord(f"{what} is past the year 9999: {value!r}")
    return at


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRecord(f"{what} is not a whole number >= 0: {value!r}")
    return value


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is not a string: {value!r}")
    return value


def _app(record: dict) -> str | None:
    app = record.get("app")
    return None if app is None else _text(app, "app")


def _with_app(record: dict, app: str | None) -> dict:
    if app is None:
        record.pop("app", None)
    return record


class _Warner:
    """Warns once per distinct bad row (a row rewritten the same every second is one row)."""

    def __init__(self):
        self._seen: OrderedDict = OrderedDict()

    def __call__(self, what: str, raw, problem: str) -> None:
        key = (what, raw if isinstance(raw, (str, bytes)) else repr(raw))
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = None
        while len(self._seen) > _WARNED_KEPT:
            self._seen.popitem(last=False)
        text = raw if isinstance(raw, str) else repr(raw)
        log.warn("skipping a bad {what} (no dockpart daemon writes this: {problem}): {row}",
                 what=what, problem=problem, row=text[:200])


warn_once = _Warner()


def decode_each(raws, decode, what: str) -> list:
    """Every row that ``decode`` accepts, in order; the others skipped with a warning."""
    out = []
    for raw in raws:
        try:
            out.append(decode(raw))
        except BadRecord as e:
            warn_once(what, raw, str(e))
    return out


# -- load reports


@dataclass(frozen=True)
class BackendLoad:
    """One proxy's figures for one backend since its previous report."""
    requests: int = 0  # responses completed
    errors: int = 0  # failed attempts
    latency_sum: float = 0.0  # seconds to response head, summed over those requests
    latency_buckets: tuple[int, ...] = ()  # counts per LATENCY_BOUNDS, + slower
    inflight: int = 0  # requests in progress now
    healthy: bool = False

    @classmethod
    def decode(cls, value, url: str) -> "BackendLoad":
        f = _object(value, f"the figures of {url}")
        buckets = f.get("latency_buckets", [])
        if not isinstance(buckets, list) or len(buckets) > HISTOGRAM_BUCKETS:
            raise BadRecord(f"{url}: latency_buckets is not a list of at most "
                            f"{HISTOGRAM_BUCKETS} counts")
        healthy = f.get("healthy", False)
        if not isinstance(healthy, bool):
            raise BadRecord(f"{url}: healthy is not true or false: {healthy!r}")
        return cls(_count(f.get("requests", 0), f"{url}: requests"),
                   _count(f.get("errors", 0), f"{url}: errors"),
                   float(_number(f.get("latency_sum", 0.0), f"{url}: latency_sum", 0)),
                   tuple(_count(n, f"{url}: a latency bucket") for n in buckets),
                   _count(f.get("inflight", 0), f"{url}: inflight"), healthy)

    def encode(self) -> dict:
        return {**asdict(self), "latency_buckets": list(self.latency_buckets)}


@dataclass(frozen=True)
class HoldFigures:
    """An app that scales to zero, as one proxy saw it (:mod:`dockpart.proxy_hold`): the
    requests it holds now while the first instance starts (load, for the autoscaler) and its
    activations (first request held -> first instance listed)."""
    held: int = 0
    activations: int = 0  # since the proxy started
    activation_seconds: tuple[float, ...] = ()  # each one since the previous report
    activation_recent: tuple[float, ...] = ()  # the latest (at most 5)
    activation_last: float | None = None

    def encode(self) -> dict:
        return {"held": self.held, "activations": self.activations,
                "activation_seconds": list(self.activation_seconds),
                "activation_recent": list(self.activation_recent),
                "activation_last": self.activation_last}

    @classmethod
    def decode(cls, r: dict) -> "HoldFigures":
        def seconds(name):
            values = r.get(name, [])
            if not isinstance(values, list):
                raise BadRecord(f"{name} is not a list")
            return tuple(float(_number(s, name, 0)) for s in values)
        last = r.get("activation_last")
        return cls(_count(r.get("held", 0), "held"), _count(r.get("activations", 0), "activations"),
                   seconds("activation_seconds"), seconds("activation_recent"),
                   None if last is None else float(_number(last, "activation_last", 0)))


@dataclass(frozen=True)
class LoadReport:
    """What one proxy process measured, per backend URL, in its last interval.

    JSON: ``{"proxy": "host:pid", "time": 1700000000.5, "interval": 1.0, "list": "servers",
    "backends": {"http://127.0.0.1:3001": {"requests": 120, "errors": 0, "latency_sum": 0.84,
    "latency_buckets": [...], "inflight": 3, "healthy": true}}}`` (and ``"app"`` for an app's).
    """
    backends: dict[str, BackendLoad] = field(default_factory=dict)
    proxy: str = ""
    time: float = 0.0
    interval: float = 1.0
    list: str = keys.SERVERS  # the Redis list the proxy rotates over
    app: str | None = None
    #: An app that scales to zero: its held requests and activations ("held" and
    #: "activation_*" beside "backends" in JSON); None for any other.
    hold: HoldFigures | None = None

    @property
    def held(self) -> int:
        return self.hold.held if self.hold is not None else 0

    def shown(self) -> dict:
        """As JSON has it (the admin listener shows the last one published)."""
        record = {"proxy": self.proxy, "time": self.time, "interval": self.interval,
                  "list": self.list, "app": self.app,
                  "backends": {url: b.encode() for url, b in self.backends.items()},
                  **(self.hold.encode() if self.hold is not None else {})}
        return _with_app(record, self.app)

    def encode(self) -> str:
        return json.dumps(self.shown())

    @classmethod
    def decode(cls, raw, now: float) -> "LoadReport | None":
        """The report, None when it is older than REPORT_TTL (a proxy that stopped), or
        BadRecord: malformed, or dated more than MAX_CLOCK_AHEAD ahead of ``now``."""
        r = _object(_json(raw))
        try:
            at = _time(r["time"])
            backends = _object(r["backends"], "backends")
        except KeyError as e:
            raise BadRecord(f"no {e.args[0]}") from None
        if at > now + MAX_CLOCK_AHEAD:
            raise BadRecord(f"dated {at - now:.0f} s in the future")
        if now - at > REPORT_TTL:
            return None
        interval = _number(r.get("interval", 1.0), "interval", 0)
        return cls({url: BackendLoad.decode(f, url) for url, f in backends.items()},
                   _text(r.get("proxy", ""), "proxy"), at, interval or 1.0,
                   _text(r.get("list", keys.SERVERS), "list"), _app(r),
                   HoldFigures.decode(r) if "held" in r else None)


async def read_load_reports(redis, now: float) -> list[LoadReport]:
    """Every proxy's current report (none older than REPORT_TTL), from a RedisService.

    Raises RedisUnavailable when Redis cannot answer: the caller decides what "unknown" means.
    """
    ids = await redis.call("ZRANGEBYSCORE", keys.LOAD_PROXIES, now - REPORT_TTL, "+inf")
    if not ids:
        return []
    raws = await redis.call("MGET", *[keys.proxy_load(i) for i in ids])
    reports = decode_each((raw for raw in raws if raw is not None),
                          lambda raw: LoadReport.decode(raw, now), "load report")
    return [r for r in reports if r is not None]


# KEYS: the report's key, the index; ARGV: report, TTL ms, proxy id, time, oldest time kept.
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""


def publish_load_report(redis, report: LoadReport):
    """Write ``report`` under its proxy's key (expiring after REPORT_TTL) and index it."""
    return redis.eval(_PUBLISH, [keys.proxy_load(report.proxy), keys.LOAD_PROXIES],
                      [report.encode(), int(REPORT_TTL * 1000), report.proxy, report.time,
                       report.time - REPORT_TTL])


# -- the autoscaler's decisions, desired size and limits


@dataclass(frozen=True)
class Decision:
    """One evaluation of the autoscaler, as it is recorded and shown."""
    time: float
    current: int
    spawning: int
    inflight: float
    per_instance: float | None
    target: float
    desired: int
    action: str  # up, down, hold, or none (nothing known to decide on)
    reason: str
    app: str | None = None
    #: The fields the row had (a shorter row is shown as it was); None: all of them.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def encode(self) -> str:
        return json.dumps(self.shown())

    def shown(self) -> dict:
        """As the dashboard's and /listservers' JSON give it."""
        record = {k: v for k, v in asdict(self).items() if k != "given"
                  and (self.given is None or k in self.given)}
        return _with_app(record, self.app)

    @classmethod
    def decode(cls, raw) -> "Decision":
        """Every field that is there must have its type; only ``action`` must be there."""
        d = _object(_json(raw))
        if "action" not in d:
            raise BadRecord("no action")
        action = _text(d["action"], "action")
        if action not in ACTIONS:
            raise BadRecord(f"action {action!r} is none of {', '.join(ACTIONS)}")
        per = d.get("per_instance")
        return cls(_time(d.get("time", 0.0)), _count(d.get("current", 0), "current"),
                   _count(d.get("spawning", 0), "spawning"),
                   _number(d.get("inflight", 0), "inflight", 0),
                   None if per is None else _number(per, "per_instance", 0),
                   _number(d.get("target", 0), "target", 0),
                   _count(d.get("desired", 0), "desired"), action,
                   _text(d.get("reason", ""), "reason"), _app(d),
                   frozenset(k for k in d if k in _DECISION_FIELDS))


_DECISION_FIELDS = frozenset(("time", "current", "spawning", "inflight", "per_instance",
                              "target", "desired", "action", "reason", "app"))


# KEYS: decisions, desired; ARGV: the record ('' for none), desired, how many records to keep.
_RECORD_DECISION = """
redis.call('SET', KEYS[2], ARGV[2])
if ARGV[1] ~= '' then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
end
"""


def record_decision(redis, decision: Decision, kept: int, new: bool = True):
    """Set the desired size; with ``new``, add ``decision`` to the newest ``kept``."""
    return redis.eval(_RECORD_DECISION, [keys.AUTOSCALE_DECISIONS, keys.AUTOSCALE_DESIRED],
                      [decision.encode() if new else "", decision.desired, kept])


def decode_decisions(raws) -> list[Decision]:
    return decode_each(raws, Decision.decode, "autoscaling decision")


async def read_decisions(redis, count: int) -> list[Decision]:
    """The newest ``count`` decisions that are decisions."""
    return decode_decisions(await redis.call("LRANGE", keys.AUTOSCALE_DECISIONS, 0, count - 1))


def decode_desired(raw) -> int | None:
    """The desired size, None when unset or not a whole number."""
    return int(raw) if isinstance(raw, str) and raw.isdigit() else None


async def read_desired(redis) -> int | None:
    return decode_desired(await redis.call("GET", keys.AUTOSCALE_DESIRED))


@dataclass(frozen=True)
class Limits:
    """min/max set at run time; None where unset (the autoscaler's options apply) or not a
    whole number (``problem`` says what was wrong)."""
    min: int | None = None
    max: int | None = None
    problem: str | None = None

    @classmethod
    def decode(cls, flat) -> "Limits":
        """From HGETALL's flat list of fields and values."""
        fields = dict(zip(flat[::2], flat[1::2])) if isinstance(flat, list) else {}
        values: dict[str, int | None] = {}
        problems = []
        for name in ("min", "max"):
            raw = fields.get(name)
            if raw is None:
                values[name] = None
            elif isinstance(raw, str) and raw.isdigit() and int(raw) >= 1:
                values[name] = int(raw)
            else:
                values[name] = None
                problems.append(f"{name}={raw!r} is not a whole number >= 1")
        return cls(values["min"], values["max"], "; ".join(problems) or None)

    def shown(self) -> dict:
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}


async def read_limits(redis) -> Limits:
    return Limits.decode(await redis.call("HGETALL", keys.AUTOSCALE_LIMITS) or [])


def write_limits(redis, low: int, high: int):
    return redis.call("HSET", keys.AUTOSCALE_LIMITS, "min", low, "max", high)


# -- dead letters


@dataclass(frozen=True)
class DeadLetter:
    """A queue entry infra could not carry out, and why."""
    queue: str | None
    entry: str
    reason: str
    time: float | None
    app: str | None = None
    list: str | None = None  # the tier's servers list (an app's dead letters say theirs)

    def encode(self) -> str:
        return json.dumps(self.shown())

    def shown(self) -> dict:
        record = _with_app(asdict(self), self.app)
        if self.list is None:
            del record["list"]
        return record

    @classmethod
    def decode(cls, raw) -> "DeadLetter":
        d = _object(_json(raw))
        try:
            where = d.get("list")
            return cls(_text(d["queue"], "queue"), _text(d["entry"], "entry"),
                       _text(d.get("reason", ""), "reason"), _time(d["time"]),
                       _app(d), None if where is None else _text(where, "list"))
        except KeyError as e:
            raise BadRecord(f"no {e.args[0]}") from None

    @classmethod
    def shown_as(cls, raw) -> "DeadLetter":
        """For a person: the letter, or the raw row (as text) said not to be one."""
        try:
            return cls.decode(raw)
        except BadRecord as e:
            warn_once("dead letter", raw, str(e))
            text = raw if isinstance(raw, str) else repr(raw)
            return cls(None, text, "(not a dead letter infra wrote)", None)


# The letter first: a script that fails half way keeps what it did, and the entry must not go.
_DEAD_LETTER = """
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LREM', KEYS[1], 1, ARGV[1])
"""


def add_dead_letter(redis, processing: str, letter: DeadLetter):
    """Move ``letter.entry`` from ``processing`` to the dead letters, with the reason."""
    return redis.eval(_DEAD_LETTER, [processing, keys.DEAD_LETTERS],
                      [letter.entry, letter.encode()])


async def read_dead_letters(redis, count: int) -> list[DeadLetter]:
    """The newest ``count`` letters that are letters (the autoscaler's look)."""
    return decode_each(await redis.call("LRANGE", keys.DEAD_LETTERS, 0, count - 1),
                       DeadLetter.decode, "dead letter")


# -- the dashboard's view, one moment of the tier


# KEYS: the five tier lists, dead letters, lease, decisions, desired, limits, deploy route;
# ARGV: how many letters, how many decisions.
_VIEW = """
local out = {}
for i = 1, 5 do out[i] = redis.call('LRANGE', KEYS[i], 0, -1) end
out[6] = redis.call('LRANGE', KEYS[6], 0, tonumber(ARGV[1]) - 1)
out[7] = redis.call('GET', KEYS[7])
out[8] = redis.call('LRANGE', KEYS[8], 0, tonumber(ARGV[2]) - 1)
out[9] = redis.call('GET', KEYS[9])
out[10] = redis.call('HGETALL', KEYS[10])
out[11] = redis.call('LRANGE', KEYS[11], 0, -1)
return out
"""

#: The lists an instance moves through, as the dashboard names them.
TIER_LIST_NAMES = {"servers": keys.SERVERS, "spawn_queue": keys.SPAWN_QUEUE,
                   "spawning": keys.SPAWNING, "destroy_queue": keys.DESTROY_QUEUE,
                   "destroying": keys.DESTROYING}


@dataclass(frozen=True)
class TierView:
    """Everything of the tier's that the dashboard shows, as of one moment."""
    lists: dict[str, list[str]]  # by the names of TIER_LIST_NAMES
    dead_letters: list[DeadLetter]
    lease_holder: str | None
    decisions: list[Decision]
    desired: int | None
    limits: Limits
    live: list[str]  # the deploy route


async def read_tier_view(redis, letters: int, decisions: int) -> TierView:
    """One script, so an instance moving from "spawning" to ``servers`` is in exactly one
    list of the view (read one by one, the tier could look an instance short)."""
    (*lists, raw_letters, holder, raw_decisions, desired, limits, live) = await redis.eval(
        _VIEW, [*TIER_LIST_NAMES.values(), keys.DEAD_LETTERS, keys.INFRA_LEASE,
                keys.AUTOSCALE_DECISIONS, keys.AUTOSCALE_DESIRED, keys.AUTOSCALE_LIMITS,
                keys.DEPLOY_LIVE], [letters, decisions])
    return TierView(dict(zip(TIER_LIST_NAMES, (list(x or []) for x in lists))),
                    [DeadLetter.shown_as(raw) for raw in raw_letters or []],
                    holder if isinstance(holder, str) else None,
                    decode_decisions(raw_decisions or []), decode_desired(desired),
                    Limits.decode(limits or []), list(live or []))


# -- the web app's image queue


@dataclass(frozen=True)
class QueuedImage:
    """An uploaded image waiting for /meow: its type and its bytes in base64."""
    type: str  # image/png ... (dockpart.web.sniff_image's word)
    data: str  # base64

    def encode(self) -> str:
        return json.dumps({"type": self.type, "data": self.data})

    @classmethod
    def decode(cls, raw) -> "QueuedImage":
        d = _object(_json(raw))
        kind, data = _text(d.get("type"), "type"), _text(d.get("data"), "data")
        if not kind.startswith("image/") or not kind[6:].isalnum():
            raise BadRecord(f"type {kind!r} is not an image type")
        try:
            binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            raise BadRecord("data is not base64") from None
        return cls(kind, data)
