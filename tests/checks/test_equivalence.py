"""The vectorized checks equal the per-reading reference on random streams, cut anywhere."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.model import NumericColumns, WaveformColumns
from tests.checks.reference import ReferenceChecks
from tests.checks.streams import Block, Reading, cuts, numeric_columns, numeric_streams, split, test_profiles, waveform_columns, waveform_streams

PROFILES = test_profiles()
SETTINGS = CheckSettings()


def _vectorized(batches_num: list, batches_wav: list) -> tuple[np.ndarray, np.ndarray]:
    state = CheckState()
    nf, wf = [], []
    for nb, wb in zip(batches_num, batches_wav):
        a, b = run_checks(numeric_columns(nb), waveform_columns(wb), PROFILES, state, SETTINGS)
        assert a.dtype == np.int32 and b.dtype == np.int32
        nf.append(a)
        wf.append(b)
    return np.concatenate(nf), np.concatenate(wf)


def _reference(readings: list[Reading], blocks: list[Block]) -> tuple[np.ndarray, np.ndarray]:
    return ReferenceChecks(PROFILES).run(numeric_columns(readings), waveform_columns(blocks))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), readings=numeric_streams())
def test_numeric_flags_equal_reference(data: st.DataObject, readings: list[Reading]) -> None:
    points = data.draw(cuts(len(readings)))
    batches = split(readings, points)
    got, _ = _vectorized(batches, [[] for _ in batches])
    want, _ = _reference(readings, [])
    assert got.tolist() == want.tolist()


@settings(max_examples=200, deadline=None)
@given(data=st.data(), blocks=waveform_streams())
def test_waveform_flags_equal_reference(data: st.DataObject, blocks: list[Block]) -> None:
    points = data.draw(cuts(len(blocks)))
    batches = split(blocks, points)
    _, got = _vectorized([[] for _ in batches], batches)
    _, want = _reference([], blocks)
    assert got.tolist() == want.tolist()


@st.composite
def _spiky(draw: st.DrawFn) -> list[Reading]:
    """One key, strictly increasing times, values that jump often: long SPIKE runs."""
    n = draw(st.integers(1, 120))
    base = draw(st.sampled_from([0.0, 5.0]))
    t = 0
    out = []
    for _ in range(n):
        t += draw(st.sampled_from([1, 100, 1000, 1000, 3000]))
        v = draw(st.one_of(st.just(base), st.floats(-4.0, 4.0, width=16), st.sampled_from([4.9, -4.9, 4.0])))
        out.append(Reading("d1", "b", t, v, t))
    return out


@st.composite
def _plateaus(draw: st.DrawFn) -> list[Reading]:
    """One key, runs of up to 80 equal values 1 ms apart: SPIKE runs longer than rate.WIDE."""
    t = 0
    out = []
    for _ in range(draw(st.integers(1, 6))):
        v = draw(st.sampled_from([0.0, 0.0, 2.0, -3.0, 4.5]))
        step = draw(st.sampled_from([1, 1, 1000]))
        for _ in range(draw(st.integers(1, 80))):
            t += step
            out.append(Reading("d1", "b", t, v, t))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), readings=st.one_of(_spiky(), _plateaus()))
def test_spike_chains_equal_reference(data: st.DataObject, readings: list[Reading]) -> None:
    """Streams built to need the chain machinery of ``rate``, its wide search included."""
    batches = split(readings, data.draw(cuts(len(readings))))
    got, _ = _vectorized(batches, [[] for _ in batches])
    want, _ = _reference(readings, [])
    assert got.tolist() == want.tolist()


def test_empty_batch_gives_empty_flags() -> None:
    a, b = run_checks(NumericColumns.empty(), WaveformColumns.empty(), PROFILES, CheckState(), SETTINGS)
    assert a.shape == (0,) and b.shape == (0,)


def test_spike_runs_of_every_length_up_to_200() -> None:
    """Every offset of the windowed and doubling searches for ``next`` is hit once."""
    for length in range(1, 201):
        values = [0.0, 0.0] + [3.0] * length + [0.0, 0.0, 3.0]
        readings = [Reading("d1", "b", 1000 + i, v, 1000 + i) for i, v in enumerate(values)]
        got, _ = _vectorized([readings], [[]])
        want, _ = _reference(readings, [])
        assert got.tolist() == want.tolist(), length
