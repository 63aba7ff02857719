"""Per-minute rollups of numeric readings (``readings_1m``), written with the readings.

TimescaleDB's Apache edition has no continuous aggregates, so the sink keeps the
rollups itself: in the transaction that copies a batch's readings, the rows of the
envelopes stored *now* (new ingest ids) are grouped by (device, metric, minute) with
numpy and merged into ``readings_1m`` with one ``INSERT ... ON CONFLICT DO UPDATE``
(min of mins, max of maxes, sum + sum, count + count). Because only new envelopes add
rows, a redelivered envelope adds nothing, and a late reading merges into its minute:
the rollups stay equal to an aggregate over ``readings`` (minus the artifacts below).

Readings flagged OUT_OF_RANGE, SPIKE or NOT_FINITE are artifacts and are left out, as
they are from alert rules. Rows are sent sorted by (device, metric, minute), so two
transactions merging overlapping minutes lock them in the same order and cannot deadlock.

The groups reach the server through a binary COPY into a temporary staging table (one per
connection, emptied at each commit), not as array parameters of the ``INSERT``: asyncpg
checks every element of an array parameter against ``collections.abc.Iterable`` in
Python, which made the merge 18% of the gateway's CPU on the ICU workload (py-spy,
``python -m bench.profile``: 10 groups x 7 columns per ICU envelope). The staged rows are
all fixed-width (device and metric as indexes into two small name arrays passed with the
merge), so the COPY stream is one numpy structured array; grouping factorizes the names
with a dict instead of sorting strings. On the stress shape (20,000 readings, 4,000
groups per batch) grouping and encoding went from 10.2 ms of CPU per batch (``np.unique``
on strings, a three-key lexsort, then row tuples for ``copy_records_to_table``, whose own
encoding came on top) to 4.9 ms. The rest of the rollups' cost is the merge in the server:
4,000 index probes and row versions per batch.
"""

from __future__ import annotations

import io

import asyncpg
import numpy as np

from gateway.model import ARTIFACT_FLAGS

__all__ = ["aggregate", "write_rollups", "prepare_connection"]

_MINUTE_MS = 60_000

_STAGE = "vitalgate_rollup_stage"
_STAGE_COLUMNS = ["d", "m", "bucket", "min", "max", "sum", "count"]
_CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    d integer, m integer, bucket bigint, min float8, max float8, sum float8, count bigint
) ON COMMIT DELETE ROWS
"""

# $1, $2: the device and metric names the staged d and m index (1-based, as SQL arrays).
# Sorted by name, so two transactions merging overlapping minutes lock them in one order.
_MERGE = f"""
INSERT INTO readings_1m AS r (device_id, metric, bucket, min, max, sum, count)
SELECT ($1::text[])[s.d], ($2::text[])[s.m], timestamptz 'epoch' + s.bucket * interval '1 millisecond',
       s.min, s.max, s.sum, s.count
FROM {_STAGE} s ORDER BY 1, 2, 3
ON CONFLICT (device_id, metric, bucket) DO UPDATE
SET min = least(r.min, excluded.min), max = greatest(r.max, excluded.max),
    sum = r.sum + excluded.sum, count = r.count + excluded.count
"""

# One staged row in PostgreSQL's binary COPY layout: field count, then (length, value) per field.
_ROW = np.dtype([("n", ">i2"), ("ld", ">i4"), ("d", ">i4"), ("lm", ">i4"), ("m", ">i4"), ("lb", ">i4"), ("b", ">i8"),
                 ("l1", ">i4"), ("min", ">f8"), ("l2", ">i4"), ("max", ">f8"), ("l3", ">i4"), ("sum", ">f8"),
                 ("l4", ">i4"), ("count", ">i8")])
_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Create this connection's staging table (call once per new connection)."""
    await conn.execute(_CREATE_STAGE)


def _factorize(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sorted distinct values and each value's index among them."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values.tolist()), dtype=np.int64, count=len(values))
    names = sorted(index)
    rank = np.empty(len(names), dtype=np.int64)
    rank[[index[n] for n in names]] = np.arange(len(names))
    return names, rank[codes]


def _groups(device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray, flags: np.ndarray):  # noqa: ANN202
    keep = (flags & ARTIFACT_FLAGS) == 0
    if not keep.all():
        device, metric, t, value = device[keep], metric[keep], t[keep], value[keep]
    if len(t) == 0:
        return None
    dnames, dc = _factorize(device)
    mnames, mc = _factorize(metric)
    minute = np.asarray(t, dtype=np.int64) // _MINUTE_MS
    m0 = int(minute.min())
    span = int(minute.max()) - m0 + 1
    # one integer key in (device, metric, minute) order: one sort instead of a three-key lexsort
    key = (dc * len(mnames) + mc) * span + (minute - m0)
    order = np.argsort(key, kind="stable")
    k, v = key[order], np.asarray(value, dtype=np.float64)[order]
    new = np.empty(len(k), dtype=bool)
    new[0] = True
    np.not_equal(k[1:], k[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    first = k[starts]
    return (dnames, mnames, first // span // len(mnames), first // span % len(mnames), (first % span + m0) * _MINUTE_MS,
            np.minimum.reduceat(v, starts), np.maximum.reduceat(v, starts), np.add.reduceat(v, starts),
            np.diff(np.append(starts, len(k))))


def aggregate(
    device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray, flags: np.ndarray
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group readings by (device, metric, minute), artifacts left out.

    Returns ``(devices, metrics, bucket_ms, min, max, sum, count)``, one entry per group,
    sorted by device, metric and minute.
    """
    g = _groups(device, metric, t, value, flags)
    if g is None:
        empty = np.empty(0)
        return [], [], empty.astype(np.int64), empty, empty, empty, empty.astype(np.int64)
    dnames, mnames, d, m, bucket, lo, hi, total, count = g
    return ([dnames[i] for i in d.tolist()], [mnames[i] for i in m.tolist()], bucket, lo, hi, total,
            count.astype(np.int64))


async def write_rollups(
    conn: asyncpg.Connection, device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray,
    flags: np.ndarray,
) -> None:
    """Merge the rollups of these (newly stored) readings, inside the caller's transaction."""
    g = _groups(device, metric, t, value, flags)
    if g is None:
        return
    dnames, mnames, d, m, bucket, lo, hi, total, count = g
    rows = np.empty(len(d), dtype=_ROW)
    rows["n"] = 7
    for length, field in ((4, "ld"), (4, "lm"), (8, "lb"), (8, "l1"), (8, "l2"), (8, "l3"), (8, "l4")):
        rows[field] = length
    rows["d"], rows["m"], rows["b"] = d + 1, m + 1, bucket
    rows["min"], rows["max"], rows["sum"], rows["count"] = lo, hi, total, count
    await conn.copy_to_table(_STAGE, source=io.BytesIO(_HEADER + rows.tobytes() + _TRAILER), columns=_STAGE_COLUMNS,
                             format="binary")
    await conn.execute(_MERGE, dnames, mnames)
