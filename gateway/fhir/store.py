"""SQL of the FHIR facade and export: Observations' rows in order, by id, and what Device and
Provenance need. Reads the views ``readings_all`` and ``waveform_blocks_all``, so rows kept
by a legal hold stay visible after retention moved them.

Rows are read through a server-side cursor, in the order of the Observations they make
(``mapping.group``): by key ``(time, device, group, ingest)``, ascending or descending, then
by metric, value and flags within a key, so the Observations of one key, and their ordinals,
are the same whichever way a search runs and wherever a page starts. A caller takes what
it needs and stops: a page of 100 costs about 100 Observations' rows, however long the
window, and an export holds one Observation at a time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import asyncpg

from .mapping import BP, ObsKey, Row, group

__all__ = ["Search", "stream", "rows_at", "ingest", "device_record"]

Windows = Sequence[tuple[str, int, int]]


def _e(x: str) -> str:
    return f"(timestamptz 'epoch' + {x} * interval '1 millisecond')"


def _ms(x: str) -> str:
    return f"(extract(epoch FROM {x}) * 1000)::bigint"


_X = f"""
x AS (
    SELECT r.time, r.device_id, CASE WHEN r.metric = ANY($5::text[]) THEN '{BP}' ELSE r.metric END AS g,
           r.ingest_id, r.metric, r.value, NULL::double precision AS hz, NULL::real[] AS samples, r.flags
    FROM w JOIN readings_all r ON r.device_id = w.d AND r.time >= {_e('w.lo')} AND r.time < {_e('w.hi')}
    WHERE $4::text[] IS NULL OR r.metric = ANY($4::text[])
  UNION ALL
    SELECT b.time, b.device_id, b.metric, b.ingest_id, b.metric, NULL, b.hz, b.samples, b.flags
    FROM w JOIN waveform_blocks_all b ON b.device_id = w.d AND b.time >= {_e('w.lo')} AND b.time < {_e('w.hi')}
    WHERE $4::text[] IS NULL OR b.metric = ANY($4::text[])
)"""

_SELECT = f"""
SELECT {_ms('x.time')} AS t, x.device_id, x.g, x.ingest_id, x.metric, x.value, x.hz, x.samples, x.flags,
       coalesce(i.profile, dv.profile) AS profile
FROM x LEFT JOIN ingests i ON i.id = x.ingest_id LEFT JOIN devices dv ON dv.device_id = x.device_id"""


def _search_sql(desc: bool) -> str:
    d, cmp = (" DESC", "<=") if desc else ("", ">=")
    return f"""
WITH w AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS w(d, lo, hi)),
{_X}
{_SELECT}
WHERE $6::bigint IS NULL
   OR (x.time, x.device_id, x.g, x.ingest_id) {cmp} ({_e('$6::bigint')}, $7::text, $8::text, $9::bigint)
ORDER BY x.time{d}, x.device_id{d}, x.g{d}, x.ingest_id{d}, x.metric, x.value, x.flags, x.hz, x.samples
"""


_SQL = {False: _search_sql(False), True: _search_sql(True)}

# One ingest and one instant: the rows an Observation id can name. The ingest's device narrows
# the scan to the device's index; without the ingest (removed by retention) the time alone does.
_AT = f"""
WITH w AS (SELECT (SELECT device_id FROM ingests WHERE id = $2) AS d),
x AS (
    SELECT r.time, r.device_id, CASE WHEN r.metric = ANY($3::text[]) THEN '{BP}' ELSE r.metric END AS g,
           r.ingest_id, r.metric, r.value, NULL::double precision AS hz, NULL::real[] AS samples, r.flags
    FROM readings_all r, w WHERE r.time = {_e('$1::bigint')} AND r.ingest_id = $2 AND (w.d IS NULL OR r.device_id = w.d)
  UNION ALL
    SELECT b.time, b.device_id, b.metric, b.ingest_id, b.metric, NULL, b.hz, b.samples, b.flags
    FROM waveform_blocks_all b, w WHERE b.time = {_e('$1::bigint')} AND b.ingest_id = $2 AND (w.d IS NULL OR b.device_id = w.d)
)
{_SELECT}
ORDER BY x.device_id, x.g, x.metric, x.value, x.flags, x.hz, x.samples
"""

_INGEST = f"""
SELECT id, {_ms('received_at')} AS received_at, device_id, source, principal, gateway_id, topic_or_path,
       payload_sha256, profile FROM ingests WHERE id = $1
"""

_DEVICE = """
SELECT device_id, profile, status FROM devices WHERE device_id = $1
UNION ALL
SELECT $1, (SELECT profile FROM ingests WHERE device_id = $1 ORDER BY id DESC LIMIT 1), 'unregistered'
WHERE NOT EXISTS (SELECT FROM devices WHERE device_id = $1)
  AND (EXISTS (SELECT FROM ingests WHERE device_id = $1) OR EXISTS (SELECT FROM associations WHERE device_id = $1))
"""


@dataclass(frozen=True, slots=True)
class Search:
    """What rows a search reads: windows ``(device, lo_ms, hi_ms)``, metric names (None: all)."""

    windows: Windows
    metrics: Sequence[str] | None
    bp_metrics: Sequence[str]
    desc: bool = False


def _row(r: asyncpg.Record) -> Row:
    samples = r["samples"]
    return Row(t=int(r["t"]), device_id=r["device_id"], group=r["g"], ingest_id=int(r["ingest_id"]),
               metric=r["metric"], value=r["value"], hz=r["hz"], samples=None if samples is None else list(samples),
               flags=int(r["flags"]), profile=r["profile"])


async def stream(conn: asyncpg.Connection, search: Search, start: ObsKey | None = None, *, prefetch: int = 500
                 ) -> AsyncIterator[tuple[ObsKey, list[Row]]]:
    """The Observations of ``search`` from ``start`` on (its key included, its first ``start.n``
    Observations left out). Must run inside a transaction (a server-side cursor)."""
    if not search.windows:
        return
    ds, los, his = ([w[i] for w in search.windows] for i in range(3))
    key = (start.t, start.device_id, start.group, start.ingest_id) if start else (None, None, None, None)
    metrics = None if search.metrics is None else list(search.metrics)
    cur = conn.cursor(_SQL[search.desc], ds, los, his, metrics, list(search.bp_metrics), *key, prefetch=prefetch)

    async def rows() -> AsyncIterator[Row]:
        async for r in cur:
            yield _row(r)

    pending: list[Row] = []
    async for r in rows():
        if pending and pending[0].key != r.key:
            for k, part in group(pending):
                if start is None or (k.t, k.device_id, k.group, k.ingest_id) != key or k.n >= start.n:
                    yield k, part
            pending = []
        pending.append(r)
    for k, part in group(pending):
        if start is None or (k.t, k.device_id, k.group, k.ingest_id) != key or k.n >= start.n:
            yield k, part


async def rows_at(conn: asyncpg.Connection, t: int, ingest_id: int, bp_metrics: Sequence[str]) -> list[Row]:
    """Every row of ingest ``ingest_id`` at time ``t``, in ``group`` order per device and group."""
    return [_row(r) for r in await conn.fetch(_AT, t, ingest_id, list(bp_metrics))]


async def ingest(conn: asyncpg.Connection, ingest_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(_INGEST, ingest_id)


async def device_record(conn: asyncpg.Connection, device_id: str) -> asyncpg.Record | None:
    """``(device_id, profile, status)``: registered, or known only from its data or associations."""
    return await conn.fetchrow(_DEVICE, device_id)
