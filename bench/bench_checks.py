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
garbage collector first. Run:
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


def _time_vectorized(batches: list[tuple[NumericColumns, WaveformColumns]]) -> tuple[float, int, int]:
    profiles = load_profiles(PROFILES_DIR)
    state, engine, settings = CheckState(), AlertEngine(profiles), CheckSettings()
    seconds, readings, events = 0.0, 0, 0
    for i, (num, wav) in enumerate(batches):
        start = time.process_time()
        flags, wflags = run_checks(num, wav, profiles, state, settings)
        ev = engine.evaluate(num, flags, wav)
        ev += engine.tick(int(num.received_at.max()))
        elapsed = time.process_time() - start
        if i:  # batch 0 creates every key: warm-up
            seconds += elapsed
            readings += len(num)
            events += len(ev)
    return seconds, readings, events


def _time_reference(batches: list[tuple[NumericColumns, WaveformColumns]]) -> tuple[float, int, int]:
    profiles = load_profiles(PROFILES_DIR)
    checks, rules = ReferenceChecks(profiles), ReferenceRules(profiles)
    seconds, readings, events = 0.0, 0, 0
    for i, (num, wav) in enumerate(batches):
        start = time.process_time()
        flags, _ = checks.run(num, wav)
        ev = rules.evaluate(num, flags, wav)
        ev += rules.tick(int(num.received_at.max()))
        elapsed = time.process_time() - start
        if i:
            seconds += elapsed
            readings += len(num)
            events += len(ev)
    return seconds, readings, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_checks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=21, help="batches per fleet, the first one untimed (default 21)")
    parser.add_argument("--reference-batches", type=int, default=4, help="batches for the reference (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="vectorized runs per fleet; the median is reported (default 3)")
    args = parser.parse_args(argv)
    print(f"checks + rules, batches of 10,000 numeric readings from {DEVICES} devices (one core)")
    print(f"{'fleet':<10} {'vectorized r/s':>15} {'reference r/s':>14} {'ratio':>7} {'ms/batch':>9} {'events':>7}")
    met = True
    for kind in ("icu", "oximeter"):
        batches = _fleet(kind, max(args.batches, args.reference_batches, 2))
        gc.collect()
        gc.freeze()
        runs = [_time_vectorized(batches[: args.batches]) for _ in range(args.repeat)]
        rates = [r / s for s, r, _ in runs]
        rate = statistics.median(rates)
        s_ref, r_ref, _ = _time_reference(batches[: args.reference_batches])
        rate_ref = r_ref / s_ref
        ms = 10_000 / rate * 1000
        print(f"{kind:<10} {rate:>15,.0f} {rate_ref:>14,.0f} {rate / rate_ref:>6.1f}x {ms:>9.2f} {runs[0][2]:>7}")
        met = met and rate >= TARGET_RATE and rate / rate_ref >= TARGET_RATIO
    print(f"target (>= {TARGET_RATE:,} readings/s and >= {TARGET_RATIO}x the reference on every fleet): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
