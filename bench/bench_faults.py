"""Faults under load: how many requests fail and how long the tier takes to be whole again.

For each fault it starts a tier set up as `scripts/up` runs it (tests/tierkit.py: Redis with its
append-only file and a password; the first dockpart-web; dockpart-proxy with the shipped flags,
tierkit.SHIPPED_PROXY_ARGS: active health checks every second, --try-timeout 1; dockpart-infra
with its default intervals) plus two spawned instances, runs 4 clients each sending ``GET /``
through the proxy one after another (a new connection each time, 30 s timeout), causes the
fault, and prints a table: fault, failed requests of all sent, how long requests failed (from
the first failed request to the end of the last; the kinds of failure go to stderr), requests
that waited more than a second, the longest wait, and the time to recover (from the fault until
the state named in the last column; "not within N s" when it did not happen).

    python bench/bench_faults.py [--driver process|docker] [--only NAME ...] [--limit 30]
                                 [--pypy .venv-pypy | --pypy '']

As `scripts/up` does, the proxy runs on PyPy (the virtualenv ``--pypy`` names, with the
``PYPY_GC_*`` settings scripts/lib.sh ships) when that virtualenv exists; ``--pypy ''`` runs it on
this CPython.

Needs redis-server; --driver docker needs the engine and the images (`scripts/images all`).
Everything listens on 127.0.0.1 and is stopped at the end; each run is bounded in time.
"""

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dockpart import keys  # noqa: E402
from helpers import pypy_gc_env, served_by, wait_for  # noqa: E402
from tierkit import RequestLoop, Tier  # noqa: E402

#: How long a frozen instance stays frozen.
FREEZE = 10.0
#: Hands the connections queued on a closing listener to another listener of the port.
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def until(predicate, limit: float, since: float | None = None) -> float | None:
    """Seconds from ``since`` (default: now) until ``predicate()`` is true (polled), or None
    after ``limit`` seconds."""
    start = time.monotonic() if since is None else since
    while time.monotonic() - start < limit:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # a part still coming back
            pass
        time.sleep(0.05)
    return None


def served_set(tier: Tier, rounds: int = 6) -> set[str]:
    return {served_by(tier.url + "/") for _ in range(rounds)}


def whole(tier: Tier, instances: set[str] | int):
    """A predicate: `servers` holds those instances (or that many) and each answers through
    the proxy."""
    def check():
        now = set(tier.servers())
        wanted = len(now) == instances if isinstance(instances, int) else now == instances
        return wanted and served_set(tier, 2 * len(now)) == now
    return check


def kill_all(pids) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def instance_killed(tier, spawned, limit):
    victim, start = spawned[1], time.monotonic()
    if tier.driver == "docker":
        container, = [c for c in tier.containers() if c.name.endswith(victim.rsplit(":", 1)[1])]
        container.kill()
    else:
        kill_all(tier.instance_pids(victim))
    return until(whole(tier, 3), limit, start), "3 instances in servers, each answering"


def instance_frozen(tier, spawned, limit):
    frozen = spawned[0]
    pids = tier.instance_pids(frozen) if tier.driver == "process" else []
    container = None
    if tier.driver == "docker":
        container, = [c for c in tier.containers() if c.name.endswith(frozen.rsplit(":", 1)[1])]
        container.kill(signal="SIGSTOP")  # Docker still says "running"
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(FREEZE)  # the fault's length, not a wait for something
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # replaced meanwhile
                pass
        if container is not None:
            container.kill(signal="SIGCONT")
    seen = set()
    back = until(lambda: seen.add(served_by(tier.url + "/")) or frozen in seen, limit)
    return back, f"served again, from when it resumed ({FREEZE:.0f} s frozen)"


def redis_restart(tier, spawned, limit):
    start = time.monotonic()
    tier.redis.stop()
    tier.redis.start()
    ok = until(lambda: requests.get(tier.url + "/set", timeout=2).status_code == 200, limit,
               start)
    return ok, "/set answers through the proxy (state kept: append-only file)"


def redis_lost(tier, spawned, limit):
    before, start = set(tier.servers()), time.monotonic()
    tier.redis.stop(signal.SIGKILL)
    tier.redis.wipe()
    tier.redis.start()
    return until(whole(tier, before), limit, start), "servers refilled, each instance answering"


def proxy_restart(tier, spawned, limit):
    """Stop, then start: nothing listens in between."""
    start = time.monotonic()
    tier.proxy.stop()
    tier.start_proxy()
    return until(whole(tier, 3), limit, start), "the proxy serves every instance"


@contextmanager
def migrate_req():
    """net.ipv4.tcp_migrate_req=1 while the block runs, as `scripts/up restart-proxy` sets it
    (when root), then the value it had before."""
    writable = MIGRATE_REQ.exists() and os.access(MIGRATE_REQ, os.W_OK)
    before = MIGRATE_REQ.read_text() if writable else None
    if writable:
        MIGRATE_REQ.write_text("1")
    else:
        print(f"cannot write {MIGRATE_REQ}: queued connections of the old proxy may be reset",
              file=sys.stderr)
    try:
        yield
    finally:
        if before is not None:
            MIGRATE_REQ.write_text(before)


def proxy_replaced(tier, spawned, limit):
    """The graceful restart of `scripts/up restart-proxy`: a new proxy on the same port
    (SO_REUSEPORT), then SIGTERM to the old one, which finishes what it has and exits."""
    old, start = tier.proxy, time.monotonic()
    with migrate_req():
        tier.start_proxy()
        old.stop()
    return until(whole(tier, 3), limit, start), "the new proxy alone serves every instance"


def infra_killed_mid_spawn(tier, spawned, limit):
    client = tier.redis.client()
    assert requests.get(tier.url + "/spawn", timeout=5).status_code == 202
    wait_for(lambda: client.lrange(keys.SPAWNING, 0, -1), timeout=10, interval=0.01,
             what="the spawn in hand")
    start = time.monotonic()
    tier.infra.stop(signal.SIGKILL)
    tier.start_infra()
    return until(whole(tier, 4), limit, start), "the new instance in servers, answering"


FAULTS = {
    "instance killed": instance_killed,
    "instance frozen": instance_frozen,
    "redis restart": redis_restart,
    "redis lost its data": redis_lost,
    "proxy restart": proxy_restart,
    "proxy replaced": proxy_replaced,
    "infra killed mid-spawn": infra_killed_mid_spawn,
}


def kind(outcome) -> str:
    """A failure's sort: the status, or the exception's innermost cause."""
    if outcome.status is not None:
        return f"HTTP {outcome.status}"
    if "Max retries exceeded" in outcome.error:  # requests' wording for a failed connect
        return "could not connect"
    for cause in ("Connection reset", "Read timed out", "RemoteDisconnected"):
        if cause in outcome.error:
            return cause
    return outcome.error[:80]


def run(name: str, driver: str, limit: float, pypy: Path | None) -> tuple:
    proxy = ({"proxy_twistd": str(pypy / "bin" / "twistd"),
              "proxy_env": pypy_gc_env()} if pypy else {})
    tier = Tier(driver=driver, **proxy).start()
    try:
        spawned = tier.spawn(2)
        with RequestLoop(tier.url + "/", clients=4, max_seconds=limit + FREEZE + 60) as loop:
            loop.wait_served(50)
            recovered, state = FAULTS[name](tier, spawned, limit)
            try:
                loop.wait_served(20, timeout=limit)  # and a few more requests after it
            except AssertionError:
                pass  # the table says it did not recover
        failures = loop.failures()
        # how long requests failed: a refused connection fails at once, so the count alone
        # says more about the clients' pace than about the outage
        span = (max(o.started + o.waited for o in failures) - min(o.started for o in failures)
                if failures else 0.0)
        for error in sorted({kind(o) for o in failures}):
            print(f"  {name}: failed with {error}", file=sys.stderr)
        slow = sum(o.waited > 1 for o in loop.outcomes)
        longest = max(o.waited for o in loop.outcomes)
        return name, len(failures), span, slow, len(loop.outcomes), longest, recovered, state
    finally:
        tier.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=("process", "docker"), default="process")
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), metavar="NAME")
    parser.add_argument("--limit", type=float, default=30.0,
                        help="seconds to wait for recovery (default 30)")
    parser.add_argument("--pypy", default=str(ROOT / ".venv-pypy"),
                        help="the PyPy virtualenv whose twistd runs the proxy, used when it "
                        "exists ('' for this CPython)")
    args = parser.parse_args()
    pypy = Path(args.pypy) if args.pypy and (Path(args.pypy) / "bin" / "twistd").exists() else None
    rows = []
    for name in args.only or FAULTS:
        print(f"{name}...", file=sys.stderr, flush=True)
        rows.append(run(name, args.driver, args.limit, pypy))
    print(f"\n--driver {args.driver}, the proxy on {'PyPy' if pypy else 'CPython'}\n")
    print("| fault | failed requests | failing for | waited > 1 s | longest wait "
          "| time to recover | recovered means |")
    print("|---|---|---|---|---|---|---|")
    for name, failed, span, slow, total, longest, recovered, state in rows:
        took = f"{recovered:.1f} s" if recovered is not None else f"not within {args.limit:.0f} s"
        print(f"| {name} | {failed} of {total} | {span:.2f} s | {slow} | {longest:.2f} s "
              f"| {took} | {state} |")


if __name__ == "__main__":
    main()
