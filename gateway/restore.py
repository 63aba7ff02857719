"""State restore after a restart: the first time a device is seen since start, look up what
storage knows about it (``StateStore.history``) and seed the evaluator with it, so that a
restart does not forget the readings and the active alert episodes stored before it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from typing import TypeVar

from gateway.decode import Decoded
from gateway.errors import SinkError
from gateway.evaluate import Evaluator, Key
from gateway.model import AlertEvent
from gateway.profiles import Profile
from gateway.sinks import History, StateStore

__all__ = ["Restorer"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Retry = Callable[[str, Callable[[], Awaitable[T]]], Awaitable[T]]


class Restorer:
    """Remembers which devices were restored; restores the others."""

    def __init__(self, store: StateStore, evaluator: Evaluator, retry: Retry) -> None:  # type: ignore[type-arg]
        self.store = store
        self.evaluator = evaluator
        self._retry = retry
        self._restored: set[str] = set()

    def forget(self, devices: Iterable[str]) -> None:
        """Restore ``devices`` again when next seen (their state was dropped)."""
        self._restored.difference_update(devices)

    async def restore(self, items: Sequence[Decoded], keys: Sequence[Key], known: Container[Key]) -> None:
        """Restore every device of ``items`` not restored yet (one lookup for all of them);
        envelopes whose key is ``known`` (stored already) are skipped."""
        profiles_of: dict[str, dict[str, Profile]] = {}  # device -> its profiles in the batch, first first
        restored = self._restored
        for d, key in zip(items, keys):
            dev = key[0]
            if dev not in restored and key not in known:
                profiles_of.setdefault(dev, {}).setdefault(d.profile.name, d.profile)
        if profiles_of:
            await self._lookup(profiles_of)

    async def adopt(self, devices: dict[str, Profile]) -> list[str]:
        """Take on ``devices`` before any reading of theirs arrives (a partition taken over):
        restore those not restored yet and arm their ``silent`` rules from the latest stored
        reading, so that one that went quiet meanwhile opens its episode. Returns those armed."""
        fresh = {d: {p.name: p} for d, p in devices.items() if d not in self._restored}
        if fresh:
            await self._lookup(fresh)
        return self.evaluator.arm(sorted(devices), [devices[d].name for d in sorted(devices)])

    async def _lookup(self, profiles_of: dict[str, dict[str, Profile]]) -> None:
        restored = self._restored
        devices = sorted(profiles_of)
        profile_of = {dev: next(iter(profiles_of[dev])) for dev in devices}
        pairs: dict[tuple[str, str], str] = {}  # (device, metric) of the device's profiles -> kind
        for dev in devices:
            for prof in profiles_of[dev].values():
                for metric, spec in prof.metrics.items():
                    pairs.setdefault((dev, metric), spec.kind)
        numeric = [k for k, kind in pairs.items() if kind == "numeric"]
        waveform = [k for k, kind in pairs.items() if kind == "waveform"]
        try:
            runs_ms = self.evaluator.run_window_ms
            hist: History = await self._retry(
                "history", lambda: self.store.history(devices, numeric, waveform, **({"runs_ms": runs_ms} if runs_ms else {})))
        except SinkError as exc:
            log.error("Stored state lookup refused; these devices start without history.",
                      extra={"error": str(exc), "devices": len(devices)})
            hist = History()
        restored.update(devices)
        opened = [
            AlertEvent("open", e.device_id, e.rule, e.priority, e.metric, e.opened_at, e.trigger_value, None,
                       profile_of.get(e.device_id))
            for e in hist.open_alerts
        ]
        recent = [(d, profile_of[d], m, t, v) for d, m, t, v in hist.recent if d in profile_of]
        for e in self.evaluator.restore(hist.numeric, hist.numeric_ref, hist.waveform, opened, hist.latest, recent):
            # the rule is not in the profile the device reports now (renamed, profile changed)
            log.warning("Active alert episode not restored: unknown rule for the device's profile.",
                        extra={"device_id": e.device_id, "rule": e.rule, "profile": e.profile, "at": e.at})
        if opened:
            log.info("Active alert episodes restored from storage.", extra={"episodes": len(opened)})
