"""The records that cross daemons, decoded as a reader meets them: rows anyone with the Redis
password can write, so every bad one is skipped (and said once), never a crash or a trust."""

import json

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from dockpart import keys, records
from dockpart.records import BadRecord, Decision, DeadLetter, Limits, LoadReport

NOW = 1_700_000_000.0
URL = "http://127.0.0.1:3001"
FIGURES = {"requests": 3, "errors": 0, "latency_sum": 0.5, "latency_buckets": [1, 2],
           "inflight": 2, "healthy": True}
DECISION = {"time": NOW, "current": 1, "spawning": 0, "inflight": 12, "per_instance": 12.0,
            "target": 4.0, "desired": 3, "action": "up", "reason": "12 in flight"}


def report(**kw) -> str:
    return json.dumps({"proxy": "h:1", "time": NOW, "interval": 1.0, "list": keys.SERVERS,
                       "backends": {URL: FIGURES}, **kw})


def test_a_load_report_round_trips_and_the_seed_tier_names_no_app():
    decoded = LoadReport.decode(report(), NOW)
    assert decoded.backends[URL].inflight == 2 and decoded.app is None
    assert json.loads(decoded.encode()) == json.loads(report())
    assert LoadReport.decode(LoadReport({}, app="shop", time=NOW).encode(), NOW).app == "shop"


def test_a_load_report_dated_in_the_future_is_refused_a_stale_one_is_none():
    """1000 in flight dated +11 days once drove the tier to its maximum for as long."""
    with pytest.raises(BadRecord, match="in the future"):
        LoadReport.decode(report(time=NOW + 11 * 86400), NOW)
    assert LoadReport.decode(report(time=NOW + 1), NOW).time == NOW + 1  # clocks differ a little
    assert LoadReport.decode(report(time=NOW - records.REPORT_TTL - 1), NOW) is None


@pytest.mark.parametrize("raw", [
    "not json", "[]", json.dumps({"time": NOW}), report(time="now"),
    report(time=None), report(backends=[]), report(backends={URL: 5}),
    report(backends={URL: {**FIGURES, "inflight": "many"}}),
    report(backends={URL: {**FIGURES, "inflight": -3}}),
    report(backends={URL: {**FIGURES, "inflight": True}}),
    report(backends={URL: {**FIGURES, "latency_buckets": [1] * 99}}),
    report(backends={URL: {**FIGURES, "healthy": "yes"}}),
    report(interval=-1), report(list=7),
    report().replace('"latency_sum": 0.5', '"latency_sum": NaN'),
    report().replace(f'"time": {NOW}', '"time": Infinity'),
])
def test_a_malformed_load_report_is_a_bad_record(raw):
    with pytest.raises(BadRecord):
        LoadReport.decode(raw, NOW)


@pytest.mark.parametrize("change", [
    {"time": float("nan")}, {"time": "12:00"}, {"current": "1"}, {"desired": -1},
    {"action": "explode"}, {"action": None}, {"reason": 5}, {"per_instance": "x"},
])
def test_a_decision_of_the_wrong_shape_is_a_bad_record(change):
    raw = json.dumps({**DECISION, **change})
    with pytest.raises(BadRecord):
        Decision.decode(raw)


def test_decisions_keep_only_what_decodes_in_order():
    raws = ["[1, 2]", json.dumps(DECISION), "{", json.dumps({**DECISION, "time": "x"}),
            json.dumps({**DECISION, "action": "down"})]
    assert [d.action for d in records.decode_decisions(raws)] == ["up", "down"]
    assert records.decode_decisions([json.dumps(DECISION)])[0].shown() == DECISION


def test_a_dead_letter_with_a_nan_time_is_shown_as_a_row_that_is_not_one():
    raw = '{"queue": "spawn", "entry": "http://h:1", "reason": "r", "time": NaN}'
    with pytest.raises(BadRecord):
        DeadLetter.decode(raw)
    shown = DeadLetter.shown_as(raw)
    assert shown.time is None and shown.entry == raw
    assert shown.reason == "(not a dead letter infra wrote)"
    good = DeadLetter("spawn", "http://h:1", "r", NOW)
    assert DeadLetter.shown_as(good.encode()) == good


def test_limits_keep_whole_numbers_and_say_what_was_wrong():
    assert Limits.decode(["min", "2", "max", "4"]) == Limits(2, 4)
    bad = Limits.decode(["min", "0", "max", "x"])
    assert (bad.min, bad.max) == (None, None) and "min='0'" in bad.problem
    assert Limits.decode([]).shown() == {}
    assert records.decode_desired("3") == 3 and records.decode_desired("-1") is None


def test_each_bad_row_is_warned_about_once():
    events = []
    observer = lambda event: events.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        rows = ['["once"]', '["once"]', '["twice"]', json.dumps(DECISION)]
        for _ in range(3):
            assert len(records.decode_decisions(rows)) == 1
    finally:
        globalLogPublisher.removeObserver(observer)
    said = [e for e in events if "skipping a bad autoscaling decision" in e]
    assert len(said) == 2 and '["once"]' in said[0] and '["twice"]' in said[1]
