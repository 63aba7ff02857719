"""``make profile``: where the gateway's CPU goes, on the suite's ICU and stress workloads.

Runs, on throwaway services (``bench.e2e.make_services``):

1. **icu**: ``--beds`` ICU beds (``bench.beds.icu_fleet_config``, paced, payloads
   generated before the start) for ``--icu-seconds`` against one gateway;
2. **stress**: the stress scenario's ``--readings`` (``bench.e2e``) published into the
   gateway's persistent session while it is stopped, then drained by a fresh gateway
   (the suite's ``backlog`` mode: the gateway alone, no publisher competing for CPU);

each with ``py-spy record`` attached to the gateway process (sampling, ``--nonblocking``:
the gateway is never paused, so its timing is unchanged but for the sampler's own CPU on a
shared core; idle time is not sampled). For each run it writes under ``bench/results/``:

- ``<stamp>-profile-<label>-<run>.folded``: the collapsed stacks, the input of any flame
  graph tool (``flamegraph.pl``, ``inferno-flamegraph``, or drop it on speedscope.app);
- ``<stamp>-profile-<label>.txt``: per run, the functions sorted by own time (samples in
  the function itself, C code it calls included) and by total time (the function and
  everything under it), and own time summed by package (paho, msgspec via decode, asyncpg,
  gateway modules, ...), each as a share of the busy samples, plus the run's gateway and
  PostgreSQL-backend CPU per envelope from ``/proc`` (with the sampler attached: compare
  ratios, not absolute figures, with unprofiled runs).

``--no-profiler`` runs the same workloads without py-spy (figures only), for before/after
measurements. ``python -m bench.profile --help``. py-spy needs ptrace rights over the
gateway (root, or ``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import beds, e2e
from bench.common import forget_mqtt_session
from bench.fleet import Fleet
from tests.harness import PROFILES, REPO, GatewayProcess

__all__ = ["fold_table", "main"]

RESULTS_DIR = e2e.RESULTS_DIR


def _py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]' (or use --no-profiler)")
    return found


class Spy:
    """``py-spy record`` attached to one process until it exits (or ``stop()``)."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [_py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--function",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)

    def stop(self, timeout: float = 30.0) -> str:
        """Wait for py-spy to write its file (it stops by itself when the process exits)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            out, _ = self.proc.communicate(timeout=timeout)
        return out or ""


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py)`` -> ``func (module path from the package root)``."""
    if " (" not in frame:
        return frame
    func, path = frame.rsplit(" (", 1)
    path = path.rstrip(")")
    for marker in ("site-packages/", "/lib/python3", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _package(frame: str) -> str:
    """The package (or gateway module) a frame belongs to, for the by-package table."""
    path = frame.rsplit(" (", 1)[-1].rstrip(")").split(":", 1)[0]
    if path.startswith("gateway/"):
        return path.removesuffix(".py")
    if "/" in path:
        return path.split("/", 1)[0]
    return path.removesuffix(".py") or "?"


def fold_table(folded: str, top: int = 40) -> dict[str, Any]:
    """Own and total samples per function, and own samples per package, from collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    busy = 0
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        busy += count
        own[frames[-1]] += count
        pkg[_package(frames[-1])] += count
        for f in set(frames):
            total[f] += count
    return {"busy_samples": busy, "own": own.most_common(top), "total": total.most_common(top),
            "packages": pkg.most_common(top)}


def format_table(name: str, table: dict[str, Any], figures: dict[str, Any]) -> str:
    busy = max(1, table["busy_samples"])
    lines = [f"== {name}: {table['busy_samples']:,} busy samples"]
    lines += [f"   {k}: {v}" for k, v in figures.items()]
    for title, key in (("own time by package", "packages"), ("own time by function", "own"),
                       ("total time by function (the function and all it calls)", "total")):
        lines.append(f"\n-- {title}")
        for label, n in table[key]:
            lines.append(f"{100 * n / busy:6.1f}%  {n:7,}  {label}")
    return "\n".join(lines) + "\n"


def _gateway(work: Path, name: str, dsn: str, mq: Any, env: dict[str, str]) -> GatewayProcess:
    return GatewayProcess(
        work / f"gateway-{name}.log", database_url=dsn, mqtt_url=mq.url,
        client_id=f"vitalgate-profile-{name}-{uuid.uuid4().hex[:8]}", gateway_id="bench", profiles_dir=PROFILES,
        env={"VITALGATE_LOG_LEVEL": "INFO", **env},
    )


async def icu_run(a: argparse.Namespace, pg: Any, mq: Any, work: Path, spy_to: Path | None) -> dict[str, Any]:
    """``a.beds`` ICU beds for ``a.icu_seconds`` (the suite's fixed-count run, shorter)."""
    bcfg = beds.BedsConfig(fixed_beds=a.beds, fixed_s=a.icu_seconds, sweep=False, overload=False,
                           max_memory_mib=a.max_memory_mib, gateway_env=a.env)
    dsn = pg.create_database(f"profile_icu_{a.beds}")
    gw = _gateway(work, f"icu{a.beds}", dsn, mq, {"VITALGATE_MAX_MEMORY_MIB": str(a.max_memory_mib), **a.env})
    spy: Spy | None = None

    async def load(conn: asyncpg.Connection) -> dict[str, Any]:
        nonlocal spy
        if spy_to is not None:
            spy = Spy(gw.pid, spy_to, a.rate)
        fcfg = beds.icu_fleet_config(mq.url, a.beds, seconds=a.icu_seconds, processes=2, prefix="icu-prof",
                                     pregenerate=True, waveform_format=a.waveform_format)
        return await beds.LoadRun(f"icu {a.beds} beds", gw, conn, mq, fcfg, bcfg).run()

    r = await beds._with_gateway(gw, dsn, load)
    w = r["window"]
    lat = r["latency"]["reading_to_commit_s"]
    return {"spy_log": spy.stop() if spy else "", "zero_loss": r["zero_loss"], "figures": {
        "beds": a.beds, "waveform format": a.waveform_format, "zero loss": r["zero_loss"], "committed envelopes/s": round(w["envelopes_per_s"] or 0),
        "p99 commit latency s": round(lat["p99"], 3) if lat["p99"] is not None else None,
        "gateway CPU us/envelope": round(w.get("gateway_cpu_us_per_envelope") or 0, 1),
        "PG backends CPU us/envelope": round(w.get("pg_backends_cpu_us_per_envelope") or 0, 1),
        "gateway cores": round(w.get("gateway_cores") or 0, 2)}}


async def stress_run(a: argparse.Namespace, pg: Any, mq: Any, work: Path, spy_to: Path | None) -> dict[str, Any]:
    """The stress scenario drained from the broker by a fresh gateway (``bench.e2e`` backlog mode)."""
    cfg = e2e.E2EConfig(readings=a.readings, gateway_env=a.env, modes=["backlog"])
    dsn = pg.create_database("profile_stress")
    gw = _gateway(work, "stress", dsn, mq, a.env)
    gw.start(120)
    conn = await asyncpg.connect(dsn)
    spy: Spy | None = None
    try:
        sampler = e2e._Sampler(conn, gw, await conn.fetchval("SELECT pg_backend_pid()"), mq.pid, cfg.poll_s)
        if gw.terminate(60) != 0:
            raise RuntimeError(f"gateway did not exit 0 on SIGTERM:\n{gw.log_tail()}")
        fleet = Fleet(e2e._stress_fleet_config(cfg, mq.url, "profile-stress"))
        await asyncio.to_thread(fleet.start)
        if not await asyncio.to_thread(fleet.join, cfg.timeout_s):
            raise TimeoutError("publishers did not finish")
        st = fleet.stats()
        await sampler.sample()
        gw.start(120)
        if spy_to is not None:
            spy = Spy(gw.pid, spy_to, a.rate)
        await sampler.run_until(st.acked, time.monotonic() + cfg.timeout_s, "stress backlog")
        readings = int(await conn.fetchval("SELECT count(*) FROM readings"))
        code = gw.terminate(60)
        if code != 0:
            raise RuntimeError(f"gateway exited with code {code}:\n{gw.log_tail()}")
    finally:
        gw.kill()
        await conn.close()
        try:
            forget_mqtt_session(mq.url, gw.env["VITALGATE_MQTT_CLIENT_ID"])
        except OSError:
            pass
    w = e2e._window(sampler.samples, st.acked)
    n = w["envelopes_in_window"] * e2e.READINGS_PER_ENVELOPE
    zero_loss = readings == st.published_readings
    return {"spy_log": spy.stop() if spy else "", "zero_loss": zero_loss, "figures": {
        "envelopes": st.acked, "zero loss": zero_loss,
        "committed readings/s": round(w["envelopes_per_s"] * e2e.READINGS_PER_ENVELOPE),
        "gateway CPU us/reading": round(1e6 * w["gateway_cpu_s"] / n, 2) if n else None,
        "PG backends CPU us/reading": round(1e6 * w["pg_backends_cpu_s"] / n, 2) if n else None,
        "gateway / PG backends CPU": round(w["gateway_cpu_s"] / w["pg_backends_cpu_s"], 2)
        if w["pg_backends_cpu_s"] else None}}


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="icu,stress", help="comma-separated runs: icu, stress")
    ap.add_argument("--beds", type=int, action="append", help="ICU bed count (repeatable; default 3000)")
    ap.add_argument("--icu-seconds", type=float, default=20.0)
    ap.add_argument("--waveform-format", choices=("numbers", "f32le", "i16le"), default="numbers",
                    help="ICU waveform samples as numbers (PROTOCOL 1) or compact binary (1.1)")
    ap.add_argument("--readings", type=int, default=300_000, help="stress readings (10 per envelope)")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--max-memory-mib", type=int, default=512)
    ap.add_argument("--label", default="run", help="goes into the file names (before, after, ...)")
    ap.add_argument("--top", type=int, default=40, help="rows per table")
    ap.add_argument("--no-profiler", action="store_true", help="the same runs without py-spy: figures only")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra gateway setting for every run (repeatable)")
    a = ap.parse_args(argv)
    a.env = dict(kv.split("=", 1) for kv in a.gateway_env)
    a.beds = a.beds or [3000]
    return a


async def _main(a: argparse.Namespace, stamp: str) -> tuple[list[str], dict[str, Any], bool]:
    parts = {p.strip() for p in a.only.split(",") if p.strip()}
    pg, mq, work = e2e.make_services()
    texts: list[str] = []
    results: dict[str, Any] = {}
    good = True
    try:
        pg.start()
        mq.start()
        runs = [(f"icu{b}", b) for b in a.beds] if "icu" in parts else []
        runs += [("stress", None)] if "stress" in parts else []
        for name, bed_count in runs:
            spy_to = None if a.no_profiler else RESULTS_DIR / f"{stamp}-profile-{a.label}-{name}.folded"
            print(f"profile: {name} ...", file=sys.stderr, flush=True)
            if bed_count is not None:
                r = await icu_run(argparse.Namespace(**{**vars(a), "beds": bed_count}), pg, mq, work, spy_to)
            else:
                r = await stress_run(a, pg, mq, work, spy_to)
            good = good and bool(r["zero_loss"])
            table = fold_table(spy_to.read_text(), a.top) if spy_to is not None and spy_to.exists() else None
            if spy_to is not None and table is None:
                print(f"profile: py-spy wrote nothing:\n{r['spy_log']}", file=sys.stderr)
            results[name] = {"figures": r["figures"], "table": table,
                             "folded": os.path.relpath(spy_to, REPO) if table else None}
            text = format_table(name, table, r["figures"]) if table else \
                f"== {name}\n" + "\n".join(f"   {k}: {v}" for k, v in r["figures"].items()) + "\n"
            print(text, flush=True)
            texts.append(text)
    finally:
        e2e.stop_services(pg, mq, work)
    return texts, results, good


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    texts, results, good = asyncio.run(_main(a, stamp))
    from bench.common import git_revision

    head = f"python -m bench.profile {' '.join(sys.argv[1:] if argv is None else argv)}\ngit {git_revision()}\n\n"
    (RESULTS_DIR / f"{stamp}-profile-{a.label}.txt").write_text(head + "\n".join(texts))
    (RESULTS_DIR / f"{stamp}-profile-{a.label}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: bench/results/{stamp}-profile-{a.label}.txt (.json, .folded)")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
