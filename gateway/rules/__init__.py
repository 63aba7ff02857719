"""Alert rules (PROTOCOL section 2), evaluated in reading time over whole batches.

``AlertEngine.evaluate`` takes a batch of numeric readings with their check flags (and the
waveform blocks, which only count as signs of life) and returns the alert episodes that
opened or closed, in the order their causing readings arrived. ``tick`` lets the gateway's
clock open ``silent`` alerts. Readings flagged OUT_OF_RANGE, SPIKE or NOT_FINITE never feed
``below``/``above`` rules. One episode is one ``open`` and one ``close`` event.

The engine is pure (no I/O, no clock of its own) and keeps its state between calls, so the
events do not depend on how a stream is cut into batches. Rules are numbered once, profiles
in name order and rules in file order; that number also orders simultaneous events.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice

import numpy as np

from gateway.model import ARTIFACT_FLAGS, AlertEvent, NumericColumns, WaveformColumns
from gateway.profiles import AlertRule, Interner, Profile
from gateway.rules.silent import SilentRules
from gateway.rules.threshold import ThresholdRules, group_first

__all__ = ["AlertEngine"]


@dataclass(frozen=True)
class _Rule:
    profile: str
    rule: AlertRule


class AlertEngine:
    """Alert state of every (device, rule), advanced batch by batch."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        """Args: profiles: the loaded device profiles by name (fixed for the engine's life)."""
        self._rules: list[_Rule] = [_Rule(name, r) for name in sorted(profiles) for r in profiles[name].alerts]
        self._rule_gid = {(r.profile, r.rule.name): i for i, r in enumerate(self._rules)}
        self._profiles = Interner()
        self._metrics = Interner()
        self._devices = Interner()
        self._device_names: list[str] = []
        silent = [i for i, r in enumerate(self._rules) if r.rule.when == "silent"]
        self._silent_gid = np.array(silent, dtype=np.int64)
        self._silent = SilentRules([round(self._rules[i].rule.after_s * 1000) for i in silent])  # type: ignore[operator]
        self._threshold = ThresholdRules([None if r.rule.when == "silent" else r.rule for r in self._rules])
        for name in sorted(profiles):
            self._profiles[name]  # noqa: B018 - intern every known profile and metric up front
            for metric in profiles[name].metrics:
                self._metrics[metric]  # noqa: B018
        self._tables()
        self._active: dict[tuple[int, int], AlertEvent] = {}  # (device id, rule) -> open event

    def _tables(self) -> None:
        """(profile id, metric id) -> threshold rules, as CSR; profile id -> silent columns."""
        n_p, n_m = len(self._profiles), len(self._metrics)
        lists: list[list[int]] = [[] for _ in range(n_p * n_m)]
        self._silent_cols = np.zeros((n_p, len(self._silent_gid)), dtype=bool)
        for gid, r in enumerate(self._rules):
            pid = self._profiles[r.profile]
            if r.rule.when == "silent":
                self._silent_cols[pid, int(np.searchsorted(self._silent_gid, gid))] = True
            else:
                lists[pid * n_m + self._metrics[r.rule.metric]].append(gid)  # type: ignore[index]
        count = np.array([len(x) for x in lists], dtype=np.int64)
        start = np.cumsum(count) - count
        # One extra column without rules, for metric names no profile knows (see _known).
        self._count = np.pad(count.reshape(n_p, n_m), ((0, 0), (0, 1)))
        self._start = np.pad(start.reshape(n_p, n_m), ((0, 0), (0, 1)))
        self._flat = np.array([g for x in lists for g in x], dtype=np.int64)

    def _device_ids(self, names: np.ndarray) -> np.ndarray:
        before = len(self._devices)
        ids = self._devices.ids(names)
        if len(self._devices) > before:
            self._device_names.extend(islice(self._devices, before, None))
            self._threshold.grow(len(self._devices))
            self._silent.grow(len(self._devices))
        return ids

    def _known(self, pid: np.ndarray, mid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clip ids of names the profiles do not know to a row/column without rules."""
        n_p, n_m = self._count.shape[0], self._count.shape[1] - 1
        ok = (pid < n_p) & (mid < n_m)
        return np.where(ok, pid, 0), np.where(ok, mid, n_m)

    def evaluate(self, num: NumericColumns, flags: np.ndarray, wav: WaveformColumns | None = None) -> list[AlertEvent]:
        """Advance every rule over a batch.

        Args:
            num: numeric readings in arrival order.
            flags: the check flags of ``num`` (``gateway.checks.run_checks``).
            wav: waveform blocks of the batch, if any: they refresh and close ``silent`` alerts.

        Returns:
            Open and close events in the order the causing readings arrived (envelope, then
            numerics before waveforms, then array order; simultaneous events by rule number).
            ``AlertEvent.env`` is the ``env`` of the causing reading.
        """
        if wav is None:
            wav = WaveformColumns.empty()
        keyed: list[tuple[tuple[int, int, int, int], AlertEvent]] = []
        ndev = self._device_ids(num.device)
        wdev = self._device_ids(wav.device)
        npid = self._profiles.ids(num.profile)
        wpid = self._profiles.ids(wav.profile)
        self._close_silent(num, ndev, wav, wdev, keyed)
        if len(num):
            self._run_thresholds(num, flags, ndev, npid, keyed)
        for dev, pid, t in ((ndev, npid, num.t), (wdev, wpid, wav.t0)):
            if len(dev):
                self._silent.refresh(dev, np.asarray(t, dtype=np.int64))
                self._arm(dev, pid)
        keyed.sort(key=lambda item: item[0])
        events = [event for _, event in keyed]
        self._record(events)
        return events

    def _run_thresholds(self, num: NumericColumns, flags: np.ndarray, dev: np.ndarray, pid: np.ndarray, keyed: list) -> None:  # type: ignore[type-arg]
        mid = self._metrics.ids(num.metric)
        pid_k, mid_k = self._known(pid, mid)
        count = self._count[pid_k, mid_k]
        count[(np.asarray(flags) & ARTIFACT_FLAGS) != 0] = 0  # artifacts never feed rules
        total = int(count.sum())
        if total == 0:
            return
        reading = np.repeat(np.arange(len(num), dtype=np.int64), count)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        start = self._start[pid_k, mid_k]
        rule = self._flat[np.repeat(start, count) + within]
        t = np.asarray(num.t, dtype=np.int64)[reading]
        v = np.asarray(num.value, dtype=np.float64)[reading]
        found = self._threshold.evaluate(dev[reading], rule, t, v)
        for p, opens in zip(found.pair.tolist(), found.opens.tolist()):
            i, gid = int(reading[p]), int(rule[p])
            r = self._rules[gid]
            event = AlertEvent(
                "open" if opens else "close", num.device[i], r.rule.name, r.rule.priority, r.rule.metric,
                int(t[p]), float(v[p]), int(num.env[i]), r.profile,
            )
            keyed.append(((int(num.env[i]), 0, i, 1 + gid), event))

    def _close_silent(self, num: NumericColumns, ndev: np.ndarray, wav: WaveformColumns, wdev: np.ndarray, keyed: list) -> None:  # type: ignore[type-arg]
        """The first reading of a device with open silent alerts closes them."""
        waiting = self._silent.open_devices()
        if not len(waiting):
            return
        first: dict[int, tuple[int, int, int, int]] = {}  # device -> (env, kind, index, t)
        for kind, cols, dev, t in ((1, wav, wdev, wav.t0), (0, num, ndev, num.t)):
            hit = np.flatnonzero(np.isin(dev, waiting))
            ids, at = np.unique(dev[hit], return_index=True)
            for d, i in zip(ids.tolist(), hit[at].tolist()):
                cand = (int(cols.env[i]), kind, i, int(t[i]))
                if d not in first or cand < first[d]:
                    first[d] = cand
        for d, (env, kind, i, t) in first.items():
            for col in self._silent.close(d).tolist():
                r = self._rules[int(self._silent_gid[col])]
                event = AlertEvent("close", self._device_names[d], r.rule.name, r.rule.priority, None, t, None, env, r.profile)
                keyed.append(((env, kind, i, -len(self._rules) + col), event))

    def _arm(self, dev: np.ndarray, pid: np.ndarray) -> None:
        """Arm the silent rules of each (device, profile) seen."""
        change = group_first(dev * (len(self._profiles) + 1) + pid)  # runs of equal pairs
        d, p = dev[change], pid[change]
        known = p < len(self._silent_cols)
        self._silent.arm(d[known], self._silent_cols[p[known]])

    def _record(self, events: list[AlertEvent]) -> None:
        for e in events:
            key = (self._devices[e.device_id], self._gid(e))
            if e.event == "open":
                self._active[key] = e
            else:
                self._active.pop(key, None)

    def _gid(self, e: AlertEvent) -> int:
        return self._rule_gid[(e.profile, e.rule)]  # type: ignore[index]

    def tick(self, now_ms: int) -> list[AlertEvent]:
        """Open the silent alerts whose deadline ``now_ms`` has passed.

        Args:
            now_ms: the gateway's clock, epoch ms (live: wall clock; replay: the latest
                receipt time seen).

        Returns:
            The opened events, ``at`` = latest reading time + ``after_s``, ordered by
            (``at``, device, rule).
        """
        dev, col, deadline = self._silent.due(int(now_ms))
        events = []
        for d, c, at in zip(dev.tolist(), col.tolist(), deadline.tolist()):
            r = self._rules[int(self._silent_gid[c])]
            events.append(AlertEvent("open", self._device_names[d], r.rule.name, r.rule.priority, None, at, None, None, r.profile))
        events.sort(key=lambda e: (e.at, e.device_id, e.rule))
        self._record(events)
        return events

    def next_deadline(self) -> int | None:
        """The earliest clock value (epoch ms) after which ``tick`` would open an alert."""
        return self._silent.next_deadline()

    def active(self) -> list[AlertEvent]:
        """The open events of the alerts still open, in the order they opened."""
        return list(self._active.values())
