"""OUT_OF_RANGE and NOT_FINITE: elementwise, no state.

A value is NOT_FINITE when it is NaN or infinite, and OUT_OF_RANGE when it is finite and
outside the profile's ``plausible = [low, high]`` (the bounds themselves are plausible).
A non-finite value is never also OUT_OF_RANGE: it has no position to compare.
"""

from __future__ import annotations

import numpy as np

from gateway.model import Flag

__all__ = ["range_flags", "block_flags"]


def range_flags(values: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """OUT_OF_RANGE / NOT_FINITE per value, as int32 flags."""
    finite = np.isfinite(values)
    out = np.where(finite, 0, int(Flag.NOT_FINITE)).astype(np.int32)
    with np.errstate(invalid="ignore"):
        outside = finite & ((values < low) | (values > high))
    out[outside] = int(Flag.OUT_OF_RANGE)
    return out


def block_flags(samples: np.ndarray, offsets: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """OUT_OF_RANGE / NOT_FINITE per waveform block: the OR over its samples.

    Block ``i`` owns ``samples[offsets[i]:offsets[i + 1]]``; ``low``/``high`` are per block.
    A block's minimum and maximum decide it when both are finite (then every sample is, and
    a sample is outside the range exactly when the minimum or the maximum is); only blocks
    holding a NaN or an infinity are looked at sample by sample.
    """
    counts = np.diff(offsets)
    n = len(counts)
    if n == 0 or counts.min() <= 0:
        return _block_flags_per_sample(samples, offsets, low, high)
    starts = offsets[:-1]
    lo = np.minimum.reduceat(samples, starts)  # NaN propagates, an infinity is the min or max
    hi = np.maximum.reduceat(samples, starts)
    finite = np.isfinite(lo) & np.isfinite(hi)
    out = np.zeros(n, dtype=np.int32)
    with np.errstate(invalid="ignore"):
        out[finite & ((lo < low) | (hi > high))] = int(Flag.OUT_OF_RANGE)
    odd = np.flatnonzero(~finite)
    if odd.size:
        sub_counts = counts[odd]
        sub_offsets = np.zeros(odd.size + 1, dtype=np.int64)
        np.cumsum(sub_counts, out=sub_offsets[1:])
        idx = np.repeat(starts[odd] - sub_offsets[:-1], sub_counts) + np.arange(int(sub_offsets[-1]))
        out[odd] = _block_flags_per_sample(samples[idx], sub_offsets, np.asarray(low)[odd], np.asarray(high)[odd])
    return out


def _block_flags_per_sample(samples: np.ndarray, offsets: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    counts = np.diff(offsets)
    per_sample = range_flags(samples, np.repeat(low, counts), np.repeat(high, counts))
    out = np.zeros(len(counts), dtype=np.int32)
    for flag in (Flag.OUT_OF_RANGE, Flag.NOT_FINITE):
        hits = np.concatenate([[0], np.cumsum(per_sample == int(flag), dtype=np.int64)])
        out[hits[offsets[1:]] > hits[offsets[:-1]]] |= int(flag)
    return out
