"""``CheckState.seed``: state restored from storage after a restart judges the first readings."""

from __future__ import annotations

from pathlib import Path

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.model import Flag, WaveformColumns
from gateway.profiles import load_profiles
from tests.checks.streams import Block, Reading, numeric_columns, waveform_columns

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "device_profiles")
T0 = 1_764_187_200_000
PO = "pulse_oximeter"


def spo2(t_s: float, v: float, device: str = "po-1") -> Reading:
    t = T0 + int(t_s * 1000)
    return Reading(device, "spo2", t, v, t, PO)


def at(t_s: float) -> int:
    return T0 + int(t_s * 1000)


def flags(state: CheckState, readings: list[Reading]) -> list[int]:
    f, _ = run_checks(numeric_columns(readings), WaveformColumns.empty(), PROFILES, state, CheckSettings())
    return f.tolist()


def test_a_reading_older_than_the_seeded_prev_is_out_of_order() -> None:
    state = CheckState()
    state.seed(numeric=[("po-1", "spo2", at(10), 97.0)], numeric_ref=[("po-1", "spo2", at(10), 97.0)])
    assert flags(state, [spo2(9, 97)]) == [int(Flag.OUT_OF_ORDER)]  # one reading per key
    assert flags(state, [spo2(10, 97), spo2(8, 96), spo2(11, 97)]) == [int(Flag.OUT_OF_ORDER)] * 2 + [0]  # groups


def test_without_seed_the_same_reading_is_clean() -> None:
    assert flags(CheckState(), [spo2(9, 97)]) == [0]


def test_a_jump_from_the_seeded_ref_is_a_spike_and_a_gap_from_the_seeded_prev() -> None:
    state = CheckState()
    # prev was an artifact (a spike at 80); ref is the last good reading, 97 at t = 9 s
    state.seed(numeric=[("po-1", "spo2", at(10), 80.0)], numeric_ref=[("po-1", "spo2", at(9), 97.0)])
    assert flags(state, [spo2(11, 85)]) == [int(Flag.SPIKE)]  # 12 %/s from ref
    state = CheckState()
    state.seed(numeric=[("po-1", "spo2", at(10), 97.0)], numeric_ref=[("po-1", "spo2", at(10), 97.0)])
    assert flags(state, [spo2(20, 96), spo2(21, 60)]) == [int(Flag.GAP), int(Flag.SPIKE)]


def test_seed_leaves_keys_with_state_alone() -> None:
    state = CheckState()
    assert flags(state, [spo2(20, 97)]) == [0]
    state.seed(numeric=[("po-1", "spo2", at(30), 50.0)], numeric_ref=[("po-1", "spo2", at(30), 50.0)])
    assert flags(state, [spo2(21, 97)]) == [0]  # neither OUT_OF_ORDER nor SPIKE: the seed was ignored


def test_waveform_seed_gives_out_of_order_and_gap() -> None:
    state = CheckState()
    # 25 samples at 125 Hz: 200 ms
    state.seed(waveform=[("po-1", "pleth", at(10), 200.0)])
    blocks = [Block("po-1", "pleth", at(9), 125.0, (0.5,) * 25, at(9), PO),
              Block("po-1", "pleth", at(10.2), 125.0, (0.5,) * 25, at(10.2), PO),
              Block("po-1", "pleth", at(11), 125.0, (0.5,) * 25, at(11), PO)]
    _, w = run_checks(numeric_columns([]), waveform_columns(blocks), PROFILES, state, CheckSettings())
    assert w.tolist() == [int(Flag.OUT_OF_ORDER), 0, int(Flag.GAP)]
