"""Alert rules of PROTOCOL section 2 on hand-written streams (shipped pulse_oximeter profile).

spo2_low: below 90 for 10 s, clear at >= 92, high. pulse_rate_high: above 120 for 10 s, clear
at <= 115, medium. probe_silent: no reading for 30 s, medium.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.model import AlertEvent, Flag
from gateway.profiles import load_profiles
from gateway.rules import AlertEngine
from tests.checks.streams import Block, Reading, numeric_columns, waveform_columns

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "device_profiles")
T0 = 1_764_187_200_000


def spo2(t_s: float, v: float, device: str = "po-1", env: int = 0) -> Reading:
    t = T0 + int(t_s * 1000)
    return Reading(device, "spo2", t, v, t, "pulse_oximeter", env)


class Feed:
    """Checks + engine, fed batch by batch like the pipeline does."""

    def __init__(self) -> None:
        self.state = CheckState()
        self.engine = AlertEngine(PROFILES)

    def __call__(self, readings: list[Reading], blocks: list[Block] | None = None, flags: list[int] | None = None) -> list[AlertEvent]:
        num, wav = numeric_columns(readings), waveform_columns(blocks or [])
        nflags, _ = run_checks(num, wav, PROFILES, self.state, CheckSettings())
        if flags is not None:
            nflags = np.array(flags, dtype=np.int32)
        return self.engine.evaluate(num, nflags, wav)


def brief(events: list[AlertEvent]) -> list[tuple[str, str, float, float | None]]:
    return [(e.event, e.rule, (e.at - T0) / 1000, e.value) for e in events]


def series(values: list[float], start: float = 0.0, step: float = 1.0, device: str = "po-1") -> list[Reading]:
    return [spo2(start + i * step, v, device, env=i) for i, v in enumerate(values)]


def test_opens_only_once_the_condition_held_for_s() -> None:
    feed = Feed()
    assert feed(series([97, 93, 89, 89, 89, 89, 89, 89, 89, 89, 89])) == []  # below from t = 2 s
    assert feed(series([89], start=11)) == []  # t - run_start = 9 s
    events = feed(series([89], start=12))  # 10 s
    assert brief(events) == [("open", "spo2_low", 12.0, 89.0)]
    assert events[0].priority == "high" and events[0].metric == "spo2" and events[0].device_id == "po-1"


def test_a_reading_that_does_not_meet_the_condition_restarts_the_delay() -> None:
    feed = Feed()
    events = feed(series([89, 89, 89, 89, 89, 89, 90, 89, 89, 89, 89, 89, 89, 89, 89, 89, 89, 89]))
    assert brief(events) == [("open", "spo2_low", 17.0, 89.0)]  # run restarted at t = 7 s


def test_hysteresis_no_flapping_around_the_threshold() -> None:
    feed = Feed()
    values = [88] * 11 + [90, 89.9, 91.9, 90.5, 89.5, 91, 92, 91, 89.9, 90, 89, 91.5]
    events = feed(series(values))
    # opens at 10 s, stays open through 90-91.9, closes at the first >= 92 (t = 17 s), and the
    # dips below 90 afterwards are too short to reopen.
    assert brief(events) == [("open", "spo2_low", 10.0, 88.0), ("close", "spo2_low", 17.0, 92.0)]


def test_one_episode_is_one_open_and_one_close_across_batches() -> None:
    feed = Feed()
    events = []
    values = [85] * 30 + [89, 93, 93, 89] + [85] * 12  # steps below max_rate: no SPIKE
    readings = series(values)
    for k in range(0, len(readings), 7):
        events += feed(readings[k:k + 7])
    assert brief(events) == [
        ("open", "spo2_low", 10.0, 85.0), ("close", "spo2_low", 31.0, 93.0), ("open", "spo2_low", 43.0, 85.0),
    ]
    assert brief(feed.engine.active()) == [("open", "spo2_low", 43.0, 85.0)]


def test_artifacts_neither_extend_nor_break_a_condition() -> None:
    feed = Feed()
    # SpO2 92 % -> 60 % in 1 s is a SPIKE: it must not start a run.
    assert feed(series([92, 60, 60, 60], step=1)) == []
    feed2 = Feed()
    readings = series([89] * 12)
    flags = [0] * 12
    flags[3] = int(Flag.OUT_OF_RANGE)  # an artifact inside the run does not break it ...
    flags[10] = int(Flag.SPIKE)  # ... nor opens the alert when it is the reading that would
    assert brief(feed2(readings, flags=flags)) == [("open", "spo2_low", 11.0, 89.0)]
    feed3 = Feed()
    readings = series([89] * 10 + [95] + [89] * 2)
    flags = [0] * 13
    flags[10] = int(Flag.NOT_FINITE)  # a non-finite 95 does not end the run either
    assert brief(feed3(readings, flags=flags)) == [("open", "spo2_low", 11.0, 89.0)]


def test_artifact_does_not_close_an_open_alert() -> None:
    feed = Feed()
    feed(series([85] * 11))
    readings = series([99, 86], start=11)
    assert feed(readings, flags=[int(Flag.SPIKE), 0]) == []


def test_other_flags_still_feed_rules() -> None:
    feed = Feed()
    flags = [int(Flag.GAP | Flag.FLATLINE | Flag.CLOCK_FUTURE)] * 11
    assert brief(feed(series([85] * 11), flags=flags)) == [("open", "spo2_low", 10.0, 85.0)]


def test_above_rule_with_its_own_priority() -> None:
    feed = Feed()
    readings = [Reading("po-1", "pulse_rate", T0 + i * 1000, 130.0 if i < 12 else 115.0, T0 + i * 1000, "pulse_oximeter", i) for i in range(14)]
    events = feed(readings)
    assert [(e.event, e.rule, e.priority, (e.at - T0) // 1000) for e in events] == [
        ("open", "pulse_rate_high", "medium", 10), ("close", "pulse_rate_high", "medium", 12),
    ]


def test_rules_are_per_device() -> None:
    feed = Feed()
    a = series([85] * 11, device="po-a")
    b = series([85] * 5 + [95] * 6, device="po-b")
    events = feed(sorted(a + b, key=lambda r: r.t))
    assert [(e.device_id, e.event) for e in events] == [("po-a", "open")]


def test_silent_opens_at_deadline_and_the_next_reading_closes_it() -> None:
    feed = Feed()
    feed(series([97, 97, 97]))  # latest reading at t = 2 s
    assert feed.engine.tick(T0 + 32_000) == []  # deadline 32 s: not yet passed
    opened = feed.engine.tick(T0 + 32_001)
    assert [(e.event, e.rule, e.at - T0, e.metric, e.value, e.priority, e.env) for e in opened] == [
        ("open", "probe_silent", 32_000, None, None, "medium", None),
    ]
    assert feed.engine.tick(T0 + 90_000) == []  # already open: no second event
    block = Block("po-1", "pleth", T0 + 95_000, 125.0, (0.1, 0.2), T0 + 95_000, "pulse_oximeter", 0)
    closed = feed([], [block])
    assert [(e.event, e.rule, e.at - T0, e.metric, e.value, e.env) for e in closed] == [
        ("close", "probe_silent", 95_000, None, None, 0),
    ]
    assert feed.engine.active() == []


def test_silent_uses_the_latest_reading_time_even_after_a_late_reading() -> None:
    feed = Feed()
    feed(series([97], start=50))
    feed([spo2(10, 97)])  # late (OUT_OF_ORDER) reading: the latest time stays 50 s
    assert [e.at - T0 for e in feed.engine.tick(T0 + 100_000)] == [80_000]


def test_events_follow_arrival_order_and_carry_the_envelope_index() -> None:
    feed = Feed()
    feed(series([85] * 10, device="po-a") + series([85] * 10, device="po-b"))
    events = feed([spo2(10, 85, "po-b", env=0), spo2(10, 85, "po-a", env=1)])
    assert [(e.device_id, e.env) for e in events] == [("po-b", 0), ("po-a", 1)]


def test_silent_close_precedes_threshold_events_of_the_same_reading() -> None:
    feed = Feed()
    feed(series([85] * 10))
    feed.engine.tick(T0 + 60_000)
    events = feed([spo2(45, 85), spo2(55, 85)])
    assert [(e.event, e.rule) for e in events] == [("close", "probe_silent"), ("open", "spo2_low")]


def test_next_deadline() -> None:
    feed = Feed()
    assert feed.engine.next_deadline() is None
    feed(series([97], start=5))
    assert feed.engine.next_deadline() == T0 + 35_000
