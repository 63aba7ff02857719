"""The checks of numeric readings over a whole batch.

Readings are arranged so that each (device, metric) key is contiguous and in arrival order
(``groups.sort_groups``). When every key occurs once in the batch, arrival order already
qualifies and each reading only meets the state carried from earlier batches: the
"singletons" path compares elementwise with that state. Otherwise the general path rebuilds
``prev``, runs and ``ref`` inside each group (``timing``, ``flatline``, ``rate``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gateway.checks.flatline import flatline
from gateway.checks.groups import group_first, group_last, shift, sort_groups
from gateway.checks.params import Params, ids, params
from gateway.checks.range import range_flags
from gateway.checks.rate import compatible, spikes
from gateway.checks.state import CheckState, NumericState, pair_codes
from gateway.checks.timing import clock_flags, gap_flags, out_of_order
from gateway.model import Flag, NumericColumns
from gateway.profiles import Profile

__all__ = ["numeric_flags"]

_CANDIDATE_OFF = int(Flag.OUT_OF_RANGE | Flag.NOT_FINITE)
_OOO, _GAP, _FLAT, _SPIKE = int(Flag.OUT_OF_ORDER), int(Flag.GAP), int(Flag.FLATLINE), int(Flag.SPIKE)


def numeric_flags(num: NumericColumns, profiles: Mapping[str, Profile], state: CheckState, skew_ms: float, stale_ms: float) -> np.ndarray:
    """Flags of every numeric reading of a batch (arrival order); advances ``state``."""
    if len(num) == 0:
        return np.zeros(0, dtype=np.int32)
    dev, met, prof = ids(state, num.device, num.metric, num.profile)
    p = params(profiles, state)
    pm = prof * p.width + met
    t = np.asarray(num.t, dtype=np.int64)
    v = np.asarray(num.value, dtype=np.float64)
    flags = range_flags(v, p.low[pm], p.high[pm])
    flags |= clock_flags(t, np.asarray(num.received_at, dtype=np.int64), skew_ms, stale_ms)

    slots = state.numeric_keys.slots(pair_codes(dev, met))
    st = state.numeric
    st.grow(state.numeric_keys.size)
    order, first = sort_groups(slots, st.scratch)
    if order is None:
        _singletons(t, v, pm, slots, flags, st, p)
        return flags
    flags[order] = _groups(t[order], v[order], pm[order], slots[order], first, flags[order], st, p)
    return flags


def _singletons(t: np.ndarray, v: np.ndarray, pm: np.ndarray, s: np.ndarray, flags: np.ndarray, st: NumericState, p: Params) -> None:
    """Every key occurs once: each reading against its key's carried state, in place."""
    has_prev, prev_t = st.has_prev[s], st.prev_t[s]
    ooo = has_prev & (t <= prev_t)
    fresh = ~ooo
    prev_v, run_t = st.prev_v[s], st.run_t[s]
    same = has_prev & (v == prev_v)
    run_t = np.where(same, run_t, t)
    out = np.where(ooo, _OOO, 0)
    out |= np.where(fresh & has_prev & ((t - prev_t) > p.gap_ms[pm]), _GAP, 0)
    out |= np.where(fresh & same & ((t - run_t) >= p.flatline_ms[pm]), _FLAT, 0)
    has_ref = st.has_ref[s]
    spike = fresh & has_ref & ~compatible(st.ref_t[s], st.ref_v[s], t, v, p.max_rate[pm])
    out |= np.where(spike, _SPIKE, 0)
    flags |= out.astype(np.int32)

    upd = np.flatnonzero(fresh)
    us = s[upd]
    st.has_prev[us] = True
    st.prev_t[us], st.prev_v[us], st.run_t[us] = t[upd], v[upd], run_t[upd]
    became = np.flatnonzero(fresh & ~spike & ((flags & _CANDIDATE_OFF) == 0))
    bs = s[became]
    st.has_ref[bs] = True
    st.ref_t[bs], st.ref_v[bs] = t[became], v[became]


def _groups(
    t: np.ndarray, v: np.ndarray, pm: np.ndarray, s: np.ndarray, first: np.ndarray, flags: np.ndarray, st: NumericState, p: Params,
) -> np.ndarray:
    """Readings sorted by (key, arrival), ``first`` marking group starts: their flags."""
    ooo = out_of_order(t, first, st.has_prev[s], st.prev_t[s])
    if ooo.any():
        flags[ooo] |= _OOO
        keep = np.flatnonzero(~ooo)
        t, v, pm, s = t[keep], v[keep], pm[keep], s[keep]
        first = group_first(s)
    else:
        keep = slice(None)  # type: ignore[assignment]
    has_prev = ~first | st.has_prev[s]
    prev_t = np.where(first, st.prev_t[s], shift(t, 0))
    prev_v = np.where(first, st.prev_v[s], shift(v, 0.0))
    out = gap_flags(t - prev_t, p.gap_ms[pm], has_prev)
    flat, run_t = flatline(t, v, prev_v, has_prev, first, st.run_t[s], p.flatline_ms[pm])
    out |= flat
    candidate = (flags[keep] & _CANDIDATE_OFF) == 0
    spike, ref_at = spikes(t, v, p.max_rate[pm], first, candidate, st.has_ref[s], st.ref_t[s], st.ref_v[s])
    out |= np.where(spike, _SPIKE, 0).astype(np.int32)
    flags[keep] |= out

    last = np.flatnonzero(group_last(first))
    ls = s[last]
    st.has_prev[ls] = True
    st.prev_t[ls], st.prev_v[ls], st.run_t[ls] = t[last], v[last], run_t[last]
    ri = ref_at[last]
    moved = np.flatnonzero(ri >= 0)
    ms, ri = ls[moved], ri[moved]
    st.has_ref[ms] = True
    st.ref_t[ms], st.ref_v[ms] = t[ri], v[ri]
    return flags
