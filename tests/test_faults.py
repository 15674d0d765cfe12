"""Faults under load (issue 10): the tier set up as the shipped ones are (tests/tierkit.py: Redis
with its append-only file and a password, dockpart-proxy with active health checks every
second, dockpart-infra), a bounded loop of requests through the proxy, and one fault at a time.

What a user sees is asserted: failed requests, how long a request waited, whether the tier comes
back whole.  Each test restores what it disturbed (SIGCONT in ``finally``) and stops its tier.
"""

import os
import signal
import time

import docker
import pytest
import requests

from helpers import served_by, wait_for
from tierkit import RequestLoop, Tier

#: "No new request waits more than a few seconds on a frozen instance" (HAProxy: ~3 s).
LONGEST_WAIT = 3.0
#: How long an instance stays frozen.
FREEZE = 8.0


@pytest.fixture
def tier():
    """A process-driver tier with the first instance and two spawned ones."""
    tier = Tier(infra_args=("--reconcile-interval", "1")).start()
    try:
        tier.spawned = tier.spawn(2)
        yield tier
    finally:
        tier.stop()


def served_set(tier: Tier, rounds: int = 12) -> set[str]:
    return {served_by(tier.url + "/") for _ in range(rounds)}


def test_redis_restart_keeps_the_state_and_fails_no_request(tier):
    """Redis stopped and started again with its append-only file: `servers`, the queues and
    other keys are back as they were, and no request through the proxy fails meanwhile."""
    client = tier.redis.client()
    client.rpush("dockpart:test:kept", "a", "b")
    before = tier.servers()
    with RequestLoop(tier.url + "/") as loop:
        loop.wait_served(50)
        tier.redis.stop()
        loop.wait_served(20)  # served while Redis is away
        tier.redis.start()
        loop.wait_served(100)
    assert tier.redis.client().lrange("dockpart:test:kept", 0, -1) == ["a", "b"]
    assert tier.servers() == before
    assert not loop.failures(), loop.summary()
    # The app's Redis routes work again (it reconnects by itself) and the tier is whole.
    wait_for(lambda: requests.get(tier.url + "/set", timeout=5).status_code == 200, timeout=15,
             what="/set after the restart")
    assert served_set(tier) == set(before)


def test_redis_restarted_empty_fails_no_request_and_the_tier_refills(tier):
    """Redis comes back having lost its data (a new or wiped Redis): the proxy keeps serving
    from the list it had, the first instance is back in `servers` within seconds, and
    reconcile puts the others back."""
    before = set(tier.servers())
    with RequestLoop(tier.url + "/") as loop:
        loop.wait_served(50)
        tier.redis.stop()
        tier.redis.wipe()
        tier.redis.start()
        restarted = time.monotonic()
        wait_for(lambda: tier.first in tier.servers(), timeout=5,
                 what="the first instance back in servers")
        tier.wait_for(lambda: set(tier.servers()) == before, timeout=15,
                      what="reconcile to refill servers")
        loop.wait_served(100)
    assert not loop.failures(), loop.summary()
    assert not loop.failures(since=restarted), loop.summary()
    assert served_set(tier) == before


def test_frozen_instance_delays_no_request_and_comes_back(tier):
    """An instance whose process is stopped (SIGSTOP: the kernel still accepts connections)
    costs no request more than a few seconds, and serves again once it runs again."""
    frozen = tier.spawned[0]
    assert tier.instance_pids(frozen), f"no process for {frozen}"

    def signal_all(sig):
        for pid in tier.instance_pids(frozen):
            os.kill(pid, sig)

    check_frozen(tier, frozen, lambda: signal_all(signal.SIGSTOP),
                 lambda: signal_all(signal.SIGCONT))


def check_frozen(tier: Tier, frozen: str, freeze, thaw) -> None:
    """Under load, ``freeze()`` the instance at ``frozen`` for a while, then ``thaw()`` it
    (always): no request failed or waited long, and it is back in rotation.  The requests it
    held when it froze are sent once to another instance: ``/`` is one of the shipped
    --retry-safe routes (dockpart.proxy_retry)."""
    with RequestLoop(tier.url + "/", clients=4, timeout=30) as loop:
        loop.wait_served(50)
        try:
            freeze()
            # The fault's length (not a wait for something): several health checks and
            # per-try timeouts long.
            time.sleep(FREEZE)
        finally:
            thaw()
        loop.wait_served(20)
    # Every request, counted once the loop has stopped: one held by the frozen instance is
    # recorded only when it ends.
    longest = max(o.waited for o in loop.outcomes)
    assert longest <= LONGEST_WAIT, f"a request waited {longest:.1f} s; {loop.summary()}"
    assert not loop.failures(), loop.summary()
    seen = set()
    wait_for(lambda: seen.add(served_by(tier.url + "/")) or frozen in seen, timeout=15,
             interval=0.01, what=f"{frozen} back in rotation after it resumed")


def test_killed_instance_is_replaced_without_failed_requests(tier):
    """A spawned instance killed (SIGKILL) leaves the rotation without a failed request, and
    infra starts another, so the tier keeps the number of instances asked for."""
    victim = tier.spawned[1]
    with RequestLoop(tier.url + "/") as loop:
        loop.wait_served(50)
        for pid in tier.instance_pids(victim):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not tier.instance_pids(victim), timeout=10, what=f"{victim} to exit")

        def three_answer():
            return len(tier.servers()) == 3 and len(served_set(tier, 6)) == 3

        tier.wait_for(three_answer, timeout=30, interval=0.5, what="three instances again")
        loop.wait_served(50)
    assert not loop.failures(), loop.summary()


@pytest.fixture
def docker_tier(docker_images):
    """A docker-driver tier (instances are dockpart-web:latest containers) with two spawned."""
    tier = Tier(driver="docker", infra_args=("--reconcile-interval", "1")).start()
    try:
        tier.spawned = tier.spawn(2)
        yield tier
    finally:
        tier.stop()


def container_of(tier: Tier, url: str):
    container, = [c for c in tier.containers() if c.labels["dockpart.port"]
                  == url.rsplit(":", 1)[1]]
    return container


@pytest.mark.docker
def test_frozen_container_delays_no_request_and_comes_back(docker_tier):
    """The issue's case: an instance container whose process is stopped, while Docker still
    says "running"."""
    frozen = docker_tier.spawned[0]
    container = container_of(docker_tier, frozen)

    def thaw():
        try:
            container.kill(signal="SIGCONT")
        except docker.errors.APIError:  # replaced meanwhile: nothing left to resume
            pass

    check_frozen(docker_tier, frozen, lambda: container.kill(signal="SIGSTOP"), thaw)


@pytest.mark.docker
def test_killed_container_is_removed_and_replaced(docker_tier):
    """Docker driver: a killed instance container does not stay behind, exited, and the tier
    runs with the number of instances asked for again."""
    tier = docker_tier
    victim = container_of(tier, tier.spawned[1])
    with RequestLoop(tier.url + "/") as loop:
        loop.wait_served(50)
        victim.kill()

        def whole_again():
            states = {c.name: c.status for c in tier.containers(all=True)}
            return (len(states) == 2 and set(states.values()) == {"running"}
                    and len(tier.servers()) == 3 and len(served_set(tier, 6)) == 3)

        tier.wait_for(whole_again, timeout=40, interval=0.5,
                      what="the killed container replaced")
        loop.wait_served(50)
    assert not loop.failures(), loop.summary()
