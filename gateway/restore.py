"""State restore after a restart: the first time a device is seen since start, look up what
storage knows about it (``StateStore.history``) and seed the evaluator with it, so that a
restart does not forget the readings and the active alert episodes stored before it.

``restore_recent`` does the same at once for every device that reported within a horizon
(``StateStore.recent``) and arms its ``silent`` rules: a device that went quiet while the
gateway was down (a power cut takes both), or while its partition changed hands (cluster
mode), is never seen again, so the lazy path alone would never open its ``silent`` alert.
``forget`` undoes a restore: another process wrote the device meanwhile (cluster mode).

What is restored: the checks' ``prev``/``ref``, the open episodes, the latest reading time,
and the threshold rules' runs in progress (``History.recent``, within the evaluator's
``run_window_ms``), so a run that began before the restart or hand-over opens when it would have."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
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
_RESTORE_CHUNK = 1000  # devices per history lookup at start: a few seconds of probes at most


class Restorer:
    """Remembers which devices were restored; restores the others."""

    def __init__(self, store: StateStore, evaluator: Evaluator, retry: Retry) -> None:  # type: ignore[type-arg]
        self.store = store
        self.evaluator = evaluator
        self._retry = retry
        self._restored: set[str] = set()

    def forget(self, devices: Iterable[str]) -> None:
        """Drop the check and rule state of ``devices`` (another process evaluated them meanwhile,
        cluster mode): they are restored from storage again when next seen or taken on."""
        devices = sorted(devices)
        self.evaluator.forget(devices)
        self._restored.difference_update(devices)

    async def restore_recent(self, horizon_s: float, owns: Callable[[str], bool] = lambda _d: True) -> list[str]:
        """Take on every device ``owns`` picks among those with a reading newer than ``horizon_s``
        seconds (``StateStore.recent``), before any new reading of theirs: restore those not
        restored yet, as the lazy path would, and arm the ``silent`` rules of their latest stored
        profile from their latest stored reading. At start (all devices, or a worker's) and when
        a partition is taken over (cluster mode: its devices, in the window of the NATS source).

        Returns the devices taken on. A refused lookup is logged and takes on none: those
        devices are then restored lazily, when they next report.
        """
        try:
            recent = await self._retry("recent devices", lambda: self.store.recent(horizon_s))
        except SinkError as exc:
            log.error("Recent devices lookup refused; silent rules are armed when devices next report.",
                      extra={"error": str(exc)})
            return []
        profiles = self.evaluator.profiles
        # a profile no longer loaded has no rules to arm; its devices start afresh when they report
        by_device = {d: profiles[p] for d, (p, _) in recent.items() if p in profiles and owns(d)}
        devices = sorted(by_device)
        for i in range(0, len(devices), _RESTORE_CHUNK):
            chunk = devices[i:i + _RESTORE_CHUNK]
            fresh = {d: {by_device[d].name: by_device[d]} for d in chunk if d not in self._restored}
            if fresh:
                await self._restore(fresh)
            # the one arming path (``AlertEngine.arm``): devices without a latest reading stay unarmed
            self.evaluator.arm(chunk, [by_device[d].name for d in chunk])
        return devices

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
            await self._restore(profiles_of)

    async def _restore(self, profiles_of: Mapping[str, Mapping[str, Profile]]) -> None:
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
