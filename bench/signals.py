"""Synthetic physiological signals for the fleet simulator, vectorized over devices.

A ``DeviceGroup`` holds N simulated devices of one profile and produces, window by
window, their numeric readings and waveform blocks as numpy arrays (one row per device).
``bench.fleet`` turns the arrays into envelopes.

Models, deliberately simple but shaped like the real thing:

- **Vitals** are Ornstein-Uhlenbeck walks (mean-reverting, bounded random walks) around a
  per-patient set point, one latent variable per physiological quantity (heart rate, SpO2,
  respiration rate, blood pressure, temperature...). Metrics are mapped to a quantity by
  name (``pulse_rate`` and ``heart_rate`` share the heart rate); a metric the table does
  not know, or whose plausible range does not fit the physiological set points (other
  units), gets a generic bounded walk inside its profile's plausible range. Steps are
  capped below the profile's ``max_rate`` so clean data is never flagged SPIKE.
- **Desaturation episodes**: SpO2 ramps down 8-16 points over 5-10 s, stays 10-40 s, then
  recovers (slow enough not to be a SPIKE; long enough to open a ``spo2_low`` alert).
  A few patients are tachycardic or bradycardic, so heart-rate alerts open too.
- **Artifacts** (``ArtifactRates``): probe-off episodes (SpO2 and pulse jump to random
  values for 2-6 s, i.e. SPIKE flags; the pleth goes flat), and rare out-of-range values
  (127 % SpO2 style sentinels; single saturated waveform samples).
- **ECG lead II**: a PQRST template of Gaussians at the current heart rate (QT scaled by
  sqrt(RR), Bazett style), plus respiratory baseline wander and noise, in mV.
- **Pleth**: systolic peak plus dicrotic wave per beat, 0.2 s pulse transit delay after the
  R wave, amplitude modulated by respiration and scaled by the perfusion index.
- **Respiration** (impedance): an asymmetric periodic wave at the respiration rate.

All waveform phases are continuous across windows. Without artifacts every value lies
inside its metric's plausible range.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gateway.profiles import MetricSpec, Profile

__all__ = ["ArtifactRates", "Window", "WaveBlock", "DeviceGroup", "NO_ARTIFACTS"]


@dataclass(frozen=True, slots=True)
class ArtifactRates:
    """How often devices misbehave. Rates are per device per second of signal."""

    desaturation: float = 1 / 600.0  # start of a desaturation episode (pulse oximetry)
    probe_off: float = 1 / 1800.0  # start of a probe-off episode
    out_of_range: float = 1 / 20_000.0  # per numeric reading: an implausible sentinel value
    waveform_out_of_range: float = 1 / 3_000.0  # per waveform block: one saturated sample
    abnormal_patients: float = 0.03  # share of patients with tachy- or bradycardia


NO_ARTIFACTS = ArtifactRates(0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class _Role:
    """A physiological quantity: set point range, variability and reporting precision."""

    name: str
    mu: tuple[float, float]  # per-patient set point drawn uniformly from this range
    sigma: float  # stationary standard deviation of the walk around the set point
    tau_s: float  # mean-reversion time constant
    decimals: int  # 0 = the device reports integers


# Order matters: the first pattern that matches a metric name wins.
_ROLES: tuple[tuple[re.Pattern[str], _Role], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"spo2|sat", _Role("spo2", (95.0, 99.0), 0.7, 30.0, 0)),
        (r"perf", _Role("perf", (1.0, 8.0), 0.3, 40.0, 2)),
        (r"^hr$|heart_rate|pulse", _Role("hr", (60.0, 95.0), 2.5, 40.0, 0)),
        (r"sys", _Role("sys", (108.0, 138.0), 4.0, 300.0, 0)),
        (r"dia", _Role("dia", (62.0, 84.0), 3.0, 300.0, 0)),
        (r"mean|map", _Role("mean", (78.0, 100.0), 3.0, 300.0, 0)),
        (r"co2", _Role("etco2", (34.0, 42.0), 1.0, 60.0, 0)),
        (r"fio2", _Role("fio2", (30.0, 50.0), 0.0, 600.0, 0)),
        (r"peep", _Role("peep", (5.0, 10.0), 0.0, 600.0, 0)),
        (r"tidal|^vt$|_vt$", _Role("tidal", (380.0, 520.0), 15.0, 30.0, 0)),
        (r"peak|pip|paw", _Role("pip", (16.0, 28.0), 1.0, 30.0, 0)),
        (r"resp|^rr$|_rr$|breath", _Role("rr", (12.0, 20.0), 1.2, 60.0, 0)),
        (r"temp", _Role("temp", (36.4, 37.4), 0.08, 600.0, 1)),
        (r"glu", _Role("glucose", (90.0, 160.0), 12.0, 900.0, 0)),
        (r"weight|mass", _Role("weight", (55.0, 100.0), 0.15, 3600.0, 1)),
    )
)


def _role_of(name: str, spec: MetricSpec) -> _Role | None:
    """The physiological quantity of a numeric metric, or None (generic walk)."""
    lo, hi = spec.plausible
    for pattern, role in _ROLES:
        if pattern.search(name):
            # A set point outside the plausible range means other units: use the generic walk.
            if lo <= role.mu[0] and role.mu[1] <= hi:
                return role
            return None
    return None


@dataclass(slots=True)
class WaveBlock:
    """One waveform block per device: ``samples[d]`` starts at ``t0_ms`` (relative)."""

    metric: str
    hz: float
    t0_ms: int  # relative to the group's stream start; identical for all devices
    samples: np.ndarray  # (n_devices, n_samples) float64


@dataclass(slots=True)
class Window:
    """Everything the group's devices measured in one window of ``interval_s`` seconds.

    ``numerics`` holds ``numerics_per_envelope`` entries ``(t_ms, {metric: values})``; times
    are relative to the stream start; ``values`` has one entry per device. Integer-valued
    metrics are int64 arrays, the others float64 already rounded to the reported precision.
    ``due[i]`` maps the metrics of entry ``i`` that are reported less often than every entry
    (their profile ``interval_s`` is longer) to a boolean array: which devices report them.
    """

    index: int
    numerics: list[tuple[int, dict[str, np.ndarray]]]
    waveforms: list[WaveBlock] = field(default_factory=list)
    due: list[dict[str, np.ndarray]] = field(default_factory=list)


class _Walk:
    """A vectorized Ornstein-Uhlenbeck walk for one quantity over N devices."""

    __slots__ = ("x", "mu", "sigma", "theta", "lo", "hi", "max_step_rate")

    def __init__(self, mu: np.ndarray, sigma: float, tau_s: float, lo: float, hi: float, max_rate: float | None):
        self.mu = mu
        self.x = mu.copy()
        self.sigma = sigma
        self.theta = 1.0 / tau_s
        self.lo = lo
        self.hi = hi
        # Keep clean steps well below the SPIKE threshold (checks compare |dv|/dt to max_rate).
        self.max_step_rate = None if max_rate is None else 0.4 * max_rate

    def step(self, dt: float, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal(self.x.shape) * (self.sigma * math.sqrt(2.0 * self.theta * dt))
        dx = self.theta * (self.mu - self.x) * dt + noise
        if self.max_step_rate is not None:
            cap = self.max_step_rate * dt
            np.clip(dx, -cap, cap, out=dx)
        self.x = np.clip(self.x + dx, self.lo, self.hi)
        return self.x


def _gauss(x: np.ndarray, mu: float | np.ndarray, w: float | np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / w) ** 2)


class DeviceGroup:
    """N devices of one profile; call ``next_window()`` once per ``interval_s`` of signal.

    Args:
        profile: the device profile (metrics and plausible ranges).
        n: number of devices.
        seed: random seed (the group is deterministic for a given seed).
        interval_s: seconds of signal per window (one envelope per device per window).
        numerics_per_envelope: numeric entries per window, evenly spaced, the last at the
            window's end.
        metrics: numeric metrics to report (default: all numeric metrics of the profile).
        waveforms: whether to generate the profile's waveform metrics.
        artifacts: artifact rates; ``NO_ARTIFACTS`` for clean, always-plausible data.
        respect_intervals: report each numeric metric once per its profile ``interval_s``
            (at a random phase per device) rather than in every entry: a thermometer
            with ``interval_s = 60`` then reports once a minute. Without it, values are
            reported with enough decimals that a clean step never exceeds ``max_rate``.
    """

    def __init__(
        self,
        profile: Profile,
        n: int,
        seed: int,
        *,
        interval_s: float = 1.0,
        numerics_per_envelope: int = 1,
        metrics: Sequence[str] | None = None,
        waveforms: bool = True,
        artifacts: ArtifactRates = ArtifactRates(),
        respect_intervals: bool = True,
    ) -> None:
        if n <= 0:
            raise ValueError("a device group needs at least one device")
        if interval_s <= 0 or numerics_per_envelope < 1:
            raise ValueError("interval_s must be > 0 and numerics_per_envelope >= 1")
        self.profile = profile
        self.n = n
        self.interval_s = interval_s
        self.k = numerics_per_envelope
        self.art = artifacts
        self.rng = np.random.default_rng(seed)
        self._window = 0
        self._t = 0.0  # seconds of signal generated so far

        numeric = {m: s for m, s in profile.metrics.items() if s.kind == "numeric"}
        if metrics is not None:
            unknown = [m for m in metrics if m not in numeric]
            if unknown:
                raise ValueError(f"profile {profile.name!r} has no numeric metric {unknown[0]!r}")
            numeric = {m: numeric[m] for m in metrics}
        self.numeric_specs = numeric
        step = interval_s / numerics_per_envelope
        # Metrics reported less often than every entry: per-device phase within their interval.
        self._slow: dict[str, tuple[float, np.ndarray]] = {}
        self._decimals: dict[str, int] = {}
        for m, spec in numeric.items():
            report_dt = step
            if respect_intervals and spec.interval_s is not None and spec.interval_s > step * 1.001:
                self._slow[m] = (spec.interval_s, self.rng.uniform(0.0, spec.interval_s, n))
                report_dt = spec.interval_s
            # Enough decimals that one quantum is a clean step well below max_rate.
            self._decimals[m] = 0 if spec.max_rate is None else max(0, math.ceil(-math.log10(0.4 * spec.max_rate * report_dt)))
        self.wave_specs = (
            {m: s for m, s in profile.metrics.items() if s.kind == "waveform" and s.hz} if waveforms else {}
        )
        if not self.numeric_specs and not self.wave_specs:
            raise ValueError(f"profile {profile.name!r}: nothing to generate")

        rng = self.rng
        # Latent physiology shared by the metrics that measure the same quantity.
        self.roles: dict[str, _Role | None] = {m: _role_of(m, s) for m, s in numeric.items()}
        self._walks: dict[str, _Walk] = {}
        for m, spec in numeric.items():
            role = self.roles[m]
            lo, hi = spec.plausible
            if role is None:
                span = hi - lo
                mu = rng.uniform(lo + 0.3 * span, lo + 0.5 * span, n)
                self._walks[f"metric:{m}"] = _Walk(mu, 0.02 * span, 120.0, lo, hi, spec.max_rate)
            elif role.name not in self._walks:
                mu = rng.uniform(*role.mu, n)
                walk_lo = max(lo, role.mu[0] - 6 * role.sigma - 20)
                walk_hi = min(hi, role.mu[1] + 6 * role.sigma + 20)
                self._walks[role.name] = _Walk(mu, role.sigma, role.tau_s, walk_lo, walk_hi, spec.max_rate)
        # The heart rate and respiration drive the waveforms even when not reported.
        if "hr" not in self._walks:
            self._walks["hr"] = _Walk(rng.uniform(60.0, 95.0, n), 2.5, 40.0, 30.0, 200.0, None)
        if "rr" not in self._walks:
            self._walks["rr"] = _Walk(rng.uniform(12.0, 20.0, n), 1.2, 60.0, 4.0, 40.0, None)
        if "perf" not in self._walks:
            self._walks["perf"] = _Walk(rng.uniform(1.0, 8.0, n), 0.3, 40.0, 0.2, 19.0, None)
        hr = self._walks["hr"]
        abnormal = rng.random(n) < artifacts.abnormal_patients
        tachy = abnormal & (rng.random(n) < 0.65)
        brady = abnormal & ~tachy
        hr.mu[tachy] = rng.uniform(124.0, 135.0, int(tachy.sum()))
        hr.mu[brady] = rng.uniform(42.0, 47.0, int(brady.sum()))
        hr.x[:] = hr.mu
        hr.lo, hr.hi = min(hr.lo, 35.0), max(hr.hi, 150.0)

        self._has_spo2 = "spo2" in self._walks
        # Desaturation episodes: start time (nan = none), ramp down, plateau, recovery, depth.
        self._desat_start = np.full(n, np.nan)
        self._desat_down = np.zeros(n)
        self._desat_plateau = np.zeros(n)
        self._desat_up = np.zeros(n)
        self._desat_depth = np.zeros(n)
        # Probe-off episodes: end time (seconds of signal); -inf = none.
        self._probe_off_until = np.full(n, -np.inf)
        # Waveform state: beat and breath phases (cycles) at the current window start.
        self._beat_phase = rng.random(n)
        self._breath_phase = rng.random(n)
        self._wave_sent = {m: 0 for m in self.wave_specs}  # samples emitted per waveform

    @property
    def slow_metrics(self) -> dict[str, float]:
        """Numeric metrics reported less often than every entry -> their interval in seconds."""
        return {m: every for m, (every, _) in self._slow.items()}

    # -- numerics ---------------------------------------------------------------------

    def _desaturation(self, t: float, dt: float) -> np.ndarray:
        """Offset to add to SpO2 at time ``t`` (seconds of signal), starting new episodes."""
        rng, n = self.rng, self.n
        idle = np.isnan(self._desat_start)
        if self.art.desaturation > 0:
            start = idle & (rng.random(n) < self.art.desaturation * dt)
            k = int(start.sum())
            if k:
                self._desat_start[start] = t
                self._desat_down[start] = rng.uniform(5.0, 10.0, k)
                self._desat_plateau[start] = rng.uniform(10.0, 40.0, k)
                self._desat_up[start] = rng.uniform(8.0, 20.0, k)
                self._desat_depth[start] = rng.uniform(8.0, 16.0, k)
        e = t - self._desat_start  # nan where idle
        down, plat, up = self._desat_down, self._desat_plateau, self._desat_up
        with np.errstate(invalid="ignore"):
            frac = np.where(
                e < down,
                0.5 - 0.5 * np.cos(np.pi * np.clip(e / np.maximum(down, 1e-9), 0, 1)),
                np.where(e < down + plat, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip((e - down - plat) / np.maximum(up, 1e-9), 0, 1))),
            )
            over = e > down + plat + up
        self._desat_start[over] = np.nan
        return -np.nan_to_num(frac) * self._desat_depth

    def _numeric_values(self, t: float, dt: float) -> dict[str, np.ndarray]:
        rng, n = self.rng, self.n
        latent = {name: w.step(dt, rng) for name, w in self._walks.items()}
        if self._has_spo2:
            latent["spo2"] = latent["spo2"] + self._desaturation(t, dt)
        if self.art.probe_off > 0:
            start = (self._probe_off_until < t) & (rng.random(n) < self.art.probe_off * dt)
            k = int(start.sum())
            if k:
                self._probe_off_until[start] = t + rng.uniform(2.0, 6.0, k)
        probe_off = self._probe_off_until >= t
        n_off = int(probe_off.sum())

        out: dict[str, np.ndarray] = {}
        for m, spec in self.numeric_specs.items():
            role = self.roles[m]
            lo, hi = spec.plausible
            if role is None:
                x = latent[f"metric:{m}"]
                span = hi - lo
                decimals = 2 if span <= 10 else 1 if span <= 10_000 else 0
            else:
                name = role.name
                decimals = role.decimals
                if name == "mean" and "sys" in latent and "dia" in latent and "mean" not in self._walks:
                    x = latent["dia"] + (latent["sys"] - latent["dia"]) / 3.0
                else:
                    x = latent[name]
                if name == "hr" and sum(1 for r in self.roles.values() if r is not None and r.name == "hr") > 1:
                    # Two devices' views of one heart (ECG heart rate, SpO2 pulse rate) differ a little.
                    x = x + rng.normal(0.0, 0.7, n)
                if n_off and name in ("spo2", "hr", "perf"):
                    x = x.copy()
                    jumps = {"spo2": (30.0, 75.0), "hr": (25.0, 220.0), "perf": (0.0, 0.3)}[name]
                    x[probe_off] = rng.uniform(*jumps, n_off)
            x = np.clip(x, lo, hi)
            if self.art.out_of_range > 0:
                bad = rng.random(n) < self.art.out_of_range
                if bad.any():
                    x = x.copy()
                    x[bad] = hi * 1.27 if hi > 0 else hi + 0.27 * (hi - lo)
            decimals = max(decimals, self._decimals[m])
            if decimals == 0:
                out[m] = np.rint(x).astype(np.int64)
            else:
                out[m] = np.round(x, decimals)
        return out

    # -- waveforms --------------------------------------------------------------------

    def _wave(self, metric: str, spec: MetricSpec, tt: np.ndarray, f_beat: np.ndarray, f_breath: np.ndarray) -> np.ndarray:
        """Samples at times ``tt`` (seconds since the window start, shape (S,)) for all devices."""
        rng, n = self.rng, self.n
        lo, hi = spec.plausible
        beat = self._beat_phase[:, None] + f_beat[:, None] * tt[None, :]
        breath = self._breath_phase[:, None] + f_breath[:, None] * tt[None, :]
        name = metric.lower()
        if "ecg" in name:
            rr_s = (1.0 / f_beat)[:, None]
            q = np.sqrt(rr_s)
            d = (np.mod(beat, 1.0) - 0.35) * rr_s  # seconds from this beat's R wave
            y = (
                0.15 * _gauss(d, -0.17 * q, 0.025)
                - 0.12 * _gauss(d, -0.03, 0.010)
                + 1.10 * _gauss(d, 0.0, 0.011)
                - 0.25 * _gauss(d, 0.03, 0.012)
                + 0.32 * _gauss(d, 0.30 * q, 0.05 * q)
            )
            y += 0.05 * np.sin(2 * np.pi * breath) + rng.normal(0.0, 0.012, y.shape)
            natural = (-0.5, 1.5)
        elif "pleth" in name or "ppg" in name:
            rr_s = (1.0 / f_beat)[:, None]
            p = np.mod(beat - 0.35 - 0.2 / rr_s, 1.0)  # 0.2 s pulse transit after the R wave
            y = _gauss(p, 0.22, 0.08) + 0.4 * _gauss(p, 0.50, 0.09)
            y *= (1.0 + 0.08 * np.sin(2 * np.pi * breath)) * (self._walks["perf"].x / 4.0 + 0.3)[:, None]
            y += rng.normal(0.0, 0.005, y.shape)
            off = self._probe_off_until >= self._t
            if off.any():
                y[off] = rng.normal(0.0, 0.01, (int(off.sum()), y.shape[1]))
            natural = (-0.1, 3.0)
        elif "resp" in name or "imp" in name or "co2" in name or "paw" in name or "flow" in name:
            y = np.sin(2 * np.pi * breath) + 0.25 * np.sin(4 * np.pi * breath + 0.6)
            y += rng.normal(0.0, 0.01, y.shape)
            natural = (-1.5, 1.5)
        else:
            y = np.sin(2 * np.pi * breath)
            natural = (-1.2, 1.2)
        # Keep the model's own units when its natural range fits the plausible range;
        # otherwise map that range onto the middle 60 % of the plausible range.
        ymin, ymax = natural
        span = hi - lo
        if not (lo <= ymin and ymax <= hi):
            y = lo + 0.2 * span + (y - ymin) * (0.6 * span / (ymax - ymin))
        y = np.clip(y, lo, hi)
        if self.art.waveform_out_of_range > 0:
            bad = rng.random(n) < self.art.waveform_out_of_range
            if bad.any():
                y[bad, rng.integers(0, y.shape[1])] = hi + 0.5 * span
        return np.round(y, 3)

    # -- windows ----------------------------------------------------------------------

    def next_window(self) -> Window:
        """Generate the next ``interval_s`` seconds of signal for every device."""
        w = self._window
        t0 = self._t
        dt = self.interval_s / self.k
        numerics: list[tuple[int, dict[str, np.ndarray]]] = []
        dues: list[dict[str, np.ndarray]] = []
        for j in range(self.k):
            t = t0 + (j + 1) * dt
            values = self._numeric_values(t, dt)
            if values:
                numerics.append((int(round(t * 1000)), values))
                due = {}
                for m, (every, phase) in self._slow.items():
                    due[m] = np.floor((t + phase) / every) > np.floor((t - dt + phase) / every)
                dues.append(due)
        if not self.numeric_specs:
            # Keep the physiology moving for the waveforms.
            for walk in self._walks.values():
                walk.step(self.interval_s, self.rng)
        f_beat = self._walks["hr"].x / 60.0
        f_breath = self._walks["rr"].x / 60.0
        waves: list[WaveBlock] = []
        t1 = t0 + self.interval_s
        for m, spec in self.wave_specs.items():
            hz = float(spec.hz)  # type: ignore[arg-type]
            first = self._wave_sent[m]
            last = int(math.floor(t1 * hz + 1e-9))  # samples strictly before t1
            if last <= first:
                continue
            idx = np.arange(first, last, dtype=np.float64)
            tt = idx / hz - t0
            samples = self._wave(m, spec, tt, f_beat, f_breath)
            waves.append(WaveBlock(m, hz, int(round(first * 1000.0 / hz)), samples))
            self._wave_sent[m] = last
        self._beat_phase = np.mod(self._beat_phase + f_beat * self.interval_s, 1.0)
        self._breath_phase = np.mod(self._breath_phase + f_breath * self.interval_s, 1.0)
        self._t = t1
        self._window = w + 1
        return Window(w, numerics, waves, dues)
