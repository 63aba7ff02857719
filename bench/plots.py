"""PNG plots of a suite's results (matplotlib, from the ``bench`` extra).

``write_plots(results, directory, stamp)`` writes, and returns the paths of:

- ``<stamp>-throughput.png``: envelopes committed per second over time, by PostgreSQL
  commit time (ICU runs) or by the 50 ms polls of the ingest count (stress), one panel
  per run, with the publishers' send rate for the paced runs;
- ``<stamp>-latency-cdf.png``: the CDF of commit latency (newest reading to commit) of
  every ICU run, log scale, with the 1 s limit;
- ``<stamp>-bed-sweep.png``: p50/p99/max commit latency against the bed count, passing
  and failing steps marked;
- ``<stamp>-overload.png``: the overload run's committed rate, backlog held by the broker
  and the gateway's resident memory against its bound.

``python -m bench.plots RESULTS.json`` redraws them from a results file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["write_plots"]



def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rate_series(samples: list[dict[str, Any]], key: str, min_dt: float = 0.0) -> tuple[list[float], list[float]]:
    """Rates between samples at least ``min_dt`` apart (the publishers update their counters about once a second)."""
    ts, rs = [], []
    a = samples[0] if samples else None
    for b in samples[1:]:
        dt = b["t"] - a["t"]  # type: ignore[index]
        if dt > 0 and dt >= min_dt:
            ts.append(b["t"])
            rs.append((b[key] - a[key]) / dt)  # type: ignore[index]
            a = b
    return ts, rs


def _icu_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    icu = results.get("icu") or {}
    runs = [r for r in icu.get("steps", []) if "latency" in r]
    if icu.get("overload") and "latency" in icu["overload"]:
        runs.append(icu["overload"])
    return runs


def throughput(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    panels: list[tuple[str, Any]] = []
    stress = results.get("stress") or {}
    for r in stress.get("runs", []):
        if r.get("poll_samples"):
            panels.append((f"stress {r['mode']} (flat out)", r))
    for r in _icu_runs(results):
        panels.append((r["label"], r))
    if not panels:
        return path
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)), squeeze=False)
    for ax, (title, r) in zip(axes[:, 0], panels):
        if "poll_samples" in r:  # stress: envelopes -> readings
            ts, rs = _rate_series(r["poll_samples"], "ingests")
            t0 = ts[0] if ts else 0.0
            ax.plot([t - t0 for t in ts], [x * 10 / 1000 for x in rs], lw=1, label="committed readings/s (k)")
        else:
            tl = r.get("commit_timeline", [])
            ax.step([t for t, _ in tl], [c for _, c in tl], where="post", lw=1.2, label="committed envelopes/s")
            ts, rs = _rate_series(r.get("samples", []), "published", 2.0)
            ax.plot(ts, rs, lw=0.8, alpha=0.7, label="published envelopes/s")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("seconds since the run started")
    return _save(plt, fig, path)


def latency_cdf(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in _icu_runs(results):
        pts = r["latency"].get("cdf_reading_to_commit_s") or []
        if pts:
            ax.plot([max(v, 1e-3) for v, _ in pts], [f for _, f in pts], lw=1.2,
                    label=f"{r['label']} (p99 {r['latency']['reading_to_commit_s']['p99']:.2f} s)")
    limit = (results.get("icu") or {}).get("config", {}).get("p99_limit_s", 1.0)
    ax.axvline(limit, color="red", ls="--", lw=1, label=f"{limit:g} s")
    ax.axhline(0.99, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("commit latency, s (newest reading of the envelope to its commit)")
    ax.set_ylabel("fraction of envelopes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def bed_sweep(results: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    icu = results.get("icu") or {}
    steps = sorted((r for r in icu.get("steps", []) if "latency" in r), key=lambda r: r["beds"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if steps:
        beds = [r["beds"] for r in steps]
        for key, style in (("p50", "o-"), ("p99", "s-"), ("max", "^:")):
            ax.plot(beds, [r["latency"]["reading_to_commit_s"][key] for r in steps], style, label=key, lw=1)
        for r in steps:
            ok = r.get("passed")
            ax.annotate("pass" if ok else ("FAIL" + ("" if r["zero_loss"] else " (loss)")),
                        (r["beds"], r["latency"]["reading_to_commit_s"]["p99"]), fontsize=7,
                        color="green" if ok else "red", xytext=(3, 5), textcoords="offset points")
    limit = icu.get("config", {}).get("p99_limit_s", 1.0)
    ax.axhline(limit, color="red", ls="--", lw=1, label=f"p99 limit {limit:g} s")
    if icu.get("sweep_max_beds"):
        ax.axvline(icu["sweep_max_beds"], color="green", ls=":", lw=1, label=f"max {icu['sweep_max_beds']:,} beds")
    ax.set_yscale("log")
    ax.set_xlabel("ICU beds (one envelope/s each: 10 numerics, ECG 250 Hz, pleth 125 Hz, resp 62.5 Hz)")
    ax.set_ylabel("commit latency, s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def overload(results: dict[str, Any], path: Path) -> Path | None:
    r = (results.get("icu") or {}).get("overload")
    if not r or "samples" not in r:
        return None
    plt = _plt()
    s = r["samples"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    tl = r.get("commit_timeline", [])
    a1.step([t for t, _ in tl], [c for _, c in tl], where="post", lw=1.2, label="committed envelopes/s")
    ts, rs = _rate_series(s, "published", 2.0)
    a1.plot(ts, rs, lw=0.8, alpha=0.7, label="published envelopes/s")
    a1b = a1.twinx()
    a1b.plot([x["t"] for x in s], [x["acked"] - x["ingests"] for x in s], color="tab:red", lw=1,
             label="backlog (broker-acked, not committed)")
    a1b.set_ylabel("envelopes", fontsize=8)
    a1.set_title(r["label"], fontsize=9)
    a1.legend(fontsize=7, loc="upper left")
    a1b.legend(fontsize=7, loc="upper right")
    a2.plot([x["t"] for x in s], [x["rss_mib"] or 0 for x in s], lw=1.2, label="gateway RSS, MiB")
    a2.axhline(r.get("max_memory_mib", 512), color="red", ls="--", lw=1, label="max_memory_mib")
    a2.set_xlabel("seconds since the run started")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_plots(results: dict[str, Any], directory: Path, stamp: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = [
        throughput(results, directory / f"{stamp}-throughput.png"),
        latency_cdf(results, directory / f"{stamp}-latency-cdf.png"),
        bed_sweep(results, directory / f"{stamp}-bed-sweep.png"),
        overload(results, directory / f"{stamp}-overload.png"),
    ]
    return [p for p in out if p is not None and p.exists()]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.plots RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    results = json.loads(path.read_text())
    stamp = path.name.split("-suite")[0].split("-e2e")[0]
    for p in write_plots(results, path.parent, stamp):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
