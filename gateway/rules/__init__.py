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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.model import ARTIFACT_FLAGS, AlertEvent, NumericColumns, WaveformColumns
from gateway.profiles import SHARED_NAMES, AlertRule, Names, Profile
from gateway.rules.silent import SilentRules
from gateway.rules.threshold import ThresholdRules, group_first

__all__ = ["AlertEngine"]


@dataclass(frozen=True)
class _Rule:
    profile: str
    rule: AlertRule


class AlertEngine:
    """Alert state of every (device, rule), advanced batch by batch."""

    def __init__(self, profiles: Mapping[str, Profile], names: Names = SHARED_NAMES) -> None:
        """Create the engine.

        Args:
            profiles: the loaded device profiles by name (fixed for the engine's life).
            names: name interners; the process-wide ones by default (ids are labels only).
        """
        self._rules: list[_Rule] = [_Rule(name, r) for name in sorted(profiles) for r in profiles[name].alerts]
        self._rule_gid = {(r.profile, r.rule.name): i for i, r in enumerate(self._rules)}
        self._profiles = names.profiles
        self._metrics = names.metrics
        self._devices = names.devices
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
        """Per (profile id, metric id), flat at ``profile * width + metric``: the threshold
        rules (CSR: ``_count``, ``_start`` into ``_flat``) and the quiet band, where a value
        meets none of them (``max`` of the ``below`` thresholds .. ``min`` of the ``above``
        ones). Per profile id: its silent rules (``_silent_cols``).

        Column ``width - 1`` has no rules: metric names no profile of the engine knows.
        """
        n_p, n_m = len(self._profiles), len(self._metrics)
        self._n_profiles, self._width = n_p, n_m + 1
        lists: list[list[int]] = [[] for _ in range(n_p * self._width)]
        self._quiet_lo = np.full(len(lists), -np.inf)
        self._quiet_hi = np.full(len(lists), np.inf)
        self._silent_cols = np.zeros((n_p, len(self._silent_gid)), dtype=bool)
        for gid, r in enumerate(self._rules):
            pid = self._profiles[r.profile]
            if r.rule.when == "silent":
                self._silent_cols[pid, int(np.searchsorted(self._silent_gid, gid))] = True
                continue
            i = pid * self._width + self._metrics[r.rule.metric]  # type: ignore[index]
            lists[i].append(gid)
            if r.rule.when == "below":
                self._quiet_lo[i] = max(self._quiet_lo[i], r.rule.threshold)  # type: ignore[type-var]
            else:
                self._quiet_hi[i] = min(self._quiet_hi[i], r.rule.threshold)  # type: ignore[type-var]
        self._count = np.array([len(x) for x in lists], dtype=np.int64)
        self._start = np.cumsum(self._count) - self._count
        self._flat = np.array([g for x in lists for g in x], dtype=np.int64)

    def _device_ids(self, names: np.ndarray) -> np.ndarray:
        ids = self._devices.ids(names)
        self._threshold.grow(len(self._devices))
        self._silent.grow(len(self._devices))
        return ids

    def _pm(self, pid: np.ndarray, mid: np.ndarray) -> np.ndarray:
        """Flat (profile, metric) index; names the engine's profiles do not know map to no rules."""
        n_p, n_m = self._n_profiles, self._width - 1
        ok = (pid < n_p) & (mid < n_m)
        return np.where(ok, pid * self._width + mid, n_m)

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
        pm = self._pm(pid, self._metrics.ids(num.metric))
        value = np.asarray(num.value, dtype=np.float64)
        # Only devices with a rule open or running, or with a reading meeting some rule in
        # this batch, can change state; the feeding readings of all other devices would leave
        # every state as it is (closed, no run), so they are skipped.
        count = self._count[pm]
        feeds = (count > 0) & ((np.asarray(flags) & ARTIFACT_FLAGS) == 0)
        loud = feeds & ((value < self._quiet_lo[pm]) | (value > self._quiet_hi[pm]))
        hot = self._threshold.busy.copy()
        hot[dev[loud]] = True
        chosen = np.flatnonzero(feeds & hot[dev])
        if not len(chosen):
            return
        count = count[chosen]
        total = int(count.sum())
        reading = np.repeat(chosen, count)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        rule = self._flat[np.repeat(self._start[pm[chosen]], count) + within]
        t = np.asarray(num.t, dtype=np.int64)[reading]
        v = value[reading]
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
                event = AlertEvent("close", self._devices.names[d], r.rule.name, r.rule.priority, None, t, None, env, r.profile)
                keyed.append(((env, kind, i, -len(self._rules) + col), event))

    @property
    def run_window_ms(self) -> int:
        """The longest ``for_s`` of a threshold rule, in ms: a run that has not opened its
        alert began within that long of the latest reading (0 without threshold rules)."""
        spans = [r.rule.for_s for r in self._rules if r.rule.when != "silent"]
        return int(max(spans, default=0.0) * 1000) + 1000 if spans else 0

    def restore(self, open_events: Iterable[AlertEvent], latest: Mapping[str, int],
                recent: Sequence[tuple[str, str, str, int, float]] = ()) -> list[AlertEvent]:
        """Restore state kept elsewhere (the stored alerts and readings, after a restart).

        Only devices the engine has no state for yet (never evaluated, nothing restored) are
        touched; the others keep theirs. Restoring arms no ``silent`` rule: a device taken on
        before its next reading is armed by ``arm`` (``gateway.restore``).

        Args:
            open_events: the ``open`` events of episodes still active; ``profile`` must name
                the profile whose rule ``rule`` is. They count as open: the next reading that
                clears a threshold rule (any next reading, for ``silent``) closes them.
            latest: per device, the latest reading time (epoch ms), for ``silent``.
            recent: ``(device, profile, metric, t, value)`` of the readings stored within
                ``run_window_ms`` of each metric's latest, artifacts left out, in stored
                order: the threshold rules' runs in progress are rebuilt from them, so a
                run that began before a restart (or a hand-over) opens when it would have.

        Returns:
            The events not restored: unknown (profile, rule), or a device with state already.
        """
        events = list(open_events)
        names = list(latest) + [e.device_id for e in events] + [r[0] for r in recent]
        if not names:
            return []
        ids = self._device_ids(np.array(names, dtype=object))
        dev_of = dict(zip(names, ids.tolist()))
        lat = self._silent.latest
        fresh = {d for d in set(dev_of.values()) if lat[d] == np.iinfo(np.int64).min and not self._threshold.busy[d]
                 and not self._silent.open[d].any()}
        self._restore_runs([r for r in recent if dev_of[r[0]] in fresh], dev_of)
        skipped: list[AlertEvent] = []
        for e in events:
            d = dev_of[e.device_id]
            gid = self._rule_gid.get((e.profile, e.rule))  # type: ignore[arg-type]
            if gid is None or d not in fresh or (d, gid) in self._active:
                skipped.append(e)
                continue
            if self._rules[gid].rule.when == "silent":
                col = int(np.searchsorted(self._silent_gid, gid))
                self._silent.armed[d, col] = True
                self._silent.open[d, col] = True
                self._silent.n_open += 1
            else:
                self._threshold.open[d * self._threshold.n_rules + gid] = True
                self._threshold.busy[d] = True
            self._active[(d, gid)] = e
        for name, t in latest.items():
            d = dev_of[name]
            if d in fresh:
                lat[d] = max(int(lat[d]), int(t))
        return skipped

    def _restore_runs(self, recent: Sequence[tuple[str, str, str, int, float]], dev_of: Mapping[str, int]) -> None:
        """Feed stored readings through the threshold rules for their runs only: whether an
        episode is open comes from the stored episodes (``restore``), not from this window."""
        if not recent:
            return
        dev = np.array([dev_of[r[0]] for r in recent], dtype=np.int64)
        pid = self._profiles.ids(np.array([r[1] for r in recent], dtype=object))
        mid = self._metrics.ids(np.array([r[2] for r in recent], dtype=object))
        pm = self._pm(pid, mid)
        count = self._count[pm]
        chosen = np.flatnonzero(count > 0)
        if not len(chosen):
            return
        count = count[chosen]
        total = int(count.sum())
        reading = np.repeat(chosen, count)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        rule = self._flat[np.repeat(self._start[pm[chosen]], count) + within]
        t = np.array([r[3] for r in recent], dtype=np.int64)[reading]
        v = np.array([r[4] for r in recent], dtype=np.float64)[reading]
        self._threshold.evaluate(dev[reading], rule, t, v)
        self._threshold.reset_open(np.unique(dev))

    def forget(self, devices: Iterable[str]) -> None:
        """Drop the state of ``devices`` (another process evaluated them meanwhile): the next
        ``restore`` takes theirs from storage."""
        known = [self._devices.get(d) for d in devices]
        ids = np.array([i for i in known if i is not None], dtype=np.int64)
        self._active = {k: e for k, e in self._active.items() if k[0] not in set(ids.tolist())}
        self._silent.forget(ids[ids < len(self._silent.latest)])
        self._threshold.forget(ids[ids < len(self._threshold.busy)])

    def arm(self, devices: Sequence[str], profiles: Sequence[str]) -> list[str]:
        """Arm the ``silent`` rules of ``devices`` under ``profiles`` as a reading would, for
        those with a latest reading time (seen or restored); returns those armed."""
        if not devices:
            return []
        ids = self._device_ids(np.array(list(devices), dtype=object))
        pid = self._profiles.ids(np.array(list(profiles), dtype=object))
        known = self._silent.latest[ids] != np.iinfo(np.int64).min
        self._arm(ids[known], pid[known])
        return [d for d, k in zip(devices, known.tolist()) if k]

    def _arm(self, dev: np.ndarray, pid: np.ndarray) -> None:
        """Arm the silent rules of each (device, profile) seen."""
        change = group_first(dev * (len(self._profiles) + 1) + pid)  # runs of equal pairs
        d, p = dev[change], pid[change]
        known = p < self._n_profiles
        self._silent.arm(d[known], self._silent_cols[p[known]])

    def _record(self, events: list[AlertEvent]) -> None:
        """Keep ``active()`` up to date."""
        for e in events:
            key = (self._devices[e.device_id], self._rule_gid[(e.profile, e.rule)])  # type: ignore[index]
            if e.event == "open":
                self._active[key] = e
            else:
                self._active.pop(key, None)

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
            events.append(AlertEvent("open", self._devices.names[d], r.rule.name, r.rule.priority, None, at, None, None, r.profile))
        events.sort(key=lambda e: (e.at, e.device_id, e.rule))
        self._record(events)
        return events

    def next_deadline(self) -> int | None:
        """The earliest clock value (epoch ms) after which ``tick`` would open an alert."""
        return self._silent.next_deadline()

    def active(self) -> list[AlertEvent]:
        """The open events of the alerts still open, in the order they opened."""
        return list(self._active.values())
