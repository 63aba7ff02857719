"""Each quality flag of PROTOCOL section 3 on small, hand-written streams.

Uses the shipped pulse_oximeter profile: spo2 plausible [0, 100], max_rate 5 %/s,
flatline_s 120, interval 1 s with gap_factor 3; pleth 125 Hz, plausible [-10, 10], gap_factor 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.model import Flag, WaveformColumns
from gateway.profiles import load_profiles
from tests.checks.streams import Block, Reading, numeric_columns, waveform_columns

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "device_profiles")
T0 = 1_764_187_200_000
PO = "pulse_oximeter"


def spo2(t_s: float, v: float, device: str = "po-1", received_s: float | None = None) -> Reading:
    t = T0 + int(t_s * 1000)
    received = t if received_s is None else T0 + int(received_s * 1000)
    return Reading(device, "spo2", t, v, received, PO)


def flags_of(*batches: list[Reading], settings: CheckSettings | None = None) -> list[int]:
    """Flags of the readings, batch after batch, with state carried across batches."""
    state = CheckState()
    out: list[int] = []
    for batch in batches:
        f, _ = run_checks(numeric_columns(batch), WaveformColumns.empty(), PROFILES, state, settings or CheckSettings())
        out += f.tolist()
    return out


def names(flags: list[int]) -> list[set[str]]:
    return [{f.name for f in Flag if v & f} for v in flags]  # type: ignore[misc]


def test_clean_stream_has_no_flags() -> None:
    assert flags_of([spo2(i, 97 + (i % 2)) for i in range(10)]) == [0] * 10


def test_out_of_range_bounds_are_inclusive() -> None:
    got = flags_of([spo2(0, 0.0, "a"), spo2(0, 100.0, "b"), spo2(0, 100.5, "c"), spo2(0, -0.5, "d")])
    assert got == [0, 0, int(Flag.OUT_OF_RANGE), int(Flag.OUT_OF_RANGE)]


def test_spike_against_the_last_good_reading_and_a_spike_never_becomes_ref() -> None:
    # 97 -> 80 in 1 s is 17 %/s; 96 a second later is compared with 97 (not with 80).
    got = names(flags_of([spo2(0, 97), spo2(1, 80), spo2(2, 96), spo2(3, 97)]))
    assert got == [set(), {"SPIKE"}, set(), set()]


def test_spike_threshold_is_strict_and_not_evaluated_without_ref() -> None:
    # exactly 5 %/s is not a spike; the very first reading has no ref.
    assert flags_of([spo2(0, 90), spo2(1, 95), spo2(3, 85)]) == [0, 0, 0]
    assert flags_of([spo2(0, 90), spo2(1, 95.5)]) == [0, int(Flag.SPIKE)]


def test_out_of_range_reading_is_not_ref() -> None:
    # 150 is OUT_OF_RANGE (and a spike); 95 after it is compared with 96, not with 150.
    got = names(flags_of([spo2(0, 96), spo2(1, 150), spo2(2, 95)]))
    assert got == [set(), {"OUT_OF_RANGE", "SPIKE"}, set()]


def test_spike_state_carries_across_batches() -> None:
    assert flags_of([spo2(0, 97)], [spo2(1, 80)], [spo2(2, 96)]) == [0, int(Flag.SPIKE), 0]


def test_flatline_after_flatline_s_of_equal_values() -> None:
    readings = [spo2(i, 95.0) for i in range(0, 130, 1)]
    got = flags_of(readings[:50], readings[50:])
    assert all(f == 0 for f in got[:120])  # t - run_start < 120 s
    assert all(f == int(Flag.FLATLINE) for f in got[120:])


def test_flatline_run_restarts_on_change() -> None:
    readings = [spo2(i, 95.0) for i in range(100)] + [spo2(100, 96.0)] + [spo2(i, 95.0) for i in range(101, 225)]
    got = flags_of(readings)
    assert not any(got[:221])  # the run restarted at t = 101 s
    assert all(f == int(Flag.FLATLINE) for f in got[221:])


def test_gap_is_strictly_more_than_gap_factor_intervals_and_never_first() -> None:
    got = flags_of([spo2(0, 97), spo2(3, 97.5), spo2(6.001, 97)], [spo2(20, 97.5)])
    assert got == [0, 0, int(Flag.GAP), int(Flag.GAP)]


def test_clock_future_and_stale_against_receipt() -> None:
    settings = CheckSettings(max_clock_skew_s=60, max_staleness_s=3600)
    got = flags_of(
        [spo2(0, 97, "a", received_s=-60), spo2(61, 97, "b", received_s=0), spo2(62, 97, "c", received_s=3662),
         spo2(63, 97, "d", received_s=3663.001)],
        settings=settings,
    )
    assert got == [0, int(Flag.CLOCK_FUTURE), 0, int(Flag.CLOCK_STALE)]


def test_out_of_order_and_duplicate_timestamps() -> None:
    # 3 s repeats (duplicate) and 2 s comes late: both OUT_OF_ORDER, and they do not move prev/ref:
    # the reading at 4 s is compared with 97 at 3 s (no GAP, no SPIKE against 10 or 50).
    got = names(flags_of([spo2(0, 96), spo2(3, 97), spo2(3, 97), spo2(2, 10)], [spo2(4, 97.5), spo2(1, 50)]))
    assert got == [set(), set(), {"OUT_OF_ORDER"}, {"OUT_OF_ORDER"}, set(), {"OUT_OF_ORDER"}]


def test_out_of_order_reading_gets_only_range_and_clock_flags() -> None:
    got = flags_of([spo2(10, 97), spo2(5, 150)])
    assert got == [0, int(Flag.OUT_OF_ORDER | Flag.OUT_OF_RANGE)]


def test_state_is_per_device_and_metric() -> None:
    pr = Reading("po-1", "pulse_rate", T0 + 1000, 200.0, T0 + 1000, PO)
    other = spo2(1, 50, device="po-2")
    assert flags_of([spo2(0, 97), pr, other, spo2(1, 97)]) == [0, 0, 0, 0]


def _block(t0_ms: int, samples: list[float], device: str = "po-1") -> Block:
    return Block(device, "pleth", T0 + t0_ms, 125.0, tuple(samples), T0 + t0_ms, PO)


def wave_flags(*batches: list[Block]) -> list[int]:
    state = CheckState()
    out: list[int] = []
    for batch in batches:
        _, f = run_checks(numeric_columns([]), waveform_columns(batch), PROFILES, state, CheckSettings())
        out += f.tolist()
    return out


def test_waveform_block_is_the_or_of_its_samples() -> None:
    got = wave_flags([_block(0, [0.1, 0.2]), _block(16, [0.1, 10.5, float("nan")]), _block(40, [float("inf"), 0.0])])
    assert got == [0, int(Flag.OUT_OF_RANGE | Flag.NOT_FINITE), int(Flag.NOT_FINITE)]


def test_waveform_gap_measured_from_the_end_of_the_previous_block() -> None:
    # 125 Hz: 8 ms per sample. Block 1 ends at 80 ms; contiguous next block at 80 ms is clean,
    # 24 ms later (3/hz) still clean, 25 ms later a GAP.
    got = wave_flags([_block(0, [0.0] * 10), _block(80, [0.0] * 10)], [_block(184, [0.0] * 10), _block(289, [0.0] * 10)])
    assert got == [0, 0, 0, int(Flag.GAP)]


def test_waveform_out_of_order_on_t0() -> None:
    got = wave_flags([_block(1000, [0.0] * 4), _block(1000, [0.0] * 4), _block(500, [0.0] * 4), _block(1032, [0.0] * 4)])
    assert got == [0, int(Flag.OUT_OF_ORDER), int(Flag.OUT_OF_ORDER), 0]


def test_flags_are_int32_in_arrival_order() -> None:
    state = CheckState()
    nf, wf = run_checks(
        numeric_columns([spo2(0, 97, "b"), spo2(0, 97, "a"), spo2(1, 150, "b")]),
        waveform_columns([_block(0, [99.0])]), PROFILES, state, CheckSettings(),
    )
    assert nf.dtype == np.int32 and wf.dtype == np.int32
    assert nf.tolist() == [0, 0, int(Flag.OUT_OF_RANGE | Flag.SPIKE)] and wf.tolist() == [int(Flag.OUT_OF_RANGE)]
