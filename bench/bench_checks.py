"""Throughput of the vectorized checks + alert rules against the per-reading reference.

Batches of 10,000 numeric readings from 1,000 devices, built with the real decode path
(``gateway.decode.decode`` + ``to_columns``) from JSON envelopes, then timed through
``run_checks`` + ``AlertEngine.evaluate`` + ``AlertEngine.tick`` (what the pipeline runs per
batch). Two fleets:

- ``icu``: 1,000 ICU beds (``patient_monitor``), one envelope each per batch carrying the 10
  numerics at one time: one reading per (device, metric) per batch.
- ``oximeter``: 1,000 pulse oximeters, one envelope each per batch carrying 5 timestamps of
  spo2 + pulse rate: five readings per (device, metric) per batch, so the sequential
  rules work inside every group.

Devices report in a different order in every batch. Values are random walks around normal physiology with occasional artifacts (probe off,
spikes, frozen values), so every check and rule has work to do. The first batch (new
keys) is a warm-up and is not timed: a live gateway runs in steady state.

Times are CPU seconds of this process (``time.process_time``), so other load on a shared
machine inflates them less than wall time; the heap built for the data is frozen out of the
garbage collector first. Each fleet is run ``--repeat`` times from fresh state; the figure
is the sum over batches of each batch's fastest run (as ``timeit`` reports the best), with
the median run in parentheses; the reference is measured the same way. Run:
``.venv/bin/python -m bench.bench_checks [--batches N] [--reference-batches M] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import msgspec
import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.decode import decode, to_columns
from gateway.model import NumericColumns, WaveformColumns
from gateway.profiles import load_profiles
from gateway.rules import AlertEngine
from tests.checks.reference import ReferenceChecks, ReferenceRules

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
DEVICES = 1000
TARGET_RATE = 2_000_000
TARGET_RATIO = 20

_NORMAL = {
    "heart_rate": (75, 1.5), "resp_rate": (16, 0.5), "spo2": (96, 0.6), "pulse_rate": (75, 1.5),
    "perfusion_index": (3.0, 0.1), "nibp_sys": (120, 1.0), "nibp_dia": (75, 1.0), "nibp_mean": (90, 1.0),
    "body_temp": (37.0, 0.02), "etco2": (38, 0.5),
}


def _fleet(kind: str, batches: int, seed: int = 7) -> list[tuple[NumericColumns, WaveformColumns]]:
    """Column batches of 10,000 numeric readings each, in the order a gateway would see them."""
    profiles = load_profiles(PROFILES_DIR)
    rng = np.random.default_rng(seed)
    if kind == "icu":
        profile, metrics, per_env, prefix = "patient_monitor", list(_NORMAL), 1, "icu"
    else:
        profile, metrics, per_env, prefix = "pulse_oximeter", ["spo2", "pulse_rate"], 5, "po"
    center = np.array([_NORMAL[m][0] for m in metrics], dtype=float)
    step = np.array([_NORMAL[m][1] for m in metrics], dtype=float)
    level = np.tile(center, (DEVICES, 1))
    t0 = 1_764_187_200_000
    out = []
    for b in range(batches):
        payloads, received = [], []
        for d in rng.permutation(DEVICES).tolist():  # devices do not report in a fixed order
            numerics = []
            for k in range(per_env):
                t = t0 + (b * per_env + k) * 1000
                level[d] += rng.normal(0.0, step) - 0.02 * (level[d] - center)
                vals = np.round(level[d], 1)
                r = rng.random()
                if r < 0.002:
                    vals[0] = 0.0  # probe off / lead off: out of range or a spike
                elif r < 0.004:
                    vals[0] += 25.0  # a spike
                numerics.append({"t": t, "values": dict(zip(metrics, vals.tolist()))})
            env = {"v": 1, "device_id": f"{prefix}-{d:05d}", "profile": profile, "numerics": numerics}
            payloads.append(msgspec.json.encode(env))
            received.append(numerics[-1]["t"] + 150)
        items = [decode(p, content_type="application/json", profiles=profiles) for p in payloads]
        out.append(to_columns(items, received))
    return out


class _Vectorized:
    """The live path: run_checks + AlertEngine.evaluate + AlertEngine.tick."""

    def __init__(self) -> None:
        self.profiles = load_profiles(PROFILES_DIR)
        self.state, self.engine, self.settings = CheckState(), AlertEngine(self.profiles), CheckSettings()

    def __call__(self, num: NumericColumns, wav: WaveformColumns) -> int:
        flags, _ = run_checks(num, wav, self.profiles, self.state, self.settings)
        events = self.engine.evaluate(num, flags, wav)
        return len(events) + len(self.engine.tick(int(num.received_at.max())))


class _Reference:
    """The per-reading reference of tests/checks/reference.py, same steps."""

    def __init__(self) -> None:
        profiles = load_profiles(PROFILES_DIR)
        self.checks, self.rules = ReferenceChecks(profiles), ReferenceRules(profiles)

    def __call__(self, num: NumericColumns, wav: WaveformColumns) -> int:
        flags, _ = self.checks.run(num, wav)
        events = self.rules.evaluate(num, flags, wav)
        return len(events) + len(self.rules.tick(int(num.received_at.max())))


def _times(make: type, batches: list[tuple[NumericColumns, WaveformColumns]], repeat: int) -> tuple[list[list[float]], int]:
    """CPU seconds of every batch but the first (warm-up: it creates every key), per run.

    Every run starts from fresh state, so run r's batch i does exactly the same work as
    any other run's batch i.
    """
    runs, events = [], 0
    for _ in range(repeat):
        step, times, events = make(), [], 0
        for i, (num, wav) in enumerate(batches):
            start = time.process_time()
            n = step(num, wav)
            elapsed = time.process_time() - start
            if i:
                times.append(elapsed)
                events += n
        runs.append(times)
    return runs, events


def _rates(runs: list[list[float]], per_batch: int) -> tuple[float, float]:
    """(best, median) readings/s: best = each batch's fastest run (timeit style), summed."""
    best = sum(min(col) for col in zip(*runs))
    median = statistics.median(sum(r) for r in runs)
    n = per_batch * len(runs[0])
    return n / best, n / median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_checks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=21, help="batches per fleet, the first one untimed (default 21)")
    parser.add_argument("--reference-batches", type=int, default=4, help="batches for the reference (default 4)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; best and median reported (default 5)")
    args = parser.parse_args(argv)
    print(f"checks + rules, batches of 10,000 numeric readings from {DEVICES} devices, one core, "
          f"CPU time, best (median) of {args.repeat} runs")
    print(f"{'fleet':<9} {'vectorized r/s':>25} {'reference r/s':>21} {'ratio':>7} {'ms/batch':>9} {'events':>7}")
    met = True
    for kind in ("icu", "oximeter"):
        batches = _fleet(kind, max(args.batches, args.reference_batches, 2))
        gc.collect()
        gc.freeze()
        per_batch = len(batches[0][0])
        runs, events = _times(_Vectorized, batches[: args.batches], args.repeat)
        best, median = _rates(runs, per_batch)
        ref_runs, _ = _times(_Reference, batches[: args.reference_batches], args.repeat)
        ref_best, ref_median = _rates(ref_runs, per_batch)
        ratio = best / ref_best
        print(f"{kind:<9} {best:>12,.0f} ({median:>10,.0f}) {ref_best:>9,.0f} ({ref_median:>8,.0f}) "
              f"{ratio:>6.1f}x {per_batch / best * 1000:>9.2f} {events:>7}")
        met = met and best >= TARGET_RATE and ratio >= TARGET_RATIO
    print(f"target (>= {TARGET_RATE:,} readings/s and >= {TARGET_RATIO}x the reference, best of runs, "
          f"every fleet): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
