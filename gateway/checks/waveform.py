"""The checks of waveform blocks over a whole batch.

OUT_OF_RANGE and NOT_FINITE per sample, OR-ed into the block; CLOCK_* and OUT_OF_ORDER on
the block's ``t0``; GAP from the end of the previous in-order block of the key
(``t0 + n / hz``) to this block's ``t0``, against ``gap_factor / hz``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gateway.checks.groups import group_first, group_last, shift, sort_groups
from gateway.checks.params import ids, params
from gateway.checks.range import block_flags
from gateway.checks.state import CheckState, pair_codes
from gateway.checks.timing import clock_flags, gap_flags, out_of_order
from gateway.model import Flag, WaveformColumns
from gateway.profiles import Profile

__all__ = ["waveform_flags"]


def waveform_flags(wav: WaveformColumns, profiles: Mapping[str, Profile], state: CheckState, skew_ms: float, stale_ms: float) -> np.ndarray:
    """Flags of every waveform block of a batch (arrival order); advances ``state``."""
    if len(wav) == 0:
        return np.zeros(0, dtype=np.int32)
    dev, met, prof = ids(state, wav.device, wav.metric, wav.profile)
    p = params(profiles, state)
    pm = prof * p.width + met
    t0 = np.asarray(wav.t0, dtype=np.int64)
    hz = np.asarray(wav.hz, dtype=np.float64)
    offsets = np.asarray(wav.offsets, dtype=np.int64)
    flags = block_flags(np.asarray(wav.samples, dtype=np.float64), offsets, p.low[pm], p.high[pm])
    flags |= clock_flags(t0, np.asarray(wav.received_at, dtype=np.int64), skew_ms, stale_ms)
    dur = np.diff(offsets) * 1000.0 / hz

    slots = state.waveform_keys.slots(pair_codes(dev, met))
    st = state.waveform
    st.grow(state.waveform_keys.size)
    order, first = sort_groups(slots, st.scratch)
    if order is None:
        order = np.arange(len(wav), dtype=np.int64)
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
    limit = p.gap_factor[pm[idx]] * 1000.0 / hz[idx]
    sorted_flags[keep] |= gap_flags((kt - prev_t) - prev_dur, limit, has_prev)

    last = group_last(kfirst)
    ls = ks[last]
    st.has_prev[ls] = True
    st.prev_t[ls], st.prev_dur[ls] = kt[last], kdur[last]

    flags[order] = sorted_flags
    return flags
