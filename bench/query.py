"""Trend reads and the rollups' write cost, on a throwaway PostgreSQL + TimescaleDB.

Runs with fsync off (a throwaway database; see ``run``).

1. The stress load's rows (10,000 devices, spo2 and pulse_rate, batches of 20,000 readings)
   are written as the sink writes them (``copy_records_to_table`` into ``readings``, then
   ``gateway.sinks.rollups.write_rollups``), each batch one transaction, alternately without
   and with the rollups. The ratio of the best rates is the rollups' cost on the stress rate.
2. 30 days of 1 Hz numerics for one device and 5 metrics (13 M readings) are generated in
   the database (``generate_series``, two connections), beside the stress rows; their
   rollups are one ``INSERT ... SELECT ... GROUP BY`` over them, so they equal the readings.
3. The 30-day series of one metric is read as the API reads it (``ReadStore.buckets``,
   the same SQL, then the answer built and encoded as the route does) in 1-minute and
   1-hour buckets, 30 times each: p50 and p95.

    python -m bench.query [--days 30] [--repeat 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from itertools import starmap
from pathlib import Path

import asyncpg
import msgspec
import numpy as np

from gateway.api.types import Bucket, ReadingsResponse
from gateway.query.store import ReadStore
from gateway.sinks import copybin
from gateway.sinks.rollups import prepare_connection, write_rollups
from gateway.sinks.schema import migrate

_COLUMNS = ["time", "device_id", "metric", "value", "flags", "ingest_id"]
METRICS = ["spo2", "pulse_rate", "perfusion_index", "resp_rate", "temperature"]
TARGETS = {"series_1m_p95_ms": 100, "series_1h_p95_ms": 50, "rollup_cost": 0.10}


def stress_batches(n_batches: int, t0: int) -> list[tuple[np.ndarray, ...]]:
    """The e2e stress load's shape: envelopes of 5 timestamps x (spo2, pulse_rate), 10,000 devices."""
    rng = np.random.default_rng(1)
    out = []
    for b in range(n_batches):
        env = np.arange(2000) + b * 2000
        dev = np.array([f"po-{(e % 10_000):05d}" for e in env], dtype=object)
        rep = np.repeat(np.arange(2000), 10)
        t = t0 + (env[rep] // 10_000) * 5000 + np.tile(np.repeat(np.arange(5), 2), 2000) * 1000
        metric = np.tile(np.array(["spo2", "pulse_rate"], dtype=object), 10_000)
        out.append((dev[rep], metric, t.astype(np.int64), rng.uniform(60, 100, 20_000)))
    return out


async def write_rate(conn: asyncpg.Connection, batches, rollups: bool) -> float:
    """Readings per second, written as the sink writes them (``TimescaleSink._copy_readings``)."""
    await conn.execute("TRUNCATE readings, readings_1m")
    flags = np.zeros(20_000, dtype=np.int32)
    ingest = np.ones(20_000, dtype=np.int64)
    start = time.perf_counter()
    for dev, met, t, val in batches:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "readings", records=copybin.reading_records(t, dev, met, val, flags, ingest), columns=_COLUMNS)
            if rollups:
                await write_rollups(conn, dev, met, t, val, flags)
    return sum(len(b[2]) for b in batches) / (time.perf_counter() - start)


_MONTH = """
INSERT INTO readings (time, device_id, metric, value, flags, ingest_id)
SELECT timestamptz 'epoch' + ms * interval '1 millisecond', $3, m.name,
       floor(800 + 100 * sin(ms / 3.6e6 + m.k) + 10 * (ms / 1000 % 7)) / 10, 0, 1
FROM generate_series($1::bigint, $2::bigint - 1000, 1000) AS ms,
     unnest($4::text[]) WITH ORDINALITY AS m(name, k)
"""
_MONTH_ROLLUPS = """
INSERT INTO readings_1m (device_id, metric, bucket, min, max, sum, count)
SELECT device_id, metric, time_bucket(interval '1 minute', time), min(value), max(value), sum(value), count(*)
FROM readings WHERE device_id = $1 GROUP BY 1, 2, 3
"""


async def load_month(dsn: str, days: int, t0: int, device: str = "bed-001") -> int:
    """One device, 5 metrics at 1 Hz, generated in the database a day per statement on two
    connections (the machine's two cores); then their rollups from the rows themselves.

    The indexes of ``readings`` are dropped for the load and built again after it, with the
    schema's own definitions: row by row, index upkeep made the load take 317 s of a 366 s
    run on the shared machine (load average 7).
    """
    conn = await asyncpg.connect(dsn)
    try:
        indexes = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'readings'"
                                   " AND schemaname = current_schema()")
        for r in indexes:
            await conn.execute(f'DROP INDEX "{r["indexname"]}"')

        async def days_of(parity: int) -> None:
            c = await asyncpg.connect(dsn)
            try:
                for day in range(parity, days, 2):
                    lo = t0 + day * 86_400_000
                    await c.execute(_MONTH, lo, lo + 86_400_000, device, METRICS)
            finally:
                await c.close()

        await asyncio.gather(days_of(0), days_of(1))
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for r in indexes:
            await conn.execute(r["indexdef"])
        await conn.execute(_MONTH_ROLLUPS, device)
        return await conn.fetchval("SELECT sum(count)::bigint FROM readings_1m WHERE device_id = $1", device)
    finally:
        await conn.close()


async def read_p95(store: ReadStore, t0: int, days: int, bucket_ms: int, repeat: int) -> dict[str, float]:
    """The route's work without HTTP: the read, the answer built from the rows, encoded once."""
    enc = msgspec.json.Encoder()
    wins = [("bed-001", t0, t0 + days * 86_400_000)]
    times, n = [], 0
    for _ in range(repeat + 2):
        start = time.perf_counter()
        p = await store.buckets(wins, metric="spo2", bucket_ms=bucket_ms, flags="include", limit=100_000, cursor=None)
        body = enc.encode(ReadingsResponse(next_cursor=None, buckets=list(starmap(Bucket, p.rows))))
        times.append(time.perf_counter() - start)
        n = len(p.rows)
        assert p.next_key is None and body
    times = times[2:]  # the first two warm the cache and the prepared statement
    return {"buckets": n, "p50_ms": round(1000 * statistics.median(times), 1),
            "p95_ms": round(1000 * sorted(times)[int(0.95 * (len(times) - 1))], 1)}


async def run(days: int, repeat: int, stress_batches_n: int) -> dict:
    from tests.harness import PostgresCluster

    work = Path(tempfile.mkdtemp(prefix="vitalgate-bench-query-"))
    # fsync off: a throwaway database, and loading 13 M rows with fsync on is disk-bound here;
    # both write rates of step 1 run under the same setting. Autovacuum off: after the load it
    # worked through the month's 720 fresh chunks during the reads, on the same two cores
    # (the rollups are vacuumed and analyzed explicitly instead).
    pg = PostgresCluster(work / "pg", settings={"fsync": False, "full_page_writes": False, "max_wal_size": "4GB",
                                                "synchronous_commit": "off", "autovacuum": False})
    pg.start()
    started = time.perf_counter()
    try:
        dsn = pg.create_database("bench_query")
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.set_type_codec(**copybin.TIMESTAMPTZ_AS_US)  # as the sink's connections
        await prepare_connection(conn)
        now = int(time.time()) * 1000
        batches = stress_batches(stress_batches_n, now - 3_600_000)
        plain, rolled = [], []
        for _ in range(3):  # alternate, so drift on the shared machine hits both alike
            plain.append(await write_rate(conn, batches, rollups=False))
            rolled.append(await write_rate(conn, batches, rollups=True))
        await conn.close()
        t0 = (now - days * 86_400_000) // 86_400_000 * 86_400_000
        start = time.perf_counter()
        month = await load_month(dsn, days, t0)
        load_s = time.perf_counter() - start
        conn = await asyncpg.connect(dsn)
        await conn.execute("VACUUM ANALYZE readings_1m")
        await conn.close()
        store = await ReadStore.connect(dsn, gateway_id="bench")
        try:
            one_min = await read_p95(store, t0, days, 60_000, repeat)
            one_hour = await read_p95(store, t0, days, 3_600_000, repeat)
        finally:
            await store.close()
        return {
            "stress_copy_readings_per_s": round(max(plain)), "stress_copy_with_rollups_readings_per_s": round(max(rolled)),
            "rollup_cost": round(1 - max(rolled) / max(plain), 3),
            "month_readings": month, "month_load_s": round(load_s, 1),
            "series_1m": one_min, "series_1h": one_hour,
            "load_average_1m": round(os.getloadavg()[0], 1), "total_s": round(time.perf_counter() - started, 1),
        }
    finally:
        pg.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--stress-batches", type=int, default=15, help="batches of 20,000 stress readings")
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.days, args.repeat, args.stress_batches))
    json.dump(res, sys.stdout, indent=2)
    print()
    figures = {"series_1m_p95_ms": res["series_1m"]["p95_ms"], "series_1h_p95_ms": res["series_1h"]["p95_ms"],
               "rollup_cost": res["rollup_cost"]}
    ok = True
    for name, value in figures.items():
        met = value <= TARGETS[name] if name == "rollup_cost" else value < TARGETS[name]
        ok &= met
        bound = "<=" if name == "rollup_cost" else "<"
        print(f"{name}: {value} (target {bound} {TARGETS[name]}): {'met' if met else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
