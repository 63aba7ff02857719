"""``make bench``: the standard suite.

1. ``bench.e2e`` (live and backlog modes, 300,000 readings each, raw COPY ceiling), its
   JSON written to ``bench/results/<timestamp>-e2e.json`` and its table printed;
2. ``bench.bench_checks``, if that module exists, run as a subprocess; its output is
   shown and saved to ``bench/results/<timestamp>-checks.log``.

Exit code 0 when every part succeeded (the e2e bench lost nothing and the gateway
exited 0; the checks bench exited 0). Arguments are passed to ``bench.e2e`` (see
``python -m bench.e2e --help``), e.g. ``python -m bench.run --readings 1000000``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from bench import e2e
from bench.common import REPO

CHECKS_MODULE = REPO / "bench" / "bench_checks.py"
CHECKS_TIMEOUT_S = 300.0


def run_checks_bench(stamp: str) -> int | None:
    """Run bench/bench_checks.py if present; return its exit code (None if absent)."""
    if not CHECKS_MODULE.exists():
        print("\nchecks bench: bench/bench_checks.py not present, skipped.")
        return None
    print("\n=== checks bench (python -m bench.bench_checks) ===", flush=True)
    log_path = e2e.RESULTS_DIR / f"{stamp}-checks.log"
    e2e.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.bench_checks"], cwd=REPO, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            print(f"checks bench could not start: {exc}")
            return 1
        assert proc.stdout is not None
        for line in proc.stdout:  # show it live and keep it
            sys.stdout.write(line)
            log.write(line)
            if time.monotonic() - t0 > CHECKS_TIMEOUT_S:
                proc.kill()
                print(f"checks bench killed after {CHECKS_TIMEOUT_S:.0f} s")
                break
        code = proc.wait()
    print(f"checks bench exited with code {code} after {time.monotonic() - t0:.0f} s; output: "
          f"{os.path.relpath(log_path, Path.cwd())}")
    return code


def main(argv: list[str] | None = None) -> int:
    cfg = e2e._args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    print("=== end-to-end bench (python -m bench.e2e) ===", flush=True)
    results = asyncio.run(e2e.run(cfg))
    path = e2e.write_results(results)
    e2e.print_table(results)
    print(f"\nresults: {os.path.relpath(path, Path.cwd())}", flush=True)
    e2e_ok = e2e.ok(results)
    checks = run_checks_bench(stamp)
    print(f"\nbench suite finished in {time.monotonic() - t0:.0f} s: e2e {'ok' if e2e_ok else 'FAILED'}"
          + ("" if checks is None else f", checks {'ok' if checks == 0 else 'FAILED'}"))
    return 0 if e2e_ok and checks in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
