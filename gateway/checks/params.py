"""Check parameters of every (profile, metric), as flat arrays indexed by interned ids."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gateway.checks.state import CheckState
from gateway.profiles import Profile

__all__ = ["Params", "params", "ids"]

_INF = np.inf


@dataclass(frozen=True)
class Params:
    """Check parameters per (profile id, metric id), flat: index ``profile * width + metric``.

    ``inf`` where a check is off (and ``-inf``/``inf`` bounds for unknown names).
    """

    width: int
    low: np.ndarray
    high: np.ndarray
    max_rate: np.ndarray
    flatline_ms: np.ndarray
    gap_ms: np.ndarray  # numeric: gap_factor * interval_s * 1000
    gap_factor: np.ndarray  # waveform: the limit is gap_factor * 1000 / hz


def params(profiles: Mapping[str, Profile], state: CheckState) -> Params:
    """Parameter tables for the ids interned so far, cached while nothing changes."""
    key = (id(profiles), tuple(map(id, profiles.values())), len(state.profiles), len(state.metrics))
    cached = state.cached_params(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    width = len(state.metrics)
    size = max(len(state.profiles) * width, 1)
    low = np.full(size, -_INF)
    high, rate, flat, gap, gapf = np.full((5, size), _INF)
    for pname, pid in state.profiles.items():
        prof = profiles.get(pname)
        if prof is None:
            continue
        for mname, spec in prof.metrics.items():
            mid = state.metrics.get(mname)
            if mid is None:
                continue
            i = pid * width + mid
            low[i], high[i] = spec.plausible
            if spec.max_rate is not None:
                rate[i] = spec.max_rate
            if spec.flatline_s is not None:
                flat[i] = spec.flatline_s * 1000.0
            if spec.gap_factor is not None:
                gapf[i] = spec.gap_factor
                if spec.interval_s is not None:
                    gap[i] = spec.gap_factor * spec.interval_s * 1000.0
    out = Params(width, low, high, rate, flat, gap, gapf)
    state.store_params(key, out)
    return out


def ids(state: CheckState, device: np.ndarray, metric: np.ndarray, profile: np.ndarray) -> tuple[np.ndarray, ...]:
    """Device, metric and profile ids of every reading."""
    return state.devices.ids(device), state.metrics.ids(metric), state.profiles.ids(profile)
