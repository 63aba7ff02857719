"""bench.soak: the verdict on a series and the default bed count (no services)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.soak import FALLBACK_BEDS, default_beds, flatness

T = [10.0 * i for i in range(1, 31)]  # 30 samples, 10 s apart


def test_a_steady_noisy_series_is_flat_and_the_warmup_is_ignored() -> None:
    v = [400.0 if t <= 60 else 200.0 + (5 if i % 2 else -5) for i, t in enumerate(T)]  # warm-up climbs, then flat
    r = flatness(T, v, warmup_s=60, tolerance=0.10)
    assert r["flat"] is True and r["samples"] == 24 and abs(r["first"] - 200) <= 5 and abs(r["last"] - 200) <= 5


def test_a_slow_leak_is_not_flat() -> None:
    v = [100.0 + 1.0 * i for i in range(len(T))]  # +1 % of the start per sample: 29 % over the run
    r = flatness(T, v, warmup_s=0, tolerance=0.10)
    assert r["flat"] is False and r["change"] > 0.10 and r["trend_ratio"] > 0.10


def test_one_spike_does_not_decide_the_verdict_but_a_step_does() -> None:
    spike = [50.0] * len(T)
    spike[20] = 500.0
    assert flatness(T, spike, warmup_s=0, tolerance=0.10)["flat"] is True
    step = [50.0] * 15 + [60.0] * 15
    assert flatness(T, step, warmup_s=0, tolerance=0.10)["flat"] is False


def test_missing_samples_and_too_few_give_no_verdict() -> None:
    r = flatness(T, [None] * len(T), warmup_s=0, tolerance=0.10)
    assert r["flat"] is None and "5 needed" in r["why"]
    assert flatness(T, [0.0] * len(T), warmup_s=0, tolerance=0.10)["flat"] is True  # zero all along is flat


def test_default_beds_is_half_the_newest_suite_sweep(tmp_path: Path) -> None:
    assert default_beds(tmp_path) == (FALLBACK_BEDS, "no suite result: the default")
    (tmp_path / "20260101-000000-suite.json").write_text(json.dumps({"icu": {"sweep_max_beds": 3000}}))
    (tmp_path / "20260201-000000-suite.json").write_text(json.dumps({"icu": {"sweep_max_beds": 3400}}))
    (tmp_path / "20260301-000000-suite.json").write_text(json.dumps({"stress": {}}))  # no ICU part: skipped
    beds, why = default_beds(tmp_path)
    assert beds == 1700 and "20260201-000000-suite.json" in why
