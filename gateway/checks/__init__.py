"""Signal-quality checks over a whole batch (PROTOCOL section 3), vectorized with numpy.

``run_checks`` flags every numeric reading and waveform block of a batch at once: all
devices, all metrics, no per-reading Python loop. Readings are sorted by (device, metric)
and arrival with one stable argsort (skipped when every key occurs once); the sequential
parts of the rules (``prev``, ``ref``, runs of equal values) are rebuilt with the grouping
tricks of ``gateway.checks.groups``. Layout: ``numeric`` and ``waveform`` compose the checks
of ``range``, ``timing``, ``flatline`` and ``rate``; ``params`` and ``state`` hold what they
read and carry.
Per (device, metric) state is carried in a ``CheckState`` between batches, so the flags do
not depend on how a stream is cut into batches.

Checks are pure: no I/O, no clock, no metrics. The same code serves live ingestion and
offline replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gateway.checks.numeric import numeric_flags
from gateway.checks.state import CheckState
from gateway.checks.waveform import waveform_flags
from gateway.model import NumericColumns, WaveformColumns
from gateway.profiles import Profile

__all__ = ["CheckSettings", "CheckState", "run_checks"]


@dataclass(frozen=True)
class CheckSettings:
    """Gateway-wide settings of the clock checks.

    Attributes:
        max_clock_skew_s: CLOCK_FUTURE when a timestamp is more than this ahead of receipt.
        max_staleness_s: CLOCK_STALE when a timestamp is more than this older than receipt.
    """

    max_clock_skew_s: float = 60.0
    max_staleness_s: float = 86400.0


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
        numeric_flags(num, profiles, state, skew_ms, stale_ms),
        waveform_flags(wav, profiles, state, skew_ms, stale_ms),
    )
