"""CLOCK_FUTURE, CLOCK_STALE, OUT_OF_ORDER and GAP.

``prev`` of a reading is the device's earlier reading of the metric with the greatest
``t``. A reading is OUT_OF_ORDER when ``t <= prev.t``; such readings never raise that
maximum, so ``prev.t`` is simply the running maximum of all earlier ``t`` in the group,
including the one carried in the state: a segmented ``np.maximum.accumulate``.
Among the readings that are not OUT_OF_ORDER, ``t`` increases strictly, so their ``prev``
is just the previous one of them in the group.
"""

from __future__ import annotations

import numpy as np

from gateway.checks.groups import segmented_cummax, shift
from gateway.model import Flag

__all__ = ["clock_flags", "out_of_order", "gap_flags"]

_MIN = np.iinfo(np.int64).min


def clock_flags(t: np.ndarray, received_at: np.ndarray, skew_ms: float, stale_ms: float) -> np.ndarray:
    """CLOCK_FUTURE when ``t > received_at + skew``; CLOCK_STALE when ``t < received_at - staleness``."""
    out = np.where(t > received_at + skew_ms, int(Flag.CLOCK_FUTURE), 0).astype(np.int32)
    out[t < received_at - stale_ms] |= int(Flag.CLOCK_STALE)
    return out


def out_of_order(t: np.ndarray, first: np.ndarray, has_prev: np.ndarray, prev_t: np.ndarray) -> np.ndarray:
    """OUT_OF_ORDER mask over readings sorted by (key, arrival).

    Args:
        t: reading times, sorted by (key, arrival).
        first: group-start mask.
        has_prev, prev_t: the carried state of each reading's key.
    """
    start = np.where(has_prev, prev_t, _MIN)
    running = segmented_cummax(t, first)
    before = np.where(first, start, np.maximum(start, shift(running, _MIN)))
    return t <= before


def gap_flags(gap_ms: np.ndarray, limit_ms: np.ndarray, has_prev: np.ndarray) -> np.ndarray:
    """GAP where there is a previous reading and ``gap_ms > limit_ms``."""
    return np.where(has_prev & (gap_ms > limit_ms), int(Flag.GAP), 0).astype(np.int32)
