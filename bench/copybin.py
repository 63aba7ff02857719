"""``gateway.sinks.copybin`` against asyncpg's own ``copy_records_to_table``.

Each method writes the same rows into a throwaway TimescaleDB (``tests.harness``), the rows the
sink writes for two workloads, built by the same generators and checks as the gateway:

- **stress**: pulse oximeters, 5 numerics x (spo2, pulse_rate) per envelope, no waveforms;
  one batch of the size the writer commits flat out (``--stress-envelopes``).
- **icu**: patient monitors, one numeric set and the ECG/pleth/respiration blocks per
  envelope; one batch of ``--icu-envelopes`` envelopes (about 3,000 beds' second).

Per table and method: ``encode_cpu_ms`` (Python building the COPY input: copybin's
stream, or asyncpg's record tuples), ``client_cpu_ms`` (this process's CPU for the whole
encode + COPY, which for asyncpg includes its own row encoding), ``wall_ms`` and
``rows_per_s`` (wall, median of ``--repeats``). Each COPY is its own transaction into an
empty clone of the table; the two results are compared row for row once.

``readings`` are measured the way the sink writes them now (asyncpg, ``copybin.reading_records``);
the numpy-built binary stream they were compared with lost and was removed: run
``git checkout e7893be && python -m bench.copybin`` to measure it again.

    python -m bench.copybin [--repeats 7] [--stress-envelopes 2000] [--icu-envelopes 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from bench.beds import icu_fleet_config
from bench.fleet import FleetConfig, _Worker
from bench.rawcopy import clone_hypertable
from gateway.checks import CheckSettings, run_checks
from gateway.checks.state import CheckState
from gateway.decode import decode, to_columns
from gateway.profiles import load_profiles
from gateway.sinks import copybin
from gateway.sinks.schema import migrate

__all__ = ["Rows", "build_rows", "measure"]

REPO = Path(__file__).resolve().parent.parent
_READINGS = ["time", "device_id", "metric", "value", "flags", "ingest_id"]
_WAVEFORMS = ["time", "device_id", "metric", "hz", "samples", "flags", "ingest_id"]


class Rows:
    """One batch's checked columns, as the sink receives them (ingest id = envelope index + 1)."""

    def __init__(self, name: str, fleet: FleetConfig, envelopes: int) -> None:
        self.name = name
        profiles = load_profiles(fleet.profiles_dir)
        (pname,) = fleet.mix
        worker = _Worker(0, fleet, {pname: list(range(fleet.devices))}, {}, None)
        items, received = [], []
        start = int(time.time() * 1000) - 60_000
        while len(items) < envelopes:
            for _, _, payload, enc, *_ in worker.window_messages(start):
                ctype = "application/json" if enc == "json" else "application/msgpack"
                items.append(decode(payload, content_type=ctype, profiles=profiles))
                received.append(start)
            start += int(fleet.interval_s * 1000)
        items, received = items[:envelopes], received[:envelopes]
        self.envelopes = len(items)
        self.num, self.wav = to_columns(items, received)
        self.num_flags, self.wav_flags = run_checks(self.num, self.wav, profiles, CheckState(), CheckSettings())
        self.num_ingest = self.num.env.astype(np.int64) + 1
        self.wav_ingest = self.wav.env.astype(np.int64) + 1
        self.devices = [d.envelope.device_id for d in items]


def build_rows(stress_envelopes: int, icu_envelopes: int) -> list[Rows]:
    stress = FleetConfig(
        url="mqtt://127.0.0.1:1", profiles_dir=str(REPO / "device_profiles"), devices=max(1, stress_envelopes // 3),
        mix={"pulse_oximeter": 1.0}, processes=1, interval_s=5.0, flat_out=True, envelopes=stress_envelopes,
        encoding="mixed", numerics_per_envelope=5, metrics=["spo2", "pulse_rate"], waveforms=False, artifacts=True,
        seed=7,
    )
    icu = icu_fleet_config("mqtt://127.0.0.1:1", icu_envelopes, processes=1)
    return [Rows("stress", stress, stress_envelopes), Rows("icu", icu, icu_envelopes)]


# -- the two ways to produce a COPY ------------------------------------------------------

def copybin_waveforms(r: Rows) -> bytes:
    w = r.wav
    return copybin.encode_waveform_rows(w.t0, w.device, w.metric, w.hz, w.samples, w.offsets, r.wav_flags, r.wav_ingest)


def records_readings(r: Rows) -> list[tuple[Any, ...]]:
    """What ``TimescaleSink._copy_readings`` hands to ``copy_records_to_table``."""
    n = r.num
    return list(copybin.reading_records(n.t, n.device, n.metric, n.value, r.num_flags, r.num_ingest))


def records_waveforms(r: Rows) -> list[tuple[Any, ...]]:
    w = r.wav
    offs = w.offsets.tolist()
    samples = w.samples
    blocks = [samples[offs[i]:offs[i + 1]].tolist() for i in range(len(w))]
    us = ((np.asarray(w.t0, dtype=np.int64) - copybin.PG_EPOCH_MS) * 1000).tolist()
    return list(zip(us, w.device.tolist(), w.metric.tolist(), w.hz.tolist(), blocks, r.wav_flags.tolist(),
                    r.wav_ingest.tolist()))


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data


async def _one(conn: asyncpg.Connection, method: str, table: str, r: Rows) -> dict[str, float]:
    enc: Callable[[Rows], Any]
    readings = table == "readings"
    cols = _READINGS if readings else _WAVEFORMS
    dst = f"{table}_copy"
    await conn.execute(f"TRUNCATE {dst}")
    c0, w0 = time.process_time(), time.perf_counter()
    if method == "copybin":
        data = copybin_waveforms(r)
        c1 = time.process_time()
        async with conn.transaction():
            await conn.copy_to_table(dst, source=_once(data), columns=cols, format="binary")
    else:
        enc = records_readings if readings else records_waveforms
        records = enc(r)
        c1 = time.process_time()
        async with conn.transaction():
            await conn.copy_records_to_table(dst, records=records, columns=cols)
    c2, w2 = time.process_time(), time.perf_counter()
    return {"encode_cpu_ms": (c1 - c0) * 1e3, "client_cpu_ms": (c2 - c0) * 1e3, "wall_ms": (w2 - w0) * 1e3}


async def measure(dsn: str, batches: list[Rows], repeats: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.set_type_codec(**copybin.TIMESTAMPTZ_AS_US)
        for table in ("readings", "waveform_blocks"):
            await clone_hypertable(conn, table, f"{table}_copy")
        out = []
        for r in batches:
            for table, n in (("readings", len(r.num)), ("waveform_blocks", len(r.wav))):
                if n == 0:
                    continue
                methods = ("asyncpg",) if table == "readings" else ("copybin", "asyncpg")
                for method in methods:
                    runs = [await _one(conn, method, table, r) for _ in range(repeats)]
                    await conn.execute(f"DROP TABLE IF EXISTS {table}_{method}; "
                                       f"CREATE TEMP TABLE {table}_{method} AS TABLE {table}_copy")
                    med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                    out.append({"batch": r.name, "table": table, "method": method, "rows": n, **med,
                                "rows_per_s": n / med["wall_ms"] * 1e3})
                if len(methods) == 1:
                    continue
                diff = await conn.fetchval(
                    f"SELECT count(*) FROM ((TABLE {table}_copybin EXCEPT ALL TABLE {table}_asyncpg) UNION ALL "
                    f"(TABLE {table}_asyncpg EXCEPT ALL TABLE {table}_copybin)) d")
                if diff:
                    raise RuntimeError(f"{r.name}/{table}: the two methods stored {diff} different rows")
        return out
    finally:
        await conn.close()


def print_table(results: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    head = f"{'batch':<7} {'table':<16} {'method':<8} {'rows':>7} {'encode CPU ms':>13} {'client CPU ms':>13} " \
           f"{'wall ms':>8} {'rows/s':>10}"
    print(head, file=out)
    for x in results:
        print(f"{x['batch']:<7} {x['table']:<16} {x['method']:<8} {x['rows']:>7} {x['encode_cpu_ms']:>13.1f} "
              f"{x['client_cpu_ms']:>13.1f} {x['wall_ms']:>8.1f} {x['rows_per_s']:>10,.0f}", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.copybin", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="COPYs per method, table and batch (median reported)")
    ap.add_argument("--stress-envelopes", type=int, default=2000, help="envelopes in the stress batch (10 readings each)")
    ap.add_argument("--icu-envelopes", type=int, default=500, help="envelopes in the ICU batch")
    ap.add_argument("--dsn", help="an existing database instead of a throwaway cluster")
    args = ap.parse_args(argv)
    batches = build_rows(args.stress_envelopes, args.icu_envelopes)
    if args.dsn:
        results = asyncio.run(measure(args.dsn, batches, args.repeats))
    else:
        from tests.harness import PostgresCluster

        pg = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-copybin-")))
        try:
            pg.start()
            results = asyncio.run(measure(pg.create_database("copybin"), batches, args.repeats))
        finally:
            pg.cleanup()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
