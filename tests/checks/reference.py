"""Plain per-reading reference of the checks and alert rules (PROTOCOL sections 2 and 3).

Written to be obviously correct, not fast: one reading at a time, in arrival order, with
the rules spelled out as the protocol states them. The vectorized code in
``gateway.checks`` / ``gateway.rules`` must produce exactly the same flags and events;
the property tests compare the two on random streams. Float expressions are written in
the same form as in the vectorized code so that both round identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gateway.model import ARTIFACT_FLAGS, AlertEvent, Flag, NumericColumns, WaveformColumns
from gateway.profiles import Profile

__all__ = ["ReferenceChecks", "ReferenceRules"]


@dataclass
class _Last:
    t: int
    v: float


@dataclass
class _NumericKey:
    prev: _Last | None = None  # earlier reading with the greatest t, whatever its flags
    ref: _Last | None = None  # same among readings without OUT_OF_RANGE, SPIKE, NOT_FINITE
    run_start_t: int = 0  # first reading of the current run of equal values


@dataclass
class _WaveKey:
    prev_t0: int
    prev_n: int
    prev_hz: float


class ReferenceChecks:
    """The checks, one reading at a time."""

    def __init__(self, profiles: Mapping[str, Profile], max_clock_skew_s: float = 60.0, max_staleness_s: float = 86400.0) -> None:
        self.profiles = profiles
        self.skew_ms = max_clock_skew_s * 1000.0
        self.stale_ms = max_staleness_s * 1000.0
        self.numeric_keys: dict[tuple[str, str], _NumericKey] = {}
        self.wave_keys: dict[tuple[str, str], _WaveKey] = {}

    def _range(self, v: float, low: float, high: float) -> int:
        if not math.isfinite(v):
            return Flag.NOT_FINITE
        if v < low or v > high:
            return Flag.OUT_OF_RANGE
        return 0

    def _clock(self, t: int, received_at: int) -> int:
        flags = 0
        if t > received_at + self.skew_ms:
            flags |= Flag.CLOCK_FUTURE
        if t < received_at - self.stale_ms:
            flags |= Flag.CLOCK_STALE
        return flags

    def numeric(self, device: str, metric: str, profile: str, t: int, v: float, received_at: int) -> int:
        """Flags of one numeric reading; updates the (device, metric) state."""
        spec = self.profiles[profile].metrics[metric]
        key = self.numeric_keys.setdefault((device, metric), _NumericKey())
        flags = self._range(v, *spec.plausible) | self._clock(t, received_at)
        prev, ref = key.prev, key.ref
        if prev is not None and t <= prev.t:
            # OUT_OF_ORDER: no SPIKE, FLATLINE or GAP; does not become prev, ref or part of a run.
            return flags | Flag.OUT_OF_ORDER
        if prev is not None and spec.gap_factor is not None and (t - prev.t) > spec.gap_factor * spec.interval_s * 1000.0:  # type: ignore[operator]
            flags |= Flag.GAP
        if prev is not None and v == prev.v:
            if spec.flatline_s is not None and (t - key.run_start_t) >= spec.flatline_s * 1000.0:
                flags |= Flag.FLATLINE
        else:
            key.run_start_t = t
        if ref is not None and spec.max_rate is not None and t > ref.t:
            if abs(v - ref.v) / ((t - ref.t) / 1000.0) > spec.max_rate:
                flags |= Flag.SPIKE
        key.prev = _Last(t, v)
        if not flags & ARTIFACT_FLAGS:
            key.ref = _Last(t, v)
        return int(flags)

    def waveform(self, device: str, metric: str, profile: str, t0: int, hz: float, samples: list[float], received_at: int) -> int:
        """Flags of one waveform block; updates the (device, metric) state."""
        spec = self.profiles[profile].metrics[metric]
        flags = self._clock(t0, received_at)
        for x in samples:
            flags |= self._range(x, *spec.plausible)
        prev = self.wave_keys.get((device, metric))
        if prev is not None and t0 <= prev.prev_t0:
            return flags | Flag.OUT_OF_ORDER
        if prev is not None and spec.gap_factor is not None:
            gap = (t0 - prev.prev_t0) - prev.prev_n * 1000.0 / prev.prev_hz
            if gap > spec.gap_factor * 1000.0 / hz:
                flags |= Flag.GAP
        self.wave_keys[(device, metric)] = _WaveKey(t0, len(samples), hz)
        return int(flags)

    def run(self, num: NumericColumns, wav: WaveformColumns) -> tuple[np.ndarray, np.ndarray]:
        """Flags of a batch, reading by reading in arrival order."""
        nflags = [
            self.numeric(num.device[i], num.metric[i], num.profile[i], int(num.t[i]), float(num.value[i]), int(num.received_at[i]))
            for i in range(len(num))
        ]
        wflags = [
            self.waveform(
                wav.device[i], wav.metric[i], wav.profile[i], int(wav.t0[i]), float(wav.hz[i]),
                [float(x) for x in wav.samples[wav.offsets[i]:wav.offsets[i + 1]]], int(wav.received_at[i]),
            )
            for i in range(len(wav))
        ]
        return np.array(nflags, dtype=np.int32), np.array(wflags, dtype=np.int32)


@dataclass
class _RuleKey:
    open: AlertEvent | None = None
    run_start_t: int | None = None  # first reading of the current run meeting the condition


class ReferenceRules:
    """The alert rules, one reading at a time (same API as ``gateway.rules.AlertEngine``)."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self.profiles = profiles
        self.keys: dict[tuple[str, str, str], _RuleKey] = {}
        self.latest: dict[str, int] = {}  # device -> latest reading time
        # device -> armed silent rules (profile, rule) -> open event or None
        self.silent: dict[str, dict[tuple[str, str], AlertEvent | None]] = {}
        self.opened: list[AlertEvent] = []

    def _seen(self, device: str, profile: str, t: int, env: int, out: list[AlertEvent]) -> None:
        """Any reading of a device: closes its open silent alerts, refreshes its latest time."""
        armed = self.silent.setdefault(device, {})
        for key in sorted(armed, key=self._rule_order):
            event = armed[key]
            if event is not None:
                out.append(AlertEvent("close", device, event.rule, event.priority, None, t, None, env, event.profile))
                armed[key] = None
                self.opened.remove(event)
        self.latest[device] = max(self.latest.get(device, t), t)
        for rule in self.profiles[profile].alerts:
            if rule.when == "silent":
                armed.setdefault((profile, rule.name), None)

    def _rule_order(self, key: tuple[str, str]) -> tuple[str, int]:
        """Rules are ordered by profile name, then by their place in the profile."""
        names = [r.name for r in self.profiles[key[0]].alerts]
        return key[0], names.index(key[1])

    def _numeric(self, device: str, metric: str, profile: str, t: int, v: float, flags: int, env: int, out: list[AlertEvent]) -> None:
        self._seen(device, profile, t, env, out)
        if flags & ARTIFACT_FLAGS:
            return  # artifacts neither extend nor break a condition
        for rule in self.profiles[profile].alerts:
            if rule.when == "silent" or rule.metric != metric:
                continue
            key = self.keys.setdefault((device, profile, rule.name), _RuleKey())
            below = rule.when == "below"
            if key.open is None:
                meets = v < rule.threshold if below else v > rule.threshold  # type: ignore[operator]
                if not meets:
                    key.run_start_t = None
                    continue
                if key.run_start_t is None:
                    key.run_start_t = t
                if t - key.run_start_t >= rule.for_s * 1000.0:
                    key.open = AlertEvent("open", device, rule.name, rule.priority, metric, t, v, env, profile)
                    key.run_start_t = None
                    self.opened.append(key.open)
                    out.append(key.open)
            else:
                cleared = v >= rule.clear if below else v <= rule.clear  # type: ignore[operator]
                if cleared:
                    self.opened.remove(key.open)
                    key.open = None
                    out.append(AlertEvent("close", device, rule.name, rule.priority, metric, t, v, env, profile))

    def evaluate(self, num: NumericColumns, flags: np.ndarray, wav: WaveformColumns | None = None) -> list[AlertEvent]:
        """Events of a batch; readings taken in arrival order (envelope, numerics, then waveforms)."""
        out: list[AlertEvent] = []
        items: list[tuple[int, int, int]] = [(int(num.env[i]), 0, i) for i in range(len(num))]
        if wav is not None:
            items += [(int(wav.env[i]), 1, i) for i in range(len(wav))]
        for env, kind, i in sorted(items):
            if kind == 0:
                self._numeric(num.device[i], num.metric[i], num.profile[i], int(num.t[i]), float(num.value[i]), int(flags[i]), env, out)
            else:
                assert wav is not None
                self._seen(wav.device[i], wav.profile[i], int(wav.t0[i]), env, out)
        return out

    def tick(self, now_ms: int) -> list[AlertEvent]:
        """Open the silent alerts whose deadline the clock has passed."""
        out = []
        for device, armed in self.silent.items():
            for (profile, name), event in armed.items():
                if event is not None:
                    continue
                rule = next(r for r in self.profiles[profile].alerts if r.name == name)
                deadline = self.latest[device] + round(rule.after_s * 1000)  # type: ignore[operator]
                if now_ms > deadline:
                    event = AlertEvent("open", device, name, rule.priority, None, deadline, None, None, profile)
                    armed[(profile, name)] = event
                    out.append(event)
        out.sort(key=lambda e: (e.at, e.device_id, e.rule))
        self.opened.extend(out)
        return out

    def active(self) -> list[AlertEvent]:
        return list(self.opened)
