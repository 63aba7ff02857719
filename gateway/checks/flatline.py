"""FLATLINE: ``v == prev.v`` and ``t - run_start.t >= flatline_s``.

Over the readings of a key that are not OUT_OF_ORDER (sorted by arrival, so ``prev`` is
the previous one), a run of equal values starts wherever ``v != prev.v`` (or there is no
``prev``). ``run_start.t`` of every reading is a forward fill of the last run start; the
group's first reading continues the run carried in the state when its value equals the
carried ``prev.v``.
"""

from __future__ import annotations

import numpy as np

from gateway.checks.groups import last_marked
from gateway.model import Flag

__all__ = ["flatline"]


def flatline(
    t: np.ndarray, v: np.ndarray, prev_v: np.ndarray, has_prev: np.ndarray,
    first: np.ndarray, carried_run_t: np.ndarray, limit_ms: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """FLATLINE flags and each reading's run start time.

    Args:
        t, v: the non-OUT_OF_ORDER readings, sorted by (key, arrival).
        prev_v, has_prev: value of each reading's ``prev`` and whether it has one.
        first: group-start mask.
        carried_run_t: run start carried in the state (read at group starts only).
        limit_ms: ``flatline_s * 1000`` per reading (``inf`` when the metric has none).
    """
    same = has_prev & (v == prev_v)
    base = np.where(first & same, carried_run_t, t)
    run_t = base[last_marked(first | ~same)]
    flags = np.where(same & ((t - run_t) >= limit_ms), int(Flag.FLATLINE), 0).astype(np.int32)
    return flags, run_t
