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
``python -m bench.profile``: 10 groups x 7 columns per ICU envelope); the COPY encodes the
same rows in C.
"""

from __future__ import annotations

import asyncpg
import numpy as np

from gateway.model import ARTIFACT_FLAGS

__all__ = ["aggregate", "write_rollups", "prepare_connection"]

_MINUTE_MS = 60_000

_STAGE = "vitalgate_rollup_in"
_STAGE_COLUMNS = ["device_id", "metric", "bucket", "min", "max", "sum", "count"]
_CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (
    device_id text, metric text, bucket bigint, min float8, max float8, sum float8, count bigint
) ON COMMIT DELETE ROWS
"""

_MERGE = f"""
INSERT INTO readings_1m AS r (device_id, metric, bucket, min, max, sum, count)
SELECT device_id, metric, timestamptz 'epoch' + bucket * interval '1 millisecond', min, max, sum, count
FROM {_STAGE} ORDER BY device_id, metric, bucket
ON CONFLICT (device_id, metric, bucket) DO UPDATE
SET min = least(r.min, excluded.min), max = greatest(r.max, excluded.max),
    sum = r.sum + excluded.sum, count = r.count + excluded.count
"""


async def prepare_connection(conn: asyncpg.Connection) -> None:
    """Create this connection's staging table (call once per new connection)."""
    await conn.execute(_CREATE_STAGE)


def aggregate(
    device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray, flags: np.ndarray
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group readings by (device, metric, minute), artifacts left out.

    Returns ``(devices, metrics, bucket_ms, min, max, sum, count)``, one entry per group,
    sorted by device, metric and minute.
    """
    keep = (flags & ARTIFACT_FLAGS) == 0
    if not keep.all():
        device, metric, t, value = device[keep], metric[keep], t[keep], value[keep]
    if len(t) == 0:
        empty = np.empty(0)
        return [], [], empty.astype(np.int64), empty, empty, empty, empty.astype(np.int64)
    # few distinct devices and metrics per batch: factorize, then sort on integer keys
    dnames, dcodes = np.unique(device.astype(str), return_inverse=True)
    mnames, mcodes = np.unique(metric.astype(str), return_inverse=True)
    minute = t // _MINUTE_MS
    order = np.lexsort((minute, mcodes, dcodes))
    dc, mc, mi, v = dcodes[order], mcodes[order], minute[order], value[order]
    new = np.empty(len(order), dtype=bool)
    new[0] = True
    new[1:] = (dc[1:] != dc[:-1]) | (mc[1:] != mc[:-1]) | (mi[1:] != mi[:-1])
    starts = np.flatnonzero(new)
    lo = np.minimum.reduceat(v, starts)
    hi = np.maximum.reduceat(v, starts)
    total = np.add.reduceat(v, starts)
    count = np.diff(np.append(starts, len(order)))
    return (dnames[dc[starts]].tolist(), mnames[mc[starts]].tolist(), mi[starts] * _MINUTE_MS,
            lo, hi, total, count.astype(np.int64))


async def write_rollups(
    conn: asyncpg.Connection, device: np.ndarray, metric: np.ndarray, t: np.ndarray, value: np.ndarray,
    flags: np.ndarray,
) -> None:
    """Merge the rollups of these (newly stored) readings, inside the caller's transaction."""
    devices, metrics, bucket, lo, hi, total, count = aggregate(device, metric, t, value, flags)
    if devices:
        rows = zip(devices, metrics, bucket.tolist(), lo.tolist(), hi.tolist(), total.tolist(), count.tolist())
        await conn.copy_records_to_table(_STAGE, records=rows, columns=_STAGE_COLUMNS)
        await conn.execute(_MERGE)
