"""``make bench``: the standard suite, on one throwaway PostgreSQL+TimescaleDB and mosquitto.

1. **stress** (``bench.e2e``): small numeric envelopes flat out, ``live`` and ``backlog``
   modes, the raw binary COPY of the identical rows (the database's limit) and the
   identical messages to a bare subscriber (the broker's limit);
2. **ICU beds** (``bench.beds``): a fixed count, the bed sweep, the database and broker
   limits for ICU envelopes, and 2x overload;
3. the ``checks`` micro-bench (``bench/bench_checks.py``) as a subprocess, if present;
4. one table, ``bench/results/<stamp>-suite.json``, PNG plots (``bench.plots``) and the
   whole console output in ``bench/results/<stamp>-suite.log``.

Exit code 0 when every run lost nothing and the gateway always exited 0 (the targets are
printed, met or not: the machine is shared and noisy). ``python -m bench.run --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import beds, e2e
from bench.e2e import _f
from bench.common import git_revision, machine_info
from tests.harness import REPO

CHECKS_MODULE = REPO / "bench" / "bench_checks.py"
CHECKS_TIMEOUT_S = 300.0
RESULTS_DIR = e2e.RESULTS_DIR


class _Tee:
    """Write to a stream and to the suite's log file."""

    def __init__(self, stream: Any, log: Any) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.log.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self.stream.fileno())


def run_checks_bench() -> dict[str, Any] | None:
    """Run bench/bench_checks.py if present; its exit code and output."""
    if not CHECKS_MODULE.exists():
        print("\nchecks bench: bench/bench_checks.py not present, skipped.")
        return None
    print("\n=== checks bench (python -m bench.bench_checks) ===", flush=True)
    t0 = time.monotonic()
    out: list[str] = []
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_checks"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        out.append(line)
        if time.monotonic() - t0 > CHECKS_TIMEOUT_S:
            proc.kill()
            print(f"checks bench killed after {CHECKS_TIMEOUT_S:.0f} s")
            break
    code = proc.wait()
    return {"exit_code": code, "seconds": time.monotonic() - t0, "output": "".join(out)}


# The targets of the suite (each checked against figures of the same run).
ICU_MIN_BEDS = 8000  # beds per gateway process at p99 commit latency < 1 s, nothing lost
ICU_MAX_GATEWAY_US = 70.0  # gateway CPU per ICU envelope, and at most the PostgreSQL backends'
STRESS_MIN_RATIO = 0.8  # committed readings/s over raw single-connection COPY of the same rows, live and backlog
STRESS_MAX_CPU_RATIO = 0.5  # gateway CPU per reading over the PostgreSQL backends'
CHECKS_MIN_RATE = 5_000_000  # readings/s of checks + rules, every fleet (best of runs)
SUITE_MAX_S = 600.0


def _checks_rates(output: str) -> dict[str, float]:
    """Best readings/s per fleet from bench_checks' table (``<fleet> <best> (<median>) ...``)."""
    import re

    rates = {}
    for line in output.splitlines():
        m = re.match(r"^(icu|oximeter)\s+([\d,]+)\s", line)
        if m:
            rates[m.group(1)] = float(m.group(2).replace(",", ""))
    return rates


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite's targets, each with the figure measured in this run."""
    out: list[dict[str, Any]] = []
    stress = results.get("stress") or {}
    for r in stress.get("runs", []):
        if "window" not in r:
            continue
        w = r["window"]
        if "ratio_to_raw_copy" in r:
            out.append({"target": f"stress {r['mode']}: rate >= {STRESS_MIN_RATIO} x raw single-connection COPY",
                        "figure": f"{r['ratio_to_raw_copy']:.2f}", "met": r["ratio_to_raw_copy"] >= STRESS_MIN_RATIO})
        gw, be = w["gateway_cpu_us_per_reading"], w["pg_backends_cpu_us_per_reading"]
        out.append({"target": f"stress {r['mode']}: gateway CPU per reading <= {STRESS_MAX_CPU_RATIO} x the "
                              "PostgreSQL backends'",
                    "figure": f"{gw:.1f} vs {be:.1f} us ({gw / be:.2f})" if gw and be else "-",
                    "met": bool(gw and be and gw <= STRESS_MAX_CPU_RATIO * be)})
    icu = results.get("icu") or {}
    if icu:
        m = icu.get("sweep_max_beds")
        best = next((r for r in icu.get("steps", []) if r.get("beds") == m and "latency" in r), None)
        p99 = best["latency"]["reading_to_commit_s"]["p99"] if best else None
        out.append({"target": f">= {ICU_MIN_BEDS:,} ICU beds per gateway process at p99 commit latency < 1 s, "
                              "nothing lost",
                    "figure": f"{m:,} beds (p99 {p99:.3f} s)" if m and p99 is not None else "none passed",
                    "met": bool(m and m >= ICU_MIN_BEDS)})
        for r in icu.get("steps", []):
            w = r.get("window") or {}
            gw, be = w.get("gateway_cpu_us_per_envelope"), w.get("pg_backends_cpu_us_per_envelope")
            if gw is None or be is None:
                continue
            out.append({"target": f"{r['label']}: gateway CPU per ICU envelope <= {ICU_MAX_GATEWAY_US:.0f} us and "
                                  "<= the PostgreSQL backends'",
                        "figure": f"{gw:.0f} vs {be:.0f} us", "met": gw <= ICU_MAX_GATEWAY_US and gw <= be})
        ov = icu.get("overload")
        if ov:
            out.append({"target": f"2x overload for {icu['config']['overload_s']:.0f} s: RSS < max_memory_mib, nothing "
                                  "lost, backlog drains",
                        "figure": (f"peak RSS {ov['peak_rss_mib']:.0f} MiB (bound {ov['max_memory_mib']}), drain "
                                   f"{ov['drain_s']:.1f} s" if "peak_rss_mib" in ov else ov.get("error", "-")),
                        "met": bool(ov.get("passed"))})
    runs = [("stress " + r["mode"], r.get("zero_loss")) for r in stress.get("runs", [])]
    runs += [(r.get("label", "?"), r.get("zero_loss")) for r in icu.get("steps", [])]
    if icu.get("overload"):
        runs.append(("overload", icu["overload"].get("zero_loss")))
    lost = [name for name, z in runs if not z]
    out.append({"target": "zero loss in every run (published = committed, counted)",
                "figure": f"{len(runs) - len(lost)} of {len(runs)} runs" + (f"; lost: {', '.join(lost)}" if lost else ""),
                "met": bool(runs) and not lost})
    checks = results.get("checks")
    if checks:
        rates = _checks_rates(checks.get("output", ""))
        out.append({"target": f"checks bench >= {CHECKS_MIN_RATE / 1e6:g} M readings/s, every fleet",
                    "figure": ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in rates.items()) or "no figures",
                    "met": bool(rates) and min(rates.values()) >= CHECKS_MIN_RATE})
    if "duration_s" in results:
        out.append({"target": f"make bench under {SUITE_MAX_S / 60:.0f} minutes",
                    "figure": f"{results['duration_s'] / 60:.1f} min", "met": results["duration_s"] < SUITE_MAX_S})
    return out  # the peer target (>= 5x Node-RED's committed readings/s) is make bench-peer's


def print_icu_table(icu: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up now: the suite replaces sys.stdout to keep a log
    runs = [r for r in icu.get("steps", [])] + ([icu["overload"]] if icu.get("overload") else [])
    if not runs:
        return
    db = (icu.get("db_limit") or {}).get("beds_equivalent")
    br = (icu.get("broker_limit") or {}).get("beds_equivalent")
    cols = [r.get("label", "?").replace("icu ", "") for r in runs]
    table: list[tuple[str, ...]] = [("ICU beds", *cols)]

    def row(label: str, fn: Any) -> None:
        cells = []
        for r in runs:
            try:
                cells.append("FAILED" if "error" in r else fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        table.append((label, *cells))

    lat = lambda r, k: r["latency"]["reading_to_commit_s"][k]  # noqa: E731
    row("seconds", lambda r: _f(r["seconds"]))
    row("target envelopes/s", lambda r: _f(r["target_envelopes_per_s"]))
    row("sent envelopes/s (ratio to target)",
        lambda r: f"{r['send_rate_envelopes_per_s']:,.0f} ({r['send_rate_ratio_to_target']:.3f})")
    row("publisher max lag ms / late sends", lambda r: f"{r['published']['max_send_lag_ms']:.0f} / "
                                                        f"{r['published']['late_sends']:,}")
    row("published envelopes", lambda r: f"{r['published']['published']:,}")
    row("committed envelopes", lambda r: f"{r['committed']['ingests']:,}")
    row("committed readings / samples", lambda r: f"{r['committed']['readings']:,} / {r['committed']['samples']:,}")
    row("zero loss", lambda r: "yes" if r["zero_loss"] else "NO")
    row("committed envelopes/s (steady)", lambda r: _f(r["window"]["envelopes_per_s"]))
    row("committed readings/s", lambda r: _f(r["window"]["readings_per_s"]))
    row("committed samples/s", lambda r: _f(r["window"]["samples_per_s"]))
    row("commit latency p50 s", lambda r: _f(lat(r, "p50"), ".3f"))
    row("commit latency p95 s", lambda r: _f(lat(r, "p95"), ".3f"))
    row("commit latency p99 s", lambda r: _f(lat(r, "p99"), ".3f"))
    row("commit latency max s", lambda r: _f(lat(r, "max"), ".3f"))
    row("receipt to commit p99 s", lambda r: _f(r["latency"]["receipt_to_commit_s"]["p99"], ".3f"))
    row("pass (p99 < 1 s, no loss)", lambda r: "yes" if r.get("passed") else "NO")
    row("gateway cores", lambda r: _f(r["window"].get("gateway_cores"), ".2f"))
    row("gateway CPU us/envelope", lambda r: _f(r["window"].get("gateway_cpu_us_per_envelope")))
    row("PG backends CPU us/envelope", lambda r: _f(r["window"].get("pg_backends_cpu_us_per_envelope")))
    row("mosquitto / publishers CPU s", lambda r: f"{r['window']['mosquitto_cpu_s']:.1f} / "
                                                  f"{r['window']['publishers_cpu_s']:.1f}")
    row("machine busy cores", lambda r: _f(r["window"]["machine_busy_cores"], ".2f"))
    row("gateway peak RSS MiB (sampled)", lambda r: _f(r["peak_rss_sampled_mib"]))
    row("drain after publishing s", lambda r: _f(r["drain_s"], ".1f"))
    if db:
        row(f"ratio to DB limit ({db:,.0f} beds, raw COPY)", lambda r: f"{r['window']['envelopes_per_s'] / db:.2f}")
    if br:
        row(f"ratio to broker limit ({br:,.0f} beds, bare sub)",
            lambda r: f"{r['window']['envelopes_per_s'] / br:.2f}")
    widths = [max(len(str(x[i])) for x in table) for i in range(len(table[0]))]
    print("", file=out)
    for x in table:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(x, widths))),
              file=out)
    if icu.get("db_limit"):
        d = icu["db_limit"]
        print(f"\nICU database limit: raw binary COPY of the rows of {d['envelopes']:,} envelopes (readings "
              f"{d['readings']['rows']:,} rows at {d['readings']['rows_per_s']:,.0f}/s, waveform blocks "
              f"{d['waveform_blocks']['rows']:,} at {d['waveform_blocks']['rows_per_s']:,.0f}/s), one connection: "
              f"{d['envelopes_per_s']:,.0f} envelopes/s", file=out)
    if icu.get("broker_limit"):
        b = icu["broker_limit"]
        print(f"ICU broker limit: {b['received']['messages']:,} of {b['published']['published']:,} ICU envelopes "
              f"flat out to the bare subscriber: {b['envelopes_per_s']:,.0f} msgs/s ({b['received']['mib_per_s']:.0f} "
              f"MiB/s)", file=out)
    print(f"bed sweep: largest count with p99 < {icu['config']['p99_limit_s']:g} s and nothing lost: "
          f"{_f(icu.get('sweep_max_beds'))}", file=out)


def print_targets(results: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up now: the suite replaces sys.stdout to keep a log
    print("\ntargets (measured in this run):", file=out)
    for t in results["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {t['figure']}", file=out)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="stress,icu,checks", help="comma-separated parts: stress, icu, checks")
    ap.add_argument("--readings", type=int, default=300_000,
                    help="stress: readings per mode (10 per envelope, one device per 3 envelopes)")
    ap.add_argument("--beds", type=int, default=3000, help="ICU: the fixed bed count (the sweep starts there)")
    ap.add_argument("--fixed-seconds", type=float, default=30.0)
    ap.add_argument("--step-seconds", type=float, default=20.0, help="ICU: seconds per sweep step")
    ap.add_argument("--sweep-steps", type=int, default=5, help="ICU: sweep steps after the fixed count (0: none)")
    ap.add_argument("--overload-seconds", type=float, default=60.0, help="ICU: overload duration (0: skip)")
    ap.add_argument("--max-memory-mib", type=int, default=512, help="the gateway's max_memory_mib in the ICU runs")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra gateway setting for every run (repeatable)")
    ap.add_argument("--profile-gateway", action="store_true", help="the stress and ICU gateways' cProfile top 40")
    ap.add_argument("--no-write", action="store_true", help="do not write results, plots or the log")
    ap.add_argument("--keep", action="store_true", help="keep the services' directory (gateway logs) afterwards")
    return ap.parse_args(argv)


async def _suite(a: argparse.Namespace, parts: set[str]) -> dict[str, Any]:
    env = dict(kv.split("=", 1) for kv in a.gateway_env)
    started = datetime.now(timezone.utc)
    results: dict[str, Any] = {"bench": "suite", "started_at": started.isoformat(timespec="seconds"),
                               "git": git_revision(), "machine": machine_info(), "argv": sys.argv[1:]}
    pg, mq, work = e2e.make_services()
    t0 = time.monotonic()
    try:
        pg.start()
        mq.start()
        versions = await e2e._versions(pg.dsn("postgres"))
        from bench.common import mosquitto_version, package_versions

        versions["mosquitto"] = mosquitto_version()
        versions["python_packages"] = package_versions()  # type: ignore[assignment]
        results["versions"] = versions
        if "stress" in parts:
            print("=== stress: small numeric envelopes flat out (bench.e2e) ===", flush=True)
            scfg = e2e.E2EConfig(readings=a.readings, gateway_env=env, profile_gateway=a.profile_gateway)
            stress = await e2e.run(scfg, (pg, mq, work))
            results["stress"] = stress
            stress["versions"] = versions
            e2e.print_table(stress)
        if "icu" in parts:
            print("\n=== ICU beds: fixed count, sweep, limits, overload (bench.beds) ===", flush=True)
            bcfg = beds.BedsConfig(fixed_beds=a.beds, fixed_s=a.fixed_seconds, step_s=a.step_seconds,
                                   sweep_steps=a.sweep_steps, sweep=a.sweep_steps > 0,
                                   overload=a.overload_seconds > 0, overload_s=a.overload_seconds or 60.0,
                                   max_memory_mib=a.max_memory_mib, gateway_env=env,
                                   profile_gateway=a.profile_gateway)
            results["icu"] = await beds.run_beds(bcfg, pg, mq, work, out=sys.stdout)
            print_icu_table(results["icu"])
    finally:
        results["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
        e2e.stop_services(pg, mq, work, a.keep)
    results["services_and_runs_s"] = time.monotonic() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    parts = {p.strip() for p in a.only.split(",") if p.strip()}
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log = None
    if not a.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        log = open(RESULTS_DIR / f"{stamp}-suite.log", "w")
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
    t0 = time.monotonic()
    try:
        results = asyncio.run(_suite(a, parts))
        if "checks" in parts:
            results["checks"] = run_checks_bench()
        results["duration_s"] = time.monotonic() - t0
        results["targets"] = targets(results)
        print_targets(results)
        good = all(e2e.ok(results[k]) if k == "stress" else beds.ok(results[k]) for k in ("stress", "icu")
                   if k in results)
        checks = results.get("checks")
        good = good and (checks is None or checks["exit_code"] == 0)
        if not a.no_write:
            from bench.plots import write_plots

            path = RESULTS_DIR / f"{stamp}-suite.json"
            path.write_text(json.dumps(results, indent=1, default=str) + "\n")
            pngs = write_plots(results, RESULTS_DIR, stamp)
            print(f"\nresults: {os.path.relpath(path, Path.cwd())}; plots: "
                  f"{', '.join(os.path.relpath(p, Path.cwd()) for p in pngs)}; log: "
                  f"{os.path.relpath(RESULTS_DIR / f'{stamp}-suite.log', Path.cwd())}")
        print(f"bench suite finished in {results['duration_s']:.0f} s: {'ok' if good else 'FAILED'}", flush=True)
        return 0 if good else 1
    finally:
        if log is not None:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            log.close()


if __name__ == "__main__":
    sys.exit(main())
