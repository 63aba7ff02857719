"""Grouping of the rollups: equal to a plain per-(device, metric, minute) reference, in order."""

from __future__ import annotations

import numpy as np

from gateway.model import ARTIFACT_FLAGS
from gateway.sinks.rollups import _ROW, aggregate


def _reference(device, metric, t, value, flags) -> list[tuple]:
    groups: dict[tuple, list[float]] = {}
    for d, m, ti, v, f in zip(device, metric, t.tolist(), value.tolist(), flags.tolist()):
        if f & ARTIFACT_FLAGS == 0:
            groups.setdefault((d, m, ti // 60_000 * 60_000), []).append(v)
    return [(d, m, b, min(vs), max(vs), sum(vs), len(vs)) for (d, m, b), vs in sorted(groups.items())]


def test_aggregate_equals_the_reference_and_is_sorted():
    rng = np.random.default_rng(7)
    n = 5000
    device = np.array([f"dev-{i}" for i in rng.integers(0, 40, n)], dtype=object)
    metric = np.array(rng.choice(["spo2", "pulse_rate", "resp_rate"], n), dtype=object)
    t = 1_700_000_000_000 + rng.integers(-3_600_000, 3_600_000, n)  # late readings across many minutes
    value = rng.uniform(50, 100, n).round(1)
    flags = np.where(rng.random(n) < 0.1, rng.choice([1, 2, 128, 4, 64], n), 0).astype(np.int32)
    d, m, b, lo, hi, total, count = aggregate(device, metric, t, value, flags)
    got = list(zip(d, m, b.tolist(), lo.tolist(), hi.tolist(), total.tolist(), count.tolist()))
    ref = _reference(device, metric, t, value, flags)
    assert [g[:3] + g[3:5] + g[6:] for g in got] == [r[:3] + r[3:5] + r[6:] for r in ref]
    assert np.allclose([g[5] for g in got], [r[5] for r in ref], rtol=1e-12)
    assert [g[:3] for g in got] == sorted(g[:3] for g in got)


def test_all_artifacts_or_nothing_gives_no_groups():
    one = np.array(["a"], dtype=object)
    assert aggregate(one, one, np.array([0]), np.array([1.0]), np.array([ARTIFACT_FLAGS], dtype=np.int32))[0] == []


def test_the_staged_row_is_the_binary_copy_layout():
    assert _ROW.itemsize == 2 + 7 * 4 + 2 * 4 + 5 * 8
