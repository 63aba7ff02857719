"""Keyed, columnar state carried between batches: per (device, metric) for the checks.

Everything here works on whole arrays. Strings are turned into small integer ids once per
batch (``gateway.profiles.Interner``); a pair of ids becomes one ``int64`` code, and
``KeyIndex`` maps codes to dense slot numbers with a sorted table and ``np.searchsorted``.
Per-slot values live in ``Columns``, plain numpy arrays that grow by doubling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway.profiles import SHARED_NAMES, Names

__all__ = ["KeyIndex", "Columns", "NumericState", "WaveformState", "CheckState", "pair_codes"]

_I64 = np.int64
# Codes are ``high << 24 | low``: up to 16.7 million distinct low ids (metrics, rules).
_LOW_BITS = 24


def pair_codes(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """One ``int64`` code per (high, low) id pair."""
    return (high << _LOW_BITS) | low


class KeyIndex:
    """int64 code -> dense slot number (0, 1, 2, ... in order of creation)."""

    def __init__(self) -> None:
        self._codes = np.empty(0, dtype=_I64)  # sorted
        self._slots = np.empty(0, dtype=_I64)  # slot of each sorted code
        self.size = 0

    def slots(self, codes: np.ndarray) -> np.ndarray:
        """Slots of ``codes``, creating slots for codes never seen before."""
        pos = np.searchsorted(self._codes, codes)
        found = pos < len(self._codes)
        found[found] = self._codes[pos[found]] == codes[found]
        out = np.empty(len(codes), dtype=_I64)
        out[found] = self._slots[pos[found]]
        if found.all():
            return out
        missing = ~found
        new_codes, inverse = np.unique(codes[missing], return_inverse=True)
        new_slots = np.arange(self.size, self.size + len(new_codes), dtype=_I64)
        out[missing] = new_slots[inverse]
        self.size += len(new_codes)
        all_codes = np.concatenate([self._codes, new_codes])
        order = np.argsort(all_codes, kind="stable")
        self._codes = all_codes[order]
        self._slots = np.concatenate([self._slots, new_slots])[order]
        return out


    def slots_of_high(self, high: np.ndarray) -> np.ndarray:
        """Slots of every code whose high id is in ``high`` (all metrics of some devices)."""
        return self._slots[np.isin(self._codes >> _LOW_BITS, high)]


class Columns:
    """Named per-slot arrays with fill values; ``grow(n)`` makes room for slots ``< n``."""

    def __init__(self, **fills: tuple[Any, Any]) -> None:
        self._fills = fills
        self._cap = 0
        for name, (dtype, _) in fills.items():
            setattr(self, name, np.empty(0, dtype=dtype))

    def grow(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = max(n, 2 * self._cap, 64)
        for name, (dtype, fill) in self._fills.items():
            old = getattr(self, name)
            new = np.full(cap, fill, dtype=dtype)
            new[: self._cap] = old[: self._cap]
            setattr(self, name, new)
        self._cap = cap


class NumericState(Columns):
    """Per (device, metric) state of numeric readings.

    ``prev_*``: the reading with the greatest ``t`` (whatever its flags); ``ref_*``: the one
    with the greatest ``t`` among those without OUT_OF_RANGE, SPIKE or NOT_FINITE;
    ``run_t``: time of the first reading of the current run of equal values.
    """

    has_prev: np.ndarray
    prev_t: np.ndarray
    prev_v: np.ndarray
    run_t: np.ndarray
    has_ref: np.ndarray
    ref_t: np.ndarray
    ref_v: np.ndarray
    scratch: np.ndarray  # work space of ``groups.sort_groups``

    def __init__(self) -> None:
        super().__init__(
            has_prev=(bool, False), prev_t=(_I64, 0), prev_v=(np.float64, 0.0), run_t=(_I64, 0),
            has_ref=(bool, False), ref_t=(_I64, 0), ref_v=(np.float64, 0.0), scratch=(_I64, 0),
        )


class WaveformState(Columns):
    """Per (device, metric) state of waveform blocks: the block with the greatest ``t0``.

    ``prev_dur`` is that block's duration in ms (``n * 1000 / hz``), so its end is
    ``prev_t + prev_dur``.
    """

    has_prev: np.ndarray
    prev_t: np.ndarray
    prev_dur: np.ndarray
    scratch: np.ndarray

    def __init__(self) -> None:
        super().__init__(has_prev=(bool, False), prev_t=(_I64, 0), prev_dur=(np.float64, 0.0), scratch=(_I64, 0))


class CheckState:
    """Everything the checks carry from one batch to the next; constructed empty.

    One instance follows one stream of batches (a gateway, a replay). It is not thread-safe.
    """

    def __init__(self, names: Names = SHARED_NAMES) -> None:
        """Args: names: name interners; the process-wide ones by default (ids are labels only)."""
        self.devices = names.devices
        self.metrics = names.metrics
        self.profiles = names.profiles
        self.numeric_keys = KeyIndex()
        self.numeric = NumericState()
        self.waveform_keys = KeyIndex()
        self.waveform = WaveformState()
        self._params_key: tuple[Any, ...] | None = None
        self._params: Any = None

    def _slots(self, keys: KeyIndex, cols: Columns, rows: Sequence[tuple[str, str, int, float]]) -> tuple[np.ndarray, ...]:
        """Slots (created if new, as ``run_checks`` does) and the times and values of ``rows``."""
        dev = self.devices.ids(np.array([r[0] for r in rows], dtype=object))
        met = self.metrics.ids(np.array([r[1] for r in rows], dtype=object))
        slots = keys.slots(pair_codes(dev, met))
        cols.grow(keys.size)
        t = np.array([r[2] for r in rows], dtype=_I64)
        v = np.array([r[3] for r in rows], dtype=np.float64)
        return slots, t, v

    def seed(
        self,
        numeric: Sequence[tuple[str, str, int, float]] = (),
        numeric_ref: Sequence[tuple[str, str, int, float]] = (),
        waveform: Sequence[tuple[str, str, int, float]] = (),
    ) -> None:
        """Restore state kept elsewhere (the stored readings, after a restart); keys that
        already have state are left as they are.

        Args:
            numeric: ``(device, metric, t, value)`` of the latest reading of each key, whatever
                its flags: becomes ``prev``. The current run of equal values is taken to start
                at that reading (an approximation: FLATLINE then needs ``flatline_s`` more).
            numeric_ref: ``(device, metric, t, value)`` of the latest reading of each key
                without OUT_OF_RANGE, SPIKE or NOT_FINITE (nor OUT_OF_ORDER): becomes ``ref``.
            waveform: ``(device, metric, t0, duration_ms)`` of the latest block of each key.
        """
        st = self.numeric
        if numeric or numeric_ref:
            # decide which keys are new before touching any of them
            s_prev, t_prev, v_prev = self._slots(self.numeric_keys, st, numeric)
            s_ref, t_ref, v_ref = self._slots(self.numeric_keys, st, numeric_ref)
            new_prev = ~st.has_prev[s_prev]
            new_ref = ~st.has_prev[s_ref] & ~st.has_ref[s_ref]
            s, t, v = s_prev[new_prev], t_prev[new_prev], v_prev[new_prev]
            st.has_prev[s] = True
            st.prev_t[s], st.prev_v[s], st.run_t[s] = t, v, t
            s = s_ref[new_ref]
            st.has_ref[s] = True
            st.ref_t[s], st.ref_v[s] = t_ref[new_ref], v_ref[new_ref]
        if waveform:
            w = self.waveform
            s, t, dur = self._slots(self.waveform_keys, w, waveform)
            new = ~w.has_prev[s]
            s = s[new]
            w.has_prev[s] = True
            w.prev_t[s], w.prev_dur[s] = t[new], dur[new]

    def forget(self, devices: Sequence[str]) -> None:
        """Drop the state of ``devices`` (evaluated elsewhere meanwhile): the next ``seed`` sets it."""
        ids = np.array([i for i in (self.devices.get(d) for d in devices) if i is not None], dtype=_I64)
        if not len(ids):
            return
        for keys, cols in ((self.numeric_keys, self.numeric), (self.waveform_keys, self.waveform)):
            slots = keys.slots_of_high(ids)
            cols.has_prev[slots] = False
            if cols is self.numeric:
                cols.has_ref[slots] = False

    def cached_params(self, key: tuple[Any, ...]) -> Any:
        """The parameter tables built for ``key`` (see ``gateway.checks``), or None."""
        return self._params if key == self._params_key else None

    def store_params(self, key: tuple[Any, ...], params: Any) -> None:
        self._params_key = key
        self._params = params
