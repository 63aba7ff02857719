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


@settings(max_examples=300, deadline=None)
@given(data=st.data(), readings=_spiky())
def test_spike_chains_equal_reference(data: st.DataObject, readings: list[Reading]) -> None:
    """Streams built to need the wide search of ``rate._extend`` and several chain rounds."""
    batches = split(readings, data.draw(cuts(len(readings))))
    got, _ = _vectorized(batches, [[] for _ in batches])
    want, _ = _reference(readings, [])
    assert got.tolist() == want.tolist()


def test_empty_batch_gives_empty_flags() -> None:
    a, b = run_checks(NumericColumns.empty(), WaveformColumns.empty(), PROFILES, CheckState(), SETTINGS)
    assert a.shape == (0,) and b.shape == (0,)
