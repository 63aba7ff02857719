"""The vectorized alert engine equals the per-reading reference on random streams.

Streams are whole envelopes (numerics and waveform blocks of one device), cut into batches
at random envelope boundaries, with the clock ticking at random points between batches.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.rules import AlertEngine
from tests.checks.reference import ReferenceRules
from tests.checks.streams import Block, Reading, numeric_columns, split, test_profiles, waveform_columns

PROFILES = test_profiles()
_VALUES = st.sampled_from([-1.0, 0.0, 1.0, 2.0, 2.9, 3.0, 4.0, 4.4, 4.5, 5.0, 6.0, 7.0, 7.5, 8.0, 11.0, 20.0])


@st.composite
def envelopes(draw: st.DrawFn) -> list[tuple[list[Reading], list[Block]]]:
    """Envelopes in arrival order; times mostly advance, sometimes repeat or go back."""
    out = []
    clock = {"d1": 0, "d2": 0, "d3": 0}
    for env in range(draw(st.integers(0, 40))):
        dev = draw(st.sampled_from(sorted(clock)))
        prof = "tq" if dev == "d3" and draw(st.booleans()) else "tp"
        clock[dev] = max(0, clock[dev] + draw(st.sampled_from([0, 500, 1000, 1000, 2000, 4000, 9000, -1500])))
        readings, blocks = [], []
        for k in range(draw(st.integers(0, 3))):
            t = clock[dev] + 500 * k
            metric = "a" if prof == "tq" else draw(st.sampled_from(["a", "a", "b", "c"]))
            readings.append(Reading(dev, metric, t, draw(_VALUES), t, prof, env))
        if prof == "tp" and (not readings or draw(st.booleans())):
            blocks.append(Block(dev, "w", clock[dev], 4.0, (0.0, 0.5), clock[dev], prof, env))
        out.append((readings, blocks))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=envelopes())
def test_events_equal_reference(data: st.DataObject, stream: list[tuple[list[Reading], list[Block]]]) -> None:
    batches = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6).map(sorted)))
    state = CheckState()
    engine = AlertEngine(PROFILES)
    reference = ReferenceRules(PROFILES)
    clock = 0
    for batch in batches:
        num = numeric_columns([r for rs, _ in batch for r in rs])
        wav = waveform_columns([b for _, bs in batch for b in bs])
        flags, _ = run_checks(num, wav, PROFILES, state, CheckSettings())
        got = engine.evaluate(num, flags, wav)
        assert got == reference.evaluate(num, flags, wav)
        if data.draw(st.booleans()):
            clock += data.draw(st.sampled_from([0, 1000, 3000, 5000, 20000]))
            assert engine.tick(clock) == reference.tick(clock)
        assert engine.active() == reference.active()
    assert engine.tick(clock + 60_000) == reference.tick(clock + 60_000)
    assert engine.active() == reference.active()
