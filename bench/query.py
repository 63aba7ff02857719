"""Trend reads and the rollups' write cost, on a throwaway PostgreSQL + TimescaleDB.

Runs with fsync off (a throwaway database; see ``run``).

1. The stress load's rows (10,000 devices, spo2 and pulse_rate, batches of 20,000 readings)
   are written twice in the same run, as the sink writes them: binary COPY into
   ``readings`` alone, then COPY plus the rollup merge (``gateway.sinks.rollups``), each
   batch one transaction. The ratio is the rollups' cost on the stress rate.
2. 30 days of 1 Hz numerics for one device and 5 metrics (13 M readings) are loaded with
   binary COPY, their rollups with them, beside the stress rows.
3. The 30-day series of one metric is read as the API reads it (``ReadStore.buckets``,
   the same SQL, then the response encoded) in 1-minute and 1-hour buckets, 30 times
   each: p50 and p95.

    python -m bench.query [--days 30] [--repeat 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import msgspec
import numpy as np

from gateway.api.types import Bucket, ReadingsResponse
from gateway.query.store import ReadStore
from gateway.sinks import copybin
from gateway.sinks.rollups import write_rollups
from gateway.sinks.schema import migrate

_COLUMNS = ["time", "device_id", "metric", "value", "flags", "ingest_id"]
METRICS = ["spo2", "pulse_rate", "perfusion_index", "resp_rate", "temperature"]


async def _once(data: bytes):  # noqa: ANN202
    yield data


def _encode(device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray) -> bytes:
    duniq, dcodes = np.unique(device, return_inverse=True)
    muniq, mcodes = np.unique(metric, return_inverse=True)
    n = len(t)
    return copybin.encode_rows([
        copybin.timestamptz_ms(t), copybin.text(dcodes, duniq.tolist()), copybin.text(mcodes, muniq.tolist()),
        copybin.fixed(value, ">f8"), copybin.fixed(np.zeros(n, dtype=np.int32), ">i4"),
        copybin.fixed(np.ones(n, dtype=np.int64), ">i8")])


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
    await conn.execute("TRUNCATE readings, readings_1m")
    start = time.perf_counter()
    for dev, met, t, val in batches:
        async with conn.transaction():
            await conn.copy_to_table("readings", source=_once(_encode(dev, met, t, val)), columns=_COLUMNS,
                                     format="binary")
            if rollups:
                await write_rollups(conn, dev, met, t, val, np.zeros(len(t), dtype=np.int32))
    return sum(len(b[2]) for b in batches) / (time.perf_counter() - start)


async def load_month(conn: asyncpg.Connection, days: int, t0: int) -> int:
    """One device, 5 metrics at 1 Hz: a COPY per day and metric, its rollups merged in the same
    transaction (one device, one metric, whole minutes: reshaped instead of grouped)."""
    n = 0
    merge = write_rollups.__globals__["_MERGE"]
    for day in range(days):
        t = t0 + day * 86_400_000 + np.arange(86_400, dtype=np.int64) * 1000
        for k, m in enumerate(METRICS):
            val = np.round(80 + 10 * np.sin(t / 3.6e6 + k) + (t // 1000 % 7), 1)
            data = copybin.encode_rows([
                copybin.timestamptz_ms(t), copybin.text(np.zeros(len(t), dtype=np.int64), ["bed-001"]),
                copybin.text(np.zeros(len(t), dtype=np.int64), [m]), copybin.fixed(val, ">f8"),
                copybin.fixed(np.zeros(len(t), dtype=np.int32), ">i4"), copybin.fixed(np.ones(len(t), dtype=np.int64), ">i8")])
            per = val.reshape(-1, 60)
            async with conn.transaction():
                await conn.copy_to_table("readings", source=_once(data), columns=_COLUMNS, format="binary")
                await conn.execute(merge, ["bed-001"] * len(per), [m] * len(per), t[::60].tolist(),
                                   per.min(axis=1).tolist(), per.max(axis=1).tolist(), per.sum(axis=1).tolist(),
                                   [60] * len(per))
            n += len(t)
    return n


async def read_p95(store: ReadStore, t0: int, days: int, bucket_ms: int, repeat: int) -> dict[str, float]:
    enc = msgspec.json.Encoder()
    wins = [("bed-001", t0, t0 + days * 86_400_000)]
    times, n = [], 0
    for _ in range(repeat + 2):
        start = time.perf_counter()
        p = await store.buckets(wins, metric="spo2", bucket_ms=bucket_ms, flags="include", limit=100_000, cursor=None)
        body = enc.encode(ReadingsResponse(next_cursor=None, buckets=[
            Bucket(device_id=r[0], metric=r[1], t=int(r[2]), min=r[3], max=r[4], avg=r[5], count=r[6]) for r in p.rows]))
        times.append(time.perf_counter() - start)
        n = len(p.rows)
        assert p.next_key is None and body
    times = times[2:]  # the first two warm the cache and the prepared statement
    return {"buckets": n, "p50_ms": round(1000 * statistics.median(times), 1),
            "p95_ms": round(1000 * sorted(times)[int(0.95 * (len(times) - 1))], 1)}


async def run(days: int, repeat: int, stress_batches_n: int) -> dict:
    from tests.harness import PostgresCluster

    work = Path(tempfile.mkdtemp(prefix="vitalgate-bench-query-"))
    # fsync off: a throwaway database, and loading 13 M rows with fsync on is disk-bound here
    # (over 7 minutes on the shared machine); both write rates of step 1 run under the same setting
    pg = PostgresCluster(work / "pg", settings={"fsync": False, "full_page_writes": False, "max_wal_size": "4GB",
                                                "synchronous_commit": "off"})
    pg.start()
    try:
        dsn = pg.create_database("bench_query")
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        now = int(time.time()) * 1000
        batches = stress_batches(stress_batches_n, now - 3_600_000)
        plain, rolled = [], []
        for _ in range(2):  # alternate, so drift on the shared machine hits both alike
            plain.append(await write_rate(conn, batches, rollups=False))
            rolled.append(await write_rate(conn, batches, rollups=True))
        t0 = (now - days * 86_400_000) // 86_400_000 * 86_400_000
        start = time.perf_counter()
        month = await load_month(conn, days, t0)
        load_s = time.perf_counter() - start
        await conn.execute("ANALYZE readings_1m")
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
    ok = res["series_1m"]["p95_ms"] < 100 and res["series_1h"]["p95_ms"] < 50 and res["rollup_cost"] <= 0.10
    print("targets (1m p95 < 100 ms, 1h p95 < 50 ms, rollups <= 10%):", "met" if ok else "NOT met", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
