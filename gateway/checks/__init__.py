"""Signal-quality checks over a whole batch (PROTOCOL section 3), vectorized with numpy.

``run_checks`` flags every numeric reading and waveform block of a batch at once: all
devices, all metrics, no per-reading Python loop. Readings are sorted by (device, metric)
and arrival with one stable argsort; the sequential parts of the rules (``prev``, ``ref``,
runs of equal values) are rebuilt with the grouping tricks of ``gateway.checks.groups``.
Per (device, metric) state is carried in a ``CheckState`` between batches, so the flags do
not depend on how a stream is cut into batches.

Checks are pure: no I/O, no clock, no metrics. The same code serves live ingestion and
offline replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gateway.checks.flatline import flatline
from gateway.checks.groups import group_first, group_last, shift, sort_groups
from gateway.checks.range import block_flags, range_flags
from gateway.checks.rate import spikes
from gateway.checks.state import CheckState, pair_codes
from gateway.checks.timing import clock_flags, gap_flags, out_of_order
from gateway.model import Flag, NumericColumns, WaveformColumns
from gateway.profiles import Profile

__all__ = ["CheckSettings", "CheckState", "run_checks"]

_INF = np.inf
_BASE_ARTIFACT = int(Flag.OUT_OF_RANGE | Flag.NOT_FINITE)


@dataclass(frozen=True)
class CheckSettings:
    """Gateway-wide settings of the clock checks.

    Attributes:
        max_clock_skew_s: CLOCK_FUTURE when a timestamp is more than this ahead of receipt.
        max_staleness_s: CLOCK_STALE when a timestamp is more than this older than receipt.
    """

    max_clock_skew_s: float = 60.0
    max_staleness_s: float = 86400.0


@dataclass(frozen=True)
class _Params:
    """Per (profile id, metric id) check parameters; ``inf`` where a check is off."""

    low: np.ndarray
    high: np.ndarray
    max_rate: np.ndarray
    flatline_ms: np.ndarray
    gap_ms: np.ndarray  # numeric: gap_factor * interval_s * 1000
    gap_factor: np.ndarray  # waveform: compared with block gap * hz / 1000


def _params(profiles: Mapping[str, Profile], state: CheckState) -> _Params:
    """Parameter tables for the ids interned so far, cached while nothing changes."""
    key = (id(profiles), tuple(map(id, profiles.values())), len(state.profiles), len(state.metrics))
    cached = state.cached_params(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    shape = (max(len(state.profiles), 1), max(len(state.metrics), 1))
    low, high = np.full(shape, -_INF), np.full(shape, _INF)
    # (no builtin range() here: the submodule gateway.checks.range shadows it in this namespace)
    rate, flat, gap, gapf = np.full((4, *shape), _INF)
    for pname, pid in state.profiles.items():
        prof = profiles.get(pname)
        if prof is None:
            continue
        for mname, spec in prof.metrics.items():
            mid = state.metrics.get(mname)
            if mid is None:
                continue
            low[pid, mid], high[pid, mid] = spec.plausible
            if spec.max_rate is not None:
                rate[pid, mid] = spec.max_rate
            if spec.flatline_s is not None:
                flat[pid, mid] = spec.flatline_s * 1000.0
            if spec.gap_factor is not None:
                gapf[pid, mid] = spec.gap_factor
                if spec.interval_s is not None:
                    gap[pid, mid] = spec.gap_factor * spec.interval_s * 1000.0
    params = _Params(low, high, rate, flat, gap, gapf)
    state.store_params(key, params)
    return params


def run_checks(
    num: NumericColumns,
    wav: WaveformColumns,
    profiles: Mapping[str, Profile],
    state: CheckState,
    settings: CheckSettings,
) -> tuple[np.ndarray, np.ndarray]:
    """Flag a batch and advance the state.

    Args:
        num: numeric readings in arrival order; ``num.profile[i]`` names reading i's profile.
        wav: waveform blocks in arrival order.
        profiles: the loaded device profiles by name.
        state: per (device, metric) state, updated in place.
        settings: clock-check settings.

    Returns:
        ``(numeric_flags, waveform_flags)``: int32 bitmasks of ``Flag``, one per numeric
        reading and one per waveform block (the OR of its samples' flags).
    """
    skew_ms = settings.max_clock_skew_s * 1000.0
    stale_ms = settings.max_staleness_s * 1000.0
    return (
        _numeric(num, profiles, state, skew_ms, stale_ms),
        _waveform(wav, profiles, state, skew_ms, stale_ms),
    )


def _numeric(num: NumericColumns, profiles: Mapping[str, Profile], state: CheckState, skew_ms: float, stale_ms: float) -> np.ndarray:
    if len(num) == 0:
        return np.zeros(0, dtype=np.int32)
    dev, met, prof = state.devices.ids(num.device), state.metrics.ids(num.metric), state.profiles.ids(num.profile)
    p = _params(profiles, state)
    t = np.asarray(num.t, dtype=np.int64)
    v = np.asarray(num.value, dtype=np.float64)
    flags = range_flags(v, p.low[prof, met], p.high[prof, met])
    flags |= clock_flags(t, np.asarray(num.received_at, dtype=np.int64), skew_ms, stale_ms)

    slots = state.numeric_keys.slots(pair_codes(dev, met))
    st = state.numeric
    st.grow(state.numeric_keys.size)
    order, first = sort_groups(slots)
    s = slots[order]
    ooo = out_of_order(t[order], first, st.has_prev[s], st.prev_t[s])
    sorted_flags = flags[order]
    sorted_flags[ooo] |= int(Flag.OUT_OF_ORDER)

    keep = np.flatnonzero(~ooo)
    idx = order[keep]  # original index of each in-order reading, sorted by (key, arrival)
    ks, kt, kv = s[keep], t[idx], v[idx]
    kfirst = group_first(ks)
    has_prev = ~kfirst | st.has_prev[ks]
    prev_t = np.where(kfirst, st.prev_t[ks], shift(kt, 0))
    prev_v = np.where(kfirst, st.prev_v[ks], shift(kv, 0.0))
    pm = (prof[idx], met[idx])
    kflags = gap_flags(kt - prev_t, p.gap_ms[pm], has_prev)
    flat, run_t = flatline(kt, kv, prev_v, has_prev, kfirst, st.run_t[ks], p.flatline_ms[pm])
    kflags |= flat
    candidate = (sorted_flags[keep] & _BASE_ARTIFACT) == 0
    spike, ref_at = spikes(kt, kv, p.max_rate[pm], kfirst, candidate, st.has_ref[ks], st.ref_t[ks], st.ref_v[ks])
    kflags[spike] |= int(Flag.SPIKE)
    sorted_flags[keep] |= kflags

    last = group_last(kfirst)
    ls = ks[last]
    st.has_prev[ls] = True
    st.prev_t[ls], st.prev_v[ls], st.run_t[ls] = kt[last], kv[last], run_t[last]
    ri = ref_at[last]
    moved = ri >= 0
    st.has_ref[ls[moved]] = True
    st.ref_t[ls[moved]], st.ref_v[ls[moved]] = kt[ri[moved]], kv[ri[moved]]

    flags[order] = sorted_flags
    return flags


def _waveform(wav: WaveformColumns, profiles: Mapping[str, Profile], state: CheckState, skew_ms: float, stale_ms: float) -> np.ndarray:
    if len(wav) == 0:
        return np.zeros(0, dtype=np.int32)
    dev, met, prof = state.devices.ids(wav.device), state.metrics.ids(wav.metric), state.profiles.ids(wav.profile)
    p = _params(profiles, state)
    t0 = np.asarray(wav.t0, dtype=np.int64)
    hz = np.asarray(wav.hz, dtype=np.float64)
    offsets = np.asarray(wav.offsets, dtype=np.int64)
    flags = block_flags(np.asarray(wav.samples, dtype=np.float64), offsets, p.low[prof, met], p.high[prof, met])
    flags |= clock_flags(t0, np.asarray(wav.received_at, dtype=np.int64), skew_ms, stale_ms)
    dur = np.diff(offsets) * 1000.0 / hz

    slots = state.waveform_keys.slots(pair_codes(dev, met))
    st = state.waveform
    st.grow(state.waveform_keys.size)
    order, first = sort_groups(slots)
    s = slots[order]
    ooo = out_of_order(t0[order], first, st.has_prev[s], st.prev_t[s])
    sorted_flags = flags[order]
    sorted_flags[ooo] |= int(Flag.OUT_OF_ORDER)

    keep = np.flatnonzero(~ooo)
    idx = order[keep]
    ks, kt, kdur = s[keep], t0[idx], dur[idx]
    kfirst = group_first(ks)
    has_prev = ~kfirst | st.has_prev[ks]
    prev_t = np.where(kfirst, st.prev_t[ks], shift(kt, 0))
    prev_dur = np.where(kfirst, st.prev_dur[ks], shift(kdur, 0.0))
    limit = p.gap_factor[prof[idx], met[idx]] * 1000.0 / hz[idx]
    sorted_flags[keep] |= gap_flags((kt - prev_t) - prev_dur, limit, has_prev)

    last = group_last(kfirst)
    ls = ks[last]
    st.has_prev[ls] = True
    st.prev_t[ls], st.prev_dur[ls] = kt[last], kdur[last]

    flags[order] = sorted_flags
    return flags
