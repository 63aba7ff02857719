"""Builders of column batches and hypothesis strategies for random reading streams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import msgspec
import numpy as np
from hypothesis import strategies as st

from gateway.model import NumericColumns, WaveformColumns
from gateway.profiles import Profile

__all__ = ["Reading", "Block", "numeric_columns", "waveform_columns", "test_profiles", "numeric_streams", "waveform_streams", "cuts", "split"]


class Reading(NamedTuple):
    device: str
    metric: str
    t: int
    value: float
    received_at: int
    profile: str = "tp"
    env: int = 0


class Block(NamedTuple):
    device: str
    metric: str
    t0: int
    hz: float
    samples: tuple[float, ...]
    received_at: int
    profile: str = "tp"
    env: int = 0


def _obj(items: Sequence[str]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = list(items)
    return out


def numeric_columns(readings: Sequence[Reading]) -> NumericColumns:
    """Columns of readings given in arrival order."""
    if not readings:
        return NumericColumns.empty()
    return NumericColumns(
        device=_obj([r.device for r in readings]),
        metric=_obj([r.metric for r in readings]),
        profile=_obj([r.profile for r in readings]),
        t=np.array([r.t for r in readings], dtype=np.int64),
        value=np.array([r.value for r in readings], dtype=np.float64),
        received_at=np.array([r.received_at for r in readings], dtype=np.int64),
        env=np.array([r.env for r in readings], dtype=np.int32),
    )


def waveform_columns(blocks: Sequence[Block]) -> WaveformColumns:
    """Columns of waveform blocks given in arrival order."""
    if not blocks:
        return WaveformColumns.empty()
    lens = [len(b.samples) for b in blocks]
    offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return WaveformColumns(
        device=_obj([b.device for b in blocks]),
        metric=_obj([b.metric for b in blocks]),
        profile=_obj([b.profile for b in blocks]),
        t0=np.array([b.t0 for b in blocks], dtype=np.int64),
        hz=np.array([b.hz for b in blocks], dtype=np.float64),
        received_at=np.array([b.received_at for b in blocks], dtype=np.int64),
        env=np.array([b.env for b in blocks], dtype=np.int32),
        offsets=offsets,
        samples=np.array([x for b in blocks for x in b.samples], dtype=np.float64),
    )


_TEST_PROFILES = """
[profile]
name = "tp"
version = "1.0.0"

[metrics.a]
kind = "numeric"
unit = "%"
mdc = "MDC_PULS_OXIM_SAT_O2"
mdc_code = 150456
interval_s = 1.0
plausible = [0.0, 10.0]
max_rate = 2.0
flatline_s = 3.0
gap_factor = 2.0

[metrics.b]
kind = "numeric"
unit = "/min"
mdc = "MDC_PULS_OXIM_PULS_RATE"
mdc_code = 149530
interval_s = 0.5
plausible = [-5.0, 5.0]
max_rate = 0.5

[metrics.c]
kind = "numeric"
unit = "/min"
mdc = "MDC_RESP_RATE"
mdc_code = 151562
interval_s = 1.0
plausible = [0.0, 10.0]

[metrics.w]
kind = "waveform"
unit = "mV"
mdc = "MDC_ECG_ELEC_POTL_II"
mdc_code = 131330
hz = 4.0
plausible = [-1.0, 1.0]
gap_factor = 1.5

[[alerts]]
name = "a_low"
metric = "a"
when = "below"
threshold = 3.0
for_s = 2.0
clear = 5.0
priority = "high"

[[alerts]]
name = "a_high"
metric = "a"
when = "above"
threshold = 7.0
clear = 7.0
priority = "low"

[[alerts]]
name = "b_high"
metric = "b"
when = "above"
threshold = 1.0
for_s = 1.5
clear = 0.0
priority = "medium"

[[alerts]]
name = "quiet"
when = "silent"
after_s = 3.0
priority = "medium"
"""

_SECOND = """
[profile]
name = "tq"
version = "1.0.0"

[metrics.a]
kind = "numeric"
unit = "%"
mdc = "MDC_PULS_OXIM_SAT_O2"
mdc_code = 150456
interval_s = 2.0
plausible = [1.0, 9.0]
max_rate = 1.0
flatline_s = 1.0
gap_factor = 1.0

[[alerts]]
name = "a_low"
metric = "a"
when = "below"
threshold = 4.0
clear = 4.5
priority = "medium"

[[alerts]]
name = "gone"
when = "silent"
after_s = 1.5
priority = "low"

[[alerts]]
name = "long_gone"
when = "silent"
after_s = 4.0
priority = "low"
"""


def test_profiles() -> dict[str, Profile]:
    """Two small profiles whose limits random streams cross often."""
    return {
        "tp": msgspec.toml.decode(_TEST_PROFILES.encode(), type=Profile),
        "tq": msgspec.toml.decode(_SECOND.encode(), type=Profile),
    }


test_profiles.__test__ = False  # type: ignore[attr-defined]

_VALUES = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, -1.0, 11.0, 50.0]),
    st.floats(min_value=-20.0, max_value=30.0, allow_nan=False, width=32),
)


@st.composite
def numeric_streams(draw: st.DrawFn, max_size: int = 60, profiles: Sequence[str] = ("tp", "tq")) -> list[Reading]:
    """Readings in arrival order: few devices and metrics, steps that repeat, go back or jump."""
    n = draw(st.integers(0, max_size))
    devices = draw(st.lists(st.sampled_from(["d1", "d2", "d3"]), min_size=1, max_size=3, unique=True))
    clock: dict[tuple[str, str], int] = {}
    out: list[Reading] = []
    env = 0
    for _ in range(n):
        dev = draw(st.sampled_from(devices))
        prof = "tp" if dev != "d3" else draw(st.sampled_from(list(profiles)))
        metric = "a" if prof == "tq" else draw(st.sampled_from(["a", "a", "b", "c"]))
        step = draw(st.sampled_from([0, 250, 500, 1000, 1000, 1000, 1500, 2000, 3000, 5000, -1000, -3000]))
        t = max(0, clock.get((dev, metric), 10_000) + step)
        clock[(dev, metric)] = max(t, clock.get((dev, metric), 0))
        skew = draw(st.sampled_from([0, 0, 0, 500, 61_000, -90_000_000]))
        # One envelope carries one device and one profile.
        if out and (out[-1].device, out[-1].profile) != (dev, prof):
            env += 1
        else:
            env += draw(st.sampled_from([0, 1]))
        out.append(Reading(dev, metric, t, draw(_VALUES), t - skew, prof, env))
    return out


@st.composite
def waveform_streams(draw: st.DrawFn, max_size: int = 30) -> list[Block]:
    """Waveform blocks in arrival order, contiguous or not, some with bad samples."""
    n = draw(st.integers(0, max_size))
    out: list[Block] = []
    nxt: dict[str, int] = {}
    sample = st.one_of(
        st.floats(min_value=-1.0, max_value=1.0),
        st.sampled_from([2.0, -3.0, float("nan"), float("inf")]),
    )
    for env in range(n):
        dev = draw(st.sampled_from(["d1", "d2"]))
        hz = draw(st.sampled_from([4.0, 4.0, 3.0]))
        k = draw(st.integers(1, 6))
        t0 = max(0, nxt.get(dev, 0) + draw(st.sampled_from([0, 0, 0, 250, 400, 1000, -500, -2000])))
        nxt[dev] = t0 + int(k * 1000 / hz)
        samples = tuple(draw(st.lists(sample, min_size=k, max_size=k)))
        skew = draw(st.sampled_from([0, 0, 70_000]))
        out.append(Block(dev, "w", t0, hz, samples, t0 - skew, "tp", env))
    return out


def cuts(n: int) -> st.SearchStrategy[list[int]]:
    """Sorted cut points splitting ``n`` items into batches."""
    return st.lists(st.integers(0, n), max_size=5).map(sorted)


def split(items: Sequence[object], points: Sequence[int]) -> list[Sequence[object]]:
    """``items`` cut at ``points`` (empty batches included)."""
    bounds = [0, *points, len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]
