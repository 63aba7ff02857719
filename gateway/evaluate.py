"""The one evaluation of decoded envelopes: dedupe -> checks -> alert rules -> rows and events.

Live ingestion (``gateway.pipeline``) and offline replay (``gateway.replay``) both call
``Evaluator.evaluate``, so they cannot drift apart. Pure: no asyncio, no I/O, no clock;
time arrives as data (each envelope's ``received_at``, ``tick(now_ms)``).

Dedupe: an envelope is identified by ``(device_id, sha256 of its payload)``, as storage keys
it. Those in ``known`` (live: stored already; replay: seen earlier in the recording) and
repeats within the call are dropped before the checks: they add no rows, no flags and no
alert events, exactly as a stored duplicate adds nothing live.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.decode import Decoded, to_columns
from gateway.model import FLAG_NAMES, AlertEvent, NumericColumns, WaveformColumns
from gateway.profiles import Profile
from gateway.rules import AlertEngine

__all__ = ["Key", "Evaluation", "Evaluator", "key_of", "flag_counts"]

Key = tuple[str, bytes]  # (device_id, payload sha256)
_FLAG_BITS = tuple(1 << i for i in range(len(FLAG_NAMES)))


def key_of(d: Decoded) -> Key:
    """The identity of an envelope, as storage dedupes it."""
    return (d.envelope.device_id, d.sha256)


@dataclass(slots=True)
class Evaluation:
    """What an evaluation produced. ``keep`` indexes the envelopes kept (``None``: all of them);
    ``items``/``num``/``wav`` hold only those, ``events`` the alert events they caused."""

    keep: list[int] | None
    items: list[Decoded]
    keys: list[Key]
    num: NumericColumns
    num_flags: np.ndarray
    wav: WaveformColumns
    wav_flags: np.ndarray
    events: list[AlertEvent]


class Evaluator:
    """Check and alert-rule state of one stream of envelopes, and the one way to advance it."""

    def __init__(self, profiles: Mapping[str, Profile], settings: CheckSettings) -> None:
        self.profiles = profiles
        self.settings = settings
        self.state = CheckState()
        self.engine = AlertEngine(profiles)

    def evaluate(
        self,
        items: Sequence[Decoded],
        received_at: Sequence[int],
        known: Container[Key] = (),
        keys: Sequence[Key] | None = None,
    ) -> Evaluation:
        """Dedupe, flag and run the rules over envelopes in arrival order.

        Args:
            items: decoded envelopes, in arrival order.
            received_at: receipt time of each, epoch ms.
            known: keys already stored (or already seen): these envelopes are dropped.
            keys: ``key_of`` each item, when the caller has them already.
        """
        keys = [key_of(d) for d in items] if keys is None else keys
        keep = _dedupe(keys, known)
        if keep is not None:
            items = [items[i] for i in keep]
            received_at = [received_at[i] for i in keep]
            keys = [keys[i] for i in keep]
        num, wav = to_columns(items, received_at)
        nflags, wflags = run_checks(num, wav, self.profiles, self.state, self.settings)
        events = self.engine.evaluate(num, nflags, wav) if len(num) or len(wav) else []
        return Evaluation(keep, list(items), list(keys), num, nflags, wav, wflags, events)

    def forget(self, devices: Sequence[str]) -> None:
        """Drop the check and rule state of ``devices``: another process evaluated them
        meanwhile (cluster mode), so their state must come from storage again."""
        self.state.forget(devices)
        self.engine.forget(devices)

    def tick(self, now_ms: int) -> list[AlertEvent]:
        """Advance the rules' clock (``silent``) to ``now_ms``."""
        return self.engine.tick(now_ms)

    def restore(
        self,
        numeric: Sequence[tuple[str, str, int, float]],
        numeric_ref: Sequence[tuple[str, str, int, float]],
        waveform: Sequence[tuple[str, str, int, float]],
        open_events: Iterable[AlertEvent],
        latest: Mapping[str, int],
        recent: Sequence[tuple[str, str, str, int, float]] = (),
    ) -> list[AlertEvent]:
        """Seed check state and active alert episodes kept elsewhere (storage, after a restart);
        return the episodes not restored (see ``AlertEngine.restore``, also for ``recent``)."""
        self.state.seed(numeric, numeric_ref, waveform)
        return self.engine.restore(open_events, latest, recent)

    def arm(self, devices: Sequence[str], profiles: Sequence[str]) -> list[str]:
        """Arm the ``silent`` rules of ``devices`` (under ``profiles``) that have a latest reading
        time, as a reading would (``AlertEngine.arm``: the one arming path besides readings)."""
        return self.engine.arm(devices, profiles)

    @property
    def run_window_ms(self) -> int:
        """How far back of a metric's latest reading a threshold rule's run can reach (``restore``)."""
        return self.engine.run_window_ms


def _dedupe(keys: Sequence[Key], known: Container[Key]) -> list[int] | None:
    """Indexes of the first occurrence of each key not in ``known``; ``None`` when that is all."""
    seen: set[Key] = set()
    keep: list[int] = []
    for i, k in enumerate(keys):
        if k in known or k in seen:
            continue
        seen.add(k)
        keep.append(i)
    return None if len(keep) == len(keys) else keep


def flag_counts(num_flags: np.ndarray, wav_flags: np.ndarray) -> list[int]:
    """How many readings and blocks carry each ``Flag`` bit, in ``FLAG_NAMES`` order."""
    out = [0] * len(_FLAG_BITS)
    nz = np.concatenate([num_flags[num_flags != 0], wav_flags[wav_flags != 0]])
    if len(nz):
        for i, bit in enumerate(_FLAG_BITS):
            out[i] = int(np.count_nonzero(nz & bit))
    return out
