"""bench.signals: values inside the profiles' plausible ranges, continuous waveforms, episodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.signals import NO_ARTIFACTS, ArtifactRates, DeviceGroup
from gateway.profiles import load_profiles

PROFILES = load_profiles(Path(__file__).resolve().parents[2] / "device_profiles")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_clean_signals_stay_plausible_and_never_spike(name: str) -> None:
    prof = PROFILES[name]
    n = 40
    group = DeviceGroup(prof, n, seed=3, interval_s=1.0, artifacts=NO_ARTIFACTS)
    last: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # metric -> (value, t) of each device's last report
    reports = {m: 0 for m, s in prof.metrics.items() if s.kind == "numeric"}
    sent = {m: 0 for m, s in prof.metrics.items() if s.kind == "waveform"}
    windows = 900 if name != "weight_scale" else 60
    for _ in range(windows):
        w = group.next_window()
        for (t, values), due in zip(w.numerics, w.due):
            for metric, v in values.items():
                spec = prof.metrics[metric]
                lo, hi = spec.plausible
                assert v.shape == (n,)
                assert np.all((v >= lo) & (v <= hi)), (metric, v.min(), v.max())
                mask = due.get(metric, np.ones(n, dtype=bool))
                reports[metric] += int(mask.sum())
                if spec.max_rate is not None and metric in last:
                    pv, pt = last[metric]
                    seen = mask & (pt >= 0)
                    rate = np.abs(v[seen] - pv[seen]) / ((t - pt[seen]) / 1000.0)
                    assert np.all(rate <= spec.max_rate), (metric, rate.max())
                pv, pt = last.get(metric, (np.zeros(n), np.full(n, -1)))
                last[metric] = (np.where(mask, v, pv), np.where(mask, t, pt))
        for block in w.waveforms:
            lo, hi = prof.metrics[block.metric].plausible
            assert np.all((block.samples >= lo) & (block.samples <= hi)), block.metric
            # contiguous: the block starts where the previous one ended
            assert block.t0_ms == round(sent[block.metric] * 1000 / block.hz)
            sent[block.metric] += block.samples.shape[1]
    for metric, count in sent.items():
        assert count == int(windows * prof.metrics[metric].hz), metric
    for metric, count in reports.items():
        # each device reports each metric once per its interval (at a random phase)
        expected = n * windows / max(1.0, prof.metrics[metric].interval_s or 1.0)
        assert abs(count - expected) <= n, (metric, count, expected)


def test_every_numeric_metric_is_reported_and_varies() -> None:
    for prof in PROFILES.values():
        group = DeviceGroup(prof, 30, seed=1, interval_s=1.0, artifacts=NO_ARTIFACTS)
        series = [group.next_window().numerics[0][1] for _ in range(120)]
        numeric = [m for m, s in prof.metrics.items() if s.kind == "numeric"]
        # values are generated every window, reported per the metric's interval
        assert set(series[0]) == set(numeric)
        for m in numeric:
            values = np.array([s[m] for s in series])
            assert len(np.unique(values)) > 1, (prof.name, m)


def test_same_seed_same_signals() -> None:
    prof = PROFILES["patient_monitor"]
    a = DeviceGroup(prof, 5, seed=11)
    b = DeviceGroup(prof, 5, seed=11)
    for _ in range(5):
        wa, wb = a.next_window(), b.next_window()
        for (ta, va), (tb, vb) in zip(wa.numerics, wb.numerics):
            assert ta == tb and all(np.array_equal(va[m], vb[m]) for m in va)
        for ba, bb in zip(wa.waveforms, wb.waveforms):
            assert np.array_equal(ba.samples, bb.samples)


def test_numerics_per_envelope_spaces_entries_over_the_window() -> None:
    group = DeviceGroup(PROFILES["pulse_oximeter"], 3, seed=1, interval_s=5.0, numerics_per_envelope=5,
                        metrics=["spo2", "pulse_rate"], waveforms=False)
    w0, w1 = group.next_window(), group.next_window()
    assert [t for t, _ in w0.numerics] == [1000, 2000, 3000, 4000, 5000]
    assert [t for t, _ in w1.numerics] == [6000, 7000, 8000, 9000, 10000]
    assert all(set(v) == {"spo2", "pulse_rate"} for _, v in w0.numerics)
    assert w0.waveforms == []


def test_ecg_beats_at_the_heart_rate() -> None:
    prof = PROFILES["patient_monitor"]
    group = DeviceGroup(prof, 4, seed=5, artifacts=NO_ARTIFACTS)
    hr = []
    ecg = []
    for _ in range(60):
        w = group.next_window()
        hr.append(w.numerics[0][1]["heart_rate"])
        ecg.append(next(b.samples for b in w.waveforms if b.metric.startswith("ecg")))
    trace = np.concatenate(ecg, axis=1)
    for d in range(4):
        x = trace[d]
        peaks = np.sum((x[1:-1] > 0.6) & (x[1:-1] >= x[:-2]) & (x[1:-1] > x[2:]))
        expected = np.mean([h[d] for h in hr])  # beats per minute over 60 s
        assert abs(peaks - expected) <= 0.08 * expected + 2, (peaks, expected)


def test_desaturations_and_artifacts_happen() -> None:
    prof = PROFILES["pulse_oximeter"]
    rates = ArtifactRates(desaturation=1 / 60, probe_off=1 / 120, out_of_range=1 / 500, abnormal_patients=0.2)
    group = DeviceGroup(prof, 100, seed=2, artifacts=rates)
    spo2 = np.array([group.next_window().numerics[0][1]["spo2"] for _ in range(120)])
    assert (spo2 < 90).any(axis=0).sum() > 20  # desaturations
    assert (spo2 > 100).any()  # implausible sentinels
    steps = np.abs(np.diff(spo2, axis=0))
    assert (steps > prof.metrics["spo2"].max_rate).any()  # probe-off jumps


def test_unknown_metric_names_get_a_generic_walk_inside_the_range(tmp_path: Path) -> None:
    (tmp_path / "gizmo.toml").write_text(
        '[profile]\nname = "gizmo"\nversion = "1.0.0"\n'
        '[metrics.flux]\nkind = "numeric"\nunit = "1"\nmdc = "MDC_X"\nmdc_code = 1\ninterval_s = 1.0\nplausible = [1000.0, 1010.0]\n'
        '[metrics.wobble]\nkind = "waveform"\nunit = "1"\nmdc = "MDC_Y"\nmdc_code = 2\nhz = 10.0\nplausible = [5.0, 6.0]\n'
    )
    prof = load_profiles(tmp_path)["gizmo"]
    group = DeviceGroup(prof, 10, seed=1, artifacts=NO_ARTIFACTS)
    for _ in range(100):
        w = group.next_window()
        v = w.numerics[0][1]["flux"]
        assert np.all((v >= 1000) & (v <= 1010))
        assert np.all((w.waveforms[0].samples >= 5) & (w.waveforms[0].samples <= 6))
