"""Scaling on one machine: the e2e stress scenario with ``--workers 1`` and ``--workers 2`` in one run.

Runs ``bench.e2e`` (same scenario, same throwaway PostgreSQL and mosquitto for both)
once per worker count, with ``VITALGATE_WORKERS`` set, and prints committed readings/s,
the ratio to one worker, and CPU per committed reading: the gateway's (the supervisor
and every worker, read from /proc over the measurement window) and the PostgreSQL
backends'. With the database and the broker on the same 2-core machine, a second
worker mostly competes with them for the same cores: expect little gain, and read the
machine's busy cores beside the rate.

    python -m bench.workers [--readings N] [--modes live,backlog] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import e2e
from tests.harness import cpu_seconds

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class _GatewayCpu:
    """Samples the CPU seconds of every ``python -m gateway run`` process (supervisor and workers)."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-cpu", daemon=True)

    @staticmethod
    def _gateway_pids() -> list[int]:
        import psutil

        pids = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if "gateway" in cmd and "run" in cmd and "-m" in cmd:
                pids.append(p.pid)
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), {pid: cpu_seconds(pid) for pid in self._gateway_pids()}))
            self._stop.wait(self.period_s)

    def __enter__(self) -> _GatewayCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds used by gateway processes between two monotonic times (per-process deltas)."""
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for t, cpu in self.samples:
            if t < t0 or t > t1:
                continue
            for pid, v in cpu.items():
                first.setdefault(pid, v)
                last[pid] = v
        return sum(last[p] - first[p] for p in last)


def _summary(workers: int, results: dict[str, Any], cpu: _GatewayCpu) -> list[dict[str, Any]]:
    out = []
    for r in results["runs"]:
        if "window" not in r:
            out.append({"workers": workers, "mode": r.get("mode"), "error": r.get("error", "no window")})
            continue
        w = r["window"]
        readings = w["readings_per_s"] * w["window_s"]
        gw_cpu = cpu.between(w["t_first"], w["t_last"])
        out.append({
            "workers": workers,
            "mode": r["mode"],
            "readings_per_s": w["readings_per_s"],
            "gateway_cpu_us_per_reading": gw_cpu / readings * 1e6 if readings else None,
            "pg_backends_cpu_us_per_reading": w["pg_backends_cpu_s"] / readings * 1e6 if readings else None,
            "machine_busy_cores": w["machine_busy_cores"],
            "ratio_to_raw_copy": r.get("ratio_to_raw_copy"),
            "zero_loss": r.get("zero_loss"),
        })
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(rows: list[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout  # looked up now: the suite replaces sys.stdout to keep a log
    base = {r["mode"]: r["readings_per_s"] for r in rows if r.get("workers") == 1 and "readings_per_s" in r}
    print(f"{'workers':>7} {'mode':<8} {'readings/s':>11} {'x 1 worker':>10} {'gw CPU us/rd':>12} "
          f"{'PG CPU us/rd':>12} {'busy cores':>10} {'/ raw COPY':>10} {'zero loss':>9}", file=out)
    for r in rows:
        if "error" in r:
            print(f"{r['workers']:>7} {r['mode'] or '?':<8} failed: {r['error']}", file=out)
            continue
        ratio = r["readings_per_s"] / base[r["mode"]] if base.get(r["mode"]) else None
        print(f"{r['workers']:>7} {r['mode']:<8} {r['readings_per_s']:>11,.0f} {_f(ratio, '.2f'):>10} "
              f"{_f(r['gateway_cpu_us_per_reading'], '.1f'):>12} {_f(r['pg_backends_cpu_us_per_reading'], '.1f'):>12} "
              f"{_f(r['machine_busy_cores'], '.2f'):>10} {_f(r['ratio_to_raw_copy'], '.2f'):>10} "
              f"{'yes' if r['zero_loss'] else 'NO':>9}", file=out)


async def run(readings: int, modes: list[str], counts: list[int], fsync: bool = True) -> dict[str, Any]:
    services = e2e.make_services(fsync)
    pg, mq, work = services
    pg.start()
    mq.start()
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        for n in counts:
            for mode in modes:
                print(f"workers: {n} worker(s), {mode} ...", file=sys.stderr)
                # A share group of its own per run: the persistent sessions of an earlier run's
                # workers stay members of their group and would take their share of this load.
                env = {"VITALGATE_WORKERS": str(n), "VITALGATE_MQTT_SHARE_GROUP": f"bench-{n}-{mode}-{uuid.uuid4().hex[:6]}"}
                cfg = e2e.E2EConfig(readings=readings, modes=[mode], raw_repeats=1, bare_subscriber=False, fsync=fsync,
                                    gateway_env=env)
                with _GatewayCpu() as cpu:
                    results = await e2e.run(cfg, services)
                rows += _summary(n, results, cpu)
                raw.append({"workers": n, "mode": mode, "raw_copy": results.get("raw_copy")})
                for r in results["runs"]:  # the next run starts on a fresh database of the same name
                    name = r.get("database") or f"bench_{mode}"
                    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
                        pg.drop_database(name)
    finally:
        e2e.stop_services(pg, mq, work)
    return {"bench": "workers", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "readings": readings, "rows": rows, "raw_copy": raw}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=300_000, help="readings per run (default 300,000)")
    ap.add_argument("--modes", default="live,backlog", help="e2e modes, comma-separated (default live,backlog)")
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    ap.add_argument("--no-fsync", action="store_true", help="run PostgreSQL with fsync off")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",")]
    results = asyncio.run(run(args.readings, args.modes.split(","), counts, fsync=not args.no_fsync))
    print_table(results["rows"])
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-workers.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"Results: {path}", file=sys.stderr)
    ok = all("error" not in r and r["zero_loss"] for r in results["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
