"""The database's own ceiling: binary COPY of the gateway's rows into an identical hypertable.

``raw_copy_rate(conn, ...)`` reads the rows the gateway committed to ``readings`` back
into memory, creates a fresh hypertable with the same columns, chunk interval and
indexes (``readings_rawcopy``), and writes the identical rows into it with asyncpg's
``copy_records_to_table`` from one connection, ``rows_per_copy`` rows per COPY, each COPY
its own transaction. The rate is what the gateway would reach if decoding, checks,
provenance (``ingests``), dedupe and MQTT cost nothing: the ratio gateway / raw COPY says
how much of the database's write capacity the gateway turns into stored readings.

Standalone, to measure a database without the gateway (synthesizes rows if ``readings``
is empty)::

    python -m bench.rawcopy --dsn postgresql://postgres@127.0.0.1:5432/vitalgate_demo --rows 300000
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import asyncpg

from tests.harness import cpu_seconds

__all__ = ["clone_hypertable", "read_rows", "copy_rows", "raw_copy_rate"]

_INDEX_RE = re.compile(r"^CREATE (UNIQUE )?INDEX (\S+) ON (\S+) ")


async def clone_hypertable(conn: asyncpg.Connection, src: str = "readings", dst: str = "readings_rawcopy") -> list[str]:
    """(Re)create ``dst`` like ``src``: columns, defaults, chunk interval, indexes. Returns the index DDL used."""
    await conn.execute(f"DROP TABLE IF EXISTS {dst}")
    await conn.execute(f"CREATE TABLE {dst} (LIKE {src} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    interval = await conn.fetchval(
        """SELECT time_interval FROM timescaledb_information.dimensions
           WHERE hypertable_name = $1 AND column_name = 'time'""",
        src,
    )
    if interval is None:
        raise RuntimeError(f"{src} is not a hypertable on time")
    await conn.execute(
        f"SELECT create_hypertable('{dst}', by_range('time', $1::interval), create_default_indexes => FALSE)",
        interval,
    )
    ddl = []
    for (indexdef,) in await conn.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1 ORDER BY indexname", src
    ):
        m = _INDEX_RE.match(indexdef)
        if m is None:
            raise RuntimeError(f"cannot copy index definition {indexdef!r}")
        new = f"CREATE {m.group(1) or ''}INDEX {m.group(2)}_raw ON {dst} " + indexdef[m.end():]
        await conn.execute(new)
        ddl.append(new)
    return ddl


async def columns_of(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        """SELECT column_name FROM information_schema.columns
           WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position""",
        table,
    )
    return [r[0] for r in rows]


async def read_rows(conn: asyncpg.Connection, src: str = "readings") -> tuple[list[str], list[asyncpg.Record]]:
    """All rows of ``src`` in commit order (by ingest, then time), with the column names."""
    cols = await columns_of(conn, src)
    order = "ingest_id, time" if "ingest_id" in cols else "time"
    rows = await conn.fetch(f"SELECT {', '.join(cols)} FROM {src} ORDER BY {order}")
    return cols, rows


async def copy_rows(
    conn: asyncpg.Connection, dst: str, columns: Sequence[str], rows: Sequence[Any], rows_per_copy: int = 5000
) -> dict[str, float]:
    """COPY ``rows`` into ``dst`` in chunks; returns seconds, rows/s and the backend's CPU seconds."""
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    cpu0 = cpu_seconds(backend)
    t0 = time.perf_counter()
    for i in range(0, len(rows), rows_per_copy):
        await conn.copy_records_to_table(dst, records=rows[i : i + rows_per_copy], columns=list(columns))
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(backend) - cpu0
    return {"rows": len(rows), "seconds": seconds, "rows_per_s": len(rows) / seconds if seconds > 0 else 0.0,
            "backend_cpu_s": cpu}


async def raw_copy_rate(
    conn: asyncpg.Connection, *, src: str = "readings", dst: str = "readings_rawcopy", rows_per_copy: int = 5000,
    repeats: int = 3, rows: tuple[list[str], list[Any]] | None = None,
) -> dict[str, Any]:
    """Median of ``repeats`` runs of COPYing ``src``'s rows into a fresh clone ``dst``."""
    cols, data = rows if rows is not None else await read_rows(conn, src)
    if not data:
        raise RuntimeError(f"{src} is empty: nothing to copy")
    runs = []
    ddl: list[str] = []
    for _ in range(repeats):
        ddl = await clone_hypertable(conn, src, dst)
        await conn.execute("CHECKPOINT")  # start each run from the same state of the WAL
        runs.append(await copy_rows(conn, dst, cols, data, rows_per_copy))
        n = await conn.fetchval(f"SELECT count(*) FROM {dst}")
        if n != len(data):
            raise RuntimeError(f"raw COPY stored {n} rows of {len(data)}")
    await conn.execute(f"DROP TABLE IF EXISTS {dst}")
    rates = [r["rows_per_s"] for r in runs]
    median = statistics.median(rates)
    best = runs[rates.index(median)] if median in rates else runs[0]
    return {
        "rows": len(data),
        "rows_per_copy": rows_per_copy,
        "connections": 1,
        "repeats": repeats,
        "rows_per_s": median,
        "rows_per_s_runs": rates,
        "seconds": best["seconds"],
        "backend_cpu_s": best["backend_cpu_s"],
        "indexes": ddl,
    }


async def _synthesize(conn: asyncpg.Connection, n: int) -> None:
    from gateway.sinks.schema import migrate

    await migrate(conn)
    if await conn.fetchval("SELECT count(*) FROM readings") >= n:
        return
    base = datetime.now(timezone.utc) - timedelta(hours=2)
    rows = [
        (base + timedelta(milliseconds=i * 10), f"po-{i % 1000:06d}", "spo2" if i % 2 else "pulse_rate",
         float(90 + i % 10), 0, i // 10 + 1)
        for i in range(n)
    ]
    await conn.copy_records_to_table(
        "readings", records=rows, columns=["time", "device_id", "metric", "value", "flags", "ingest_id"]
    )


async def _main(args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(args.dsn)
    try:
        await _synthesize(conn, args.rows)
        result = await raw_copy_rate(conn, rows_per_copy=args.rows_per_copy, repeats=args.repeats)
    finally:
        await conn.close()
    print(
        f"raw binary COPY: {result['rows']:,} rows, {result['rows_per_copy']:,} rows per COPY, 1 connection: "
        f"{result['rows_per_s']:,.0f} rows/s (runs: {', '.join(f'{r:,.0f}' for r in result['rows_per_s_runs'])}), "
        f"backend CPU {result['backend_cpu_s']:.2f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rawcopy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", required=True, help="database holding a readings hypertable (created if missing)")
    ap.add_argument("--rows", type=int, default=300_000, help="rows to synthesize if readings has fewer")
    ap.add_argument("--rows-per-copy", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    return asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
