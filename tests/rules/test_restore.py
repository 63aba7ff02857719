"""``AlertEngine.restore``: episodes still active in storage after a restart close as usual."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.model import AlertEvent
from gateway.profiles import load_profiles
from gateway.rules import AlertEngine
from tests.checks.streams import Reading, numeric_columns, waveform_columns

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "device_profiles")
T0 = 1_764_187_200_000
PO = "pulse_oximeter"


def spo2(t_s: float, v: float, device: str = "po-r1") -> Reading:
    t = T0 + int(t_s * 1000)
    return Reading(device, "spo2", t, v, t, PO, 0)


def run(engine: AlertEngine, readings: list[Reading]) -> list[AlertEvent]:
    num = numeric_columns(readings)
    flags, _ = run_checks(num, waveform_columns([]), PROFILES, CheckState(), CheckSettings())
    return engine.evaluate(num, flags)


def opened(rule: str, device: str = "po-r1", at_s: float = 5, value: float | None = 88.0) -> AlertEvent:
    metric = None if rule == "probe_silent" else "spo2"
    priority = "medium" if rule == "probe_silent" else "high"
    return AlertEvent("open", device, rule, priority, metric, T0 + int(at_s * 1000), value, None, PO)


def test_a_restored_episode_closes_on_the_first_clearing_reading() -> None:
    engine = AlertEngine(PROFILES)
    assert engine.restore([opened("spo2_low")], {"po-r1": T0 + 10_000}) == []
    assert [e.rule for e in engine.active()] == ["spo2_low"]
    assert run(engine, [spo2(11, 88), spo2(12, 91)]) == []  # still below, then not yet clear
    events = run(engine, [spo2(13, 93), spo2(14, 95)])
    assert [(e.event, e.rule, e.at, e.value) for e in events] == [("close", "spo2_low", T0 + 13_000, 93.0)]
    assert engine.active() == []


def test_without_restore_nothing_closes_and_a_still_met_condition_reopens() -> None:
    engine = AlertEngine(PROFILES)
    assert run(engine, [spo2(13, 93)]) == []
    engine = AlertEngine(PROFILES)
    assert [e.event for e in run(engine, [spo2(i, 88) for i in range(11)])] == ["open"]


def test_a_restored_silent_episode_closes_on_the_next_reading_and_latest_feeds_silent() -> None:
    engine = AlertEngine(PROFILES)
    engine.restore([opened("probe_silent", device="po-r2", at_s=40, value=None)], {"po-r2": T0 + 10_000})
    events = run(engine, [spo2(100, 97, device="po-r2")])
    assert [(e.event, e.rule, e.at) for e in events] == [("close", "probe_silent", T0 + 100_000)]
    engine = AlertEngine(PROFILES)
    engine.restore([], {"po-r3": T0 + 200_000})
    run(engine, [spo2(100, 97, device="po-r3")])  # older than the stored latest: silent counts from 200 s
    assert engine.next_deadline() == T0 + 230_000


def test_restore_leaves_devices_with_state_and_unknown_rules_alone() -> None:
    engine = AlertEngine(PROFILES)
    run(engine, [spo2(1, 97, device="po-r4")])
    ep = opened("spo2_low", device="po-r4")
    unknown = AlertEvent("open", "po-r5", "no_such_rule", "high", "spo2", T0, 80.0, None, PO)
    assert engine.restore([ep, unknown], {"po-r4": T0 + 50_000}) == [ep, unknown]
    assert engine.active() == []
    assert run(engine, [spo2(2, 93, device="po-r4")]) == []
    assert int(np.int64(engine.next_deadline() or 0)) == T0 + 32_000  # latest not restored either


def test_arming_at_restore_opens_silent_at_latest_plus_after_s_without_a_reading() -> None:
    engine = AlertEngine(PROFILES)
    engine.restore([], {"po-r6": T0 + 10_000, "po-r7": T0 + 20_000})
    assert engine.arm(["po-r6", "po-r8"], [PO, PO]) == ["po-r6"]
    assert engine.next_deadline() == T0 + 40_000  # po-r7 is not armed; po-r8 has no latest reading
    events = engine.tick(T0 + 100_000)
    assert [(e.event, e.device_id, e.rule, e.at) for e in events] == [("open", "po-r6", "probe_silent", T0 + 40_000)]
    closing = run(engine, [spo2(120, 97, device="po-r6")])
    assert [(e.event, e.rule, e.at) for e in closing] == [("close", "probe_silent", T0 + 120_000)]


def test_arming_leaves_a_restored_open_silent_episode_open_once() -> None:
    engine = AlertEngine(PROFILES)
    engine.restore([opened("probe_silent", device="po-r9", at_s=40, value=None)], {"po-r9": T0 + 10_000})
    assert engine.arm(["po-r9"], [PO]) == ["po-r9"]
    assert engine.tick(T0 + 100_000) == []  # already open: no second episode
    assert [e.rule for e in engine.active()] == ["probe_silent"]


def test_a_run_in_progress_is_rebuilt_from_the_recent_readings_and_opens_when_it_would_have() -> None:
    whole = AlertEngine(PROFILES)
    opened_at = [e.at for e in run(whole, [spo2(i, 88, device="po-r6") for i in range(15)]) if e.event == "open"]
    assert opened_at == [T0 + 10_000]
    engine = AlertEngine(PROFILES)
    assert engine.run_window_ms >= 10_000
    recent = [("po-r6", PO, "spo2", T0 + i * 1000, 88.0) for i in range(6)]  # stored before the hand-over
    assert engine.restore([], {"po-r6": T0 + 5000}, recent) == []
    assert engine.active() == []  # a run is no episode
    events = run(engine, [spo2(i, 88, device="po-r6") for i in range(6, 15)])
    assert [(e.event, e.at) for e in events] == [("open", T0 + 10_000)]


def test_a_broken_run_is_not_rebuilt_and_stored_episodes_decide_what_is_open() -> None:
    engine = AlertEngine(PROFILES)
    recent = [("po-r7", PO, "spo2", T0 + i * 1000, 88.0 if i != 3 else 97.0) for i in range(12)]
    engine.restore([], {"po-r7": T0 + 11_000}, recent)  # this window alone would open at 14 s ...
    assert engine.active() == []  # ... but storage has no open episode: none is invented
    events = run(engine, [spo2(i, 88, device="po-r7") for i in range(12, 15)])
    assert [(e.event, e.at) for e in events] == [("open", T0 + 14_000)]  # the run began at 4 s


def test_a_device_taken_on_before_its_next_reading_is_armed_from_its_stored_latest() -> None:
    engine = AlertEngine(PROFILES)
    engine.restore([], {"po-r8": T0 + 10_000})
    assert engine.arm(["po-r8", "po-unknown"], [PO, PO]) == ["po-r8"]  # no latest: nothing to count from
    assert engine.next_deadline() == T0 + 40_000
    assert [(e.rule, e.at) for e in engine.tick(T0 + 40_001)] == [("probe_silent", T0 + 40_000)]
