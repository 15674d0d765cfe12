"""The autoscaler's arithmetic, windows and options, in memory with Clock."""

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from dockpart import infra, keys
from dockpart.records import BackendLoad, LoadReport
from dockpart.infra_autoscale import Observed, Policy, Settings, observe


def policy(**kw) -> tuple[Policy, Clock]:
    clock = Clock()
    clock.advance(1000)
    settings = Settings(**{"min_instances": 1, "max_instances": 10, "target": 4.0,
                           "cooldown": 5.0, "window": 60.0, **kw})
    return Policy(settings, clock), clock


def test_hpa_formula_scales_up_to_ceil_of_load_over_target():
    """3 instances at 6 in flight each, target 4: ceil(3 * 6 / 4) = 5."""
    p, _ = policy()
    d = p.decide(Observed(ready=3, spawning=0, inflight=18))
    assert (d.action, d.desired, d.per_instance) == ("up", 5, 6.0)
    assert d.reason == "3 instances, 6.0 in flight each (target 4) -> 5"


def test_within_tolerance_no_change():
    """4.3 in flight each against a target of 4 is inside ±10 %: hold."""
    p, _ = policy()
    d = p.decide(Observed(ready=3, spawning=0, inflight=13))
    assert (d.action, d.desired) == ("hold", 3)
    assert "within 10% of the target" in d.reason


def test_scale_up_step_is_at_most_double_or_plus_step():
    p, _ = policy(max_instances=100, step=4)
    assert p.decide(Observed(1, 0, 400)).desired == 5  # +4 beats doubling from 1
    p, _ = policy(max_instances=100, step=4)
    d = p.decide(Observed(10, 0, 400))
    assert (d.desired, "at most +10 per step" in d.reason) == (20, True)  # doubling beats +4


def test_never_above_max_nor_below_min():
    p, clock = policy(min_instances=2, max_instances=6)
    d = p.decide(Observed(3, 0, 400))
    assert (d.action, d.desired) == ("up", 6)
    assert "at most 6 instances" in d.reason
    clock.advance(10)
    assert p.decide(Observed(6, 0, 400)).action == "hold"  # at max: nothing more to ask


def test_runtime_limits_override_the_settings():
    p, _ = policy(min_instances=1, max_instances=10)
    assert p.decide(Observed(2, 0, 100), low=1, high=3).desired == 3


def test_spawning_instances_count_and_carry_no_load():
    """While one instance warms up, the same load does not ask for it again."""
    p, clock = policy(cooldown=0)
    assert p.decide(Observed(1, 0, 8)).desired == 2
    clock.advance(1)
    d = p.decide(Observed(1, 1, 8))
    assert (d.action, d.current, d.desired) == ("hold", 2, 2)
    assert d.per_instance == 4.0


def test_scale_up_cooldown_then_next_step():
    p, clock = policy(cooldown=5.0, step=1)
    assert p.decide(Observed(1, 0, 40)).desired == 2
    clock.advance(2)
    d = p.decide(Observed(2, 0, 40))
    assert d.action == "hold" and "cooldown, 3.0 s left" in d.reason
    clock.advance(3)
    assert p.decide(Observed(2, 0, 40)).desired == 4


def test_no_scale_down_before_the_window_nor_during_a_dip():
    """Scale-down takes the highest recommendation of the last 60 s: a dip sheds nothing."""
    p, clock = policy(window=60.0)
    d = p.decide(Observed(4, 0, 16))  # at target: recommends 4
    assert d.action == "hold"
    for _ in range(5):
        clock.advance(10)
        d = p.decide(Observed(4, 0, 0))  # a dip: recommends 1
        assert (d.action, d.desired) == ("hold", 4), d.reason
    clock.advance(10)  # 60 s since the start: still 4 within the window
    d = p.decide(Observed(4, 0, 0))
    assert d.action == "hold" and "highest recommendation in the last 60 s is 4" in d.reason
    clock.advance(1)  # the recommendation of 4 left the window
    d = p.decide(Observed(4, 0, 0))
    assert (d.action, d.desired) == ("down", 1)


def test_stabilisation_steps_down_through_the_highest_recent_recommendation():
    p, clock = policy(window=60.0)
    clock.advance(60)  # long enough since the start
    p.decide(Observed(4, 0, 16))  # recommends 4
    clock.advance(30)
    p.decide(Observed(4, 0, 8))  # recommends 2
    clock.advance(31)  # 4 left the window, 2 is still in it
    d = p.decide(Observed(4, 0, 0))
    assert (d.action, d.desired) == ("down", 2)
    assert "highest recommendation in the last 60 s" in d.reason


def test_restart_forgets_history_and_waits_a_window_again():
    p, clock = policy(window=60.0)
    clock.advance(100)
    p.restart()
    assert p.decide(Observed(3, 0, 0)).action == "hold"
    clock.advance(61)
    assert p.decide(Observed(3, 0, 0)).desired == 1


def test_unknown_is_no_decision():
    p, _ = policy()
    d = p.unknown("no load figures", Observed(3, 1, 0))
    assert (d.action, d.current, d.desired) == ("none", 4, 4)


def test_observe_counts_like_request_spawn_and_adds_up_proxies():
    lists = {keys.SERVERS: ["http://h:1", "http://h:2", "http://h:3"],
             keys.SPAWN_QUEUE: ["http://h:4"], keys.SPAWNING: ["http://h:5"],
             keys.DESTROY_QUEUE: ["http://h:3"], keys.DESTROYING: []}
    reports = [LoadReport({"http://h:1": BackendLoad(inflight=3),
                           "http://h:2": BackendLoad(inflight=1)}, list=keys.SERVERS),
               LoadReport({"http://h:1": BackendLoad(inflight=2)}, list=keys.SERVERS),
               LoadReport({"http://h:9": BackendLoad(inflight=50)}, list="dockpart:deploy:slice")]
    assert observe(lists, reports) == Observed(ready=2, spawning=2, inflight=6)


@pytest.mark.parametrize("args, words", [
    (["--min-instances", "4", "--max-instances", "3"], "--min-instances (4) <= --max-instances"),
    (["--min-instances", "0"], "1 <= --min-instances"),
    (["--target-inflight", "0"], "--target-inflight must be positive"),
    (["--target-inflight", "-2"], "--target-inflight must be positive"),
    (["--evaluate-interval", "0"], "--evaluate-interval must be positive"),
    (["--tolerance", "1"], "--tolerance"),
    (["--scale-up-step", "0"], "--scale-up-step"),
    (["--scale-down-window", "-1"], "--scale-down-window cannot be negative"),
])
def test_bad_configuration_is_a_usage_error(args, words):
    with pytest.raises(usage.UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        infra.Options().parseOptions(["--autoscale", *args])


def test_defaults():
    config = infra.Options()
    config.parseOptions([])
    assert not config["autoscale"]
    assert (config["min-instances"], config["max-instances"], config["scale-down-window"]) \
        == (1, 10, 60.0)


def test_a_failed_spawn_holds_scale_ups_doubling_up_to_the_most_and_success_resets_it():
    p, clock = policy(cooldown=0, failed_spawn_hold=10, failed_spawn_hold_max=25)
    assert [p.spawn_failed("no answer") for _ in range(3)] == [10, 20, 25]
    clock.advance(24)
    d = p.decide(Observed(1, 0, 40))
    assert d.action == "hold" and "dead-lettered (no answer), next try in 1.0 s" in d.reason
    clock.advance(1)
    assert p.decide(Observed(1, 0, 40)).action == "up"
    p.spawns_succeed()
    assert p.spawn_failed("no answer") == 10
