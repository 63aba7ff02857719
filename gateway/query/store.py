"""SQL reads of the query API, on a pool of their own so reads never take the writer's connections.

Every read names *windows*: ``(device, lo_ms, hi_ms)`` triples. A device read is one
window; a patient read is one per association of the patient (``associations.windows``),
so each device's readings count only within its own association. Windows travel as
three arrays joined with ``unnest``, one statement per read.

Pagination is by keyset: rows come in a total order and the cursor holds the last
row's key (see ``cursor.py``). Rows of ``readings`` and ``waveform_blocks`` have no
unique key (one envelope may repeat a timestamp), so their cursor also counts how many
rows of the last key were already returned.

Buckets of whole minutes read the rollups (``readings_1m``) for the whole minutes of each
window and the readings only for the partial minutes at its edges, so a bucketed answer
equals the same aggregate over the readings without scanning them.

Readings and waveform blocks are read together with the rows legal holds kept
(``readings_held``, ``waveform_blocks_held``: what the views ``readings_all`` and
``waveform_blocks_all`` union), so held rows stay readable after retention dropped their
chunk. ``readings_1m`` is not under retention, so whole minutes need no held counterpart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from gateway.model import ARTIFACT_FLAGS, Flag

from .cursor import Page, page

__all__ = ["ReadStore", "Windows", "MINUTE_MS", "LATEST_LOOKBACK_MS"]

Windows = Sequence[tuple[str, int, int]]
MINUTE_MS = 60_000
LATEST_LOOKBACK_MS = 7 * 86_400_000  # latest values: readings of the last 7 days (as the checks' history)


def _e(x: str) -> str:
    return f"(timestamptz 'epoch' + {x} * interval '1 millisecond')"


def _ms(x: str) -> str:
    # date_part is float8 arithmetic, exact for millisecond times; extract() computes in numeric,
    # which cost a 43,200-row answer a third more server CPU (61 ms against 42 ms, 2 cores)
    return f"(date_part('epoch', {x}) * 1000)::bigint"


def _where(wins: Windows, first: int, alias: str, column: str) -> tuple[str, list[Any]]:
    """The windows as ``(device = $k AND column in [lo, hi))`` terms joined by OR, parameters from
    ``$first``. Plain comparisons with parameters (not a join on ``unnest``) let TimescaleDB
    exclude chunks and probe the (device_id, metric, time) index per window: with a join, a
    30-day rollup read planned a scan of every chunk and took seconds."""
    terms, args = [], []
    for i, (d, lo, hi) in enumerate(wins):
        k = first + 3 * i
        terms.append(f"({alias}.device_id = ${k} AND {alias}.{column} >= {_e(f'${k + 1}::bigint')}"
                     f" AND {alias}.{column} < {_e(f'${k + 2}::bigint')})")
        args += [d, lo, hi]
    return "(" + (" OR ".join(terms) or "false") + ")", args


def _with_held(table: str, columns: str, where: str) -> str:
    """``table`` and its held rows (the rows of ``<table>_all``), filtered inside each branch.

    Not the view itself: through the view's UNION ALL, TimescaleDB cannot exclude chunks
    while planning, and planning a one-hour read of ``readings`` over 240 hourly chunks took
    80-150 ms instead of 2-3 ms (chunks were still excluded at run time).
    """
    return (f"(SELECT {columns} FROM {table} r WHERE {where}"
            f" UNION ALL SELECT {columns} FROM {table}_held r WHERE {where}) r")


_R_COLUMNS = "r.time, r.device_id, r.metric, r.value, r.flags, r.ingest_id"
_W_COLUMNS = "r.time, r.device_id, r.metric, r.hz, r.samples, r.flags, r.ingest_id"

_RAW_AFTER = f"($2::bigint IS NULL OR (r.time, r.device_id, r.metric, r.ingest_id) >= ({_e('$2::bigint')}, $3, $4, $5))"
_READINGS = f"""
SELECT r.device_id, r.metric, {_ms('r.time')} AS t, r.value, r.flags, r.ingest_id
FROM {_with_held("readings", _R_COLUMNS, "{wins} AND ($1::text IS NULL OR r.metric = $1) AND {flags} AND " + _RAW_AFTER)}
ORDER BY r.time, r.device_id, r.metric, r.ingest_id, r.value, r.flags
LIMIT $6
"""

_FLAGS = {"include": "true", "exclude": "r.flags = 0", "only": "r.flags <> 0"}
_BUCKET_FLAGS = {"include": f"(r.flags & {ARTIFACT_FLAGS}) = 0", "exclude": "r.flags = 0", "only": "r.flags <> 0"}

# Parameters of the bucket reads: $1 metric, $2 bucket width, $3..$5 cursor (t, device, metric), $6 limit.
_METRIC = {True: "r.metric = $1", False: "$1::text IS NULL"}  # a plain equality, so the index serves it
_AFTER = f"($4::text IS NULL OR (t, device_id, metric) > ({_e('$3::bigint')}, $4, $5))"

# Rollups for the whole minutes of each window, readings (with held rows) for the partial
# minutes at its edges, one row per minute. A whole minute lies in one window only
# (a device's windows never overlap), so only edge minutes can meet twice, and the edges'
# GROUP BY merges them: the minutes need no regrouping.
_MINUTES = f"""
minutes AS (
    SELECT r.device_id, r.metric, r.bucket AS t, r.min, r.max, r.sum, r.count
    FROM readings_1m r
    WHERE {{rolled}} AND {{metric}} AND r.bucket >= {_e('$3::bigint')}
  {{edges}}
)"""
# Left out of the statement when no window has a partial minute (the usual whole-minute
# window): planning the view over every chunk of ``readings`` cost more than the read.
_EDGES = f"""UNION ALL
    SELECT r.device_id, r.metric, time_bucket(interval '1 minute', r.time),
           min(r.value), max(r.value), sum(r.value), count(*)
    FROM {_with_held("readings", _R_COLUMNS, "{raw} AND {metric} AND {flags} AND r.time >= " + _e('$3::bigint'))}
    GROUP BY 1, 2, 3"""

# One minute: the minutes as they are, read in the rollups' key order.
_BY_MINUTE = f"""
WITH {_MINUTES}
SELECT device_id, metric, {_ms('t')} AS t, min, max, sum / count AS avg, count
FROM minutes WHERE {_AFTER} AND $2::interval = interval '1 minute'
ORDER BY minutes.t, device_id, metric
LIMIT $6
"""

# Wider whole-minute buckets: the minutes merged per bucket (min of mins, sum of sums, ...).
_BY_ROLLUP = f"""
WITH {_MINUTES},
buckets AS (
    SELECT device_id, metric, time_bucket($2::interval, t) AS t,
           min(min) AS min, max(max) AS max, sum(sum) / sum(count) AS avg, sum(count)::bigint AS count
    FROM minutes GROUP BY 1, 2, 3
)
SELECT device_id, metric, {_ms('t')} AS t, min, max, avg, count
FROM buckets WHERE {_AFTER}
ORDER BY buckets.t, device_id, metric
LIMIT $6
"""

# Other buckets (under a minute, or flags other than include): the readings themselves.
_BY_RAW = f"""
WITH buckets AS (
    SELECT r.device_id, r.metric, time_bucket($2::interval, r.time) AS t,
           min(r.value) AS min, max(r.value) AS max, avg(r.value) AS avg, count(*) AS count
    FROM {_with_held("readings", _R_COLUMNS, "{raw} AND {metric} AND {flags} AND r.time >= " + _e('$3::bigint'))}
    GROUP BY 1, 2, 3
)
SELECT device_id, metric, {_ms('t')} AS t, min, max, avg, count
FROM buckets WHERE {_AFTER}
ORDER BY buckets.t, device_id, metric
LIMIT $6
"""

_WAVEFORMS = f"""
SELECT r.device_id, r.metric, {_ms("r.time")} AS t, r.hz, r.samples, r.flags, r.ingest_id
FROM {_with_held("waveform_blocks", _W_COLUMNS, "{wins} AND ($1::text IS NULL OR r.metric = $1) AND " + _RAW_AFTER)}
ORDER BY r.time, r.device_id, r.metric, r.ingest_id, r.flags, r.hz
LIMIT $6
"""

_ALERTS = f"""
SELECT a.id, a.device_id, a.rule, a.priority, a.metric, {_ms('a.opened_at')} AS opened_at,
       {_ms('a.cleared_at')} AS cleared_at, a.trigger_value
FROM alerts a
WHERE {{wins}} AND ($1::bool IS NOT TRUE OR a.cleared_at IS NULL)
  AND ($2::bigint IS NULL OR (a.opened_at, a.id) < ({_e('$2::bigint')}, $3))
ORDER BY a.opened_at DESC, a.id DESC
LIMIT $4
"""

_LATEST = f"""
SELECT u.d, u.m, x.t, x.value, x.flags
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(d, m, lo, hi)
CROSS JOIN LATERAL (
    SELECT {_ms('time')} AS t, value, flags FROM readings_all
    WHERE device_id = u.d AND metric = u.m AND time >= {_e('u.lo')} AND time < {_e('u.hi')}
    ORDER BY time DESC, (flags & {int(Flag.OUT_OF_ORDER)}), ingest_id DESC LIMIT 1) AS x
ORDER BY u.d, u.m
"""

_DEVICES = """
WITH known AS (
    SELECT device_id, profile, status FROM devices
    UNION ALL
    SELECT DISTINCT a.device_id, NULL, 'unregistered' FROM associations a
    WHERE a.ended_at IS NULL AND NOT EXISTS (SELECT FROM devices d WHERE d.device_id = a.device_id)
)
SELECT k.device_id, k.profile, k.status, a.patient_ref, a.location
FROM known k
LEFT JOIN associations a ON a.device_id = k.device_id
     AND tstzrange(a.started_at, a.ended_at, '[)') @> now()
WHERE ($1::text IS NULL OR starts_with(a.location, $1))
  AND ($2::bool IS NULL OR (a.location IS NULL, coalesce(a.location, ''), k.device_id) > ($2, $3, $4))
ORDER BY a.location IS NULL, coalesce(a.location, ''), k.device_id
LIMIT $5
"""

_OPEN_ALERTS = f"""
SELECT device_id, rule, priority, metric, {_ms('opened_at')} AS opened_at, trigger_value
FROM alerts WHERE device_id = ANY($1::text[]) AND cleared_at IS NULL ORDER BY opened_at, id
"""

_AUDIT_READ = """
INSERT INTO audit_log (actor, action, target, outcome, source_addr, correlation_id, detail)
SELECT $1, $2, $3, 'success', $4, $5, CASE WHEN cardinality($7::text[]) = 0 THEN $6::jsonb
       ELSE $6::jsonb || jsonb_build_object('patients', coalesce(
    (SELECT jsonb_agg(DISTINCT a.patient_ref) FROM associations a
     WHERE a.device_id = ANY($7::text[])
       AND tstzrange(a.started_at, a.ended_at, '[)')
           && tstzrange(timestamptz 'epoch' + $8::bigint * interval '1 millisecond',
                        timestamptz 'epoch' + $9::bigint * interval '1 millisecond', '[)')), '[]'::jsonb)) END
"""


class ReadStore:
    """Reads for the query API and the live stream (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, gateway_id: str, max_size: int = 4, timeout_s: float = 10.0,
                      command_timeout_s: float = 30.0) -> ReadStore:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, timeout=timeout_s,
                                         command_timeout=command_timeout_s,
                                         server_settings={"application_name": f"vitalgate-read:{gateway_id}"})
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def audit_read(self, *, actor: str, action: str, target: str | None, source_addr: str | None,
                         correlation_id: str | None, detail: dict[str, Any], devices: Sequence[str],
                         from_ms: int, to_ms: int) -> None:
        """One ``audit_log`` row for a read of patient data, written before the data is sent;
        ``detail.patients`` lists the patients associated with ``devices`` within the window."""
        await self.pool.execute(_AUDIT_READ, actor, action, target, source_addr, correlation_id,
                                orjson.dumps(detail).decode(), list(devices), from_ms, to_ms)

    async def readings(self, wins: Windows, *, metric: str | None, flags: str, limit: int,
                       cursor: tuple[list[Any], int] | None) -> Page:
        key, skip = cursor if cursor else ([None, None, None, None], 0)
        where, args = _where(wins, 7, "r", "time")
        rows = await self.pool.fetch(_READINGS.format(wins=where, flags=_FLAGS[flags]), metric, *key,
                                     limit + skip + 1, *args)
        return page(rows, key if cursor else None, skip, limit, lambda r: [r[2], r[0], r[1], r[5]])

    async def buckets(self, wins: Windows, *, metric: str | None, bucket_ms: int, flags: str, limit: int,
                      cursor: tuple[list[Any], int] | None) -> Page:
        """Aggregates per bucket; rollups for whole minutes when the bucket is whole minutes and
        ``flags`` is ``include`` (the rollups' own rule), ``readings_all`` otherwise."""
        rolled: list[tuple[str, int, int]] = []
        raw: list[tuple[str, int, int]] = []
        rollups = bucket_ms % MINUTE_MS == 0 and flags == "include"
        if rollups:
            for d, lo, hi in wins:
                full_lo = -(-lo // MINUTE_MS) * MINUTE_MS
                full_hi = hi // MINUTE_MS * MINUTE_MS
                if full_lo >= full_hi:
                    raw.append((d, lo, hi))
                    continue
                rolled.append((d, full_lo, full_hi))
                if lo < full_lo:
                    raw.append((d, lo, full_lo))
                if full_hi < hi:
                    raw.append((d, full_hi, hi))
        else:
            raw = list(wins)
        (ct, cd, cm) = cursor[0] if cursor else (0, None, None)
        rolled_sql, rolled_args = _where(rolled, 7, "r", "bucket")
        raw_sql, raw_args = _where(raw, 7 + len(rolled_args), "r", "time")
        template = (_BY_MINUTE if bucket_ms == MINUTE_MS else _BY_ROLLUP) if rollups else _BY_RAW
        parts = {"raw": raw_sql, "metric": _METRIC[metric is not None], "flags": _BUCKET_FLAGS[flags]}
        sql = template.format(rolled=rolled_sql, edges=_EDGES.format(**parts) if raw else "", **parts)
        rows = await self.pool.fetch(sql, metric, timedelta(milliseconds=bucket_ms), ct, cd, cm, limit + 1,
                                     *rolled_args, *raw_args)
        return page(rows, None, 0, limit, lambda r: [r[2], r[0], r[1]])

    async def waveforms(self, wins: Windows, *, metric: str | None, limit: int,
                        cursor: tuple[list[Any], int] | None) -> Page:
        key, skip = cursor if cursor else ([None, None, None, None], 0)
        where, args = _where(wins, 7, "r", "time")
        rows = await self.pool.fetch(_WAVEFORMS.format(wins=where), metric, *key, limit + skip + 1, *args)
        return page(rows, key if cursor else None, skip, limit, lambda r: [r[2], r[0], r[1], r[6]])

    async def alerts(self, wins: Windows, *, open_only: bool, limit: int,
                     cursor: tuple[list[Any], int] | None) -> Page:
        key = cursor[0] if cursor else [None, None]
        where, args = _where(wins, 5, "a", "opened_at")
        rows = await self.pool.fetch(_ALERTS.format(wins=where), open_only, *key, limit + 1, *args)
        return page(rows, None, 0, limit, lambda r: [r[5], r[0]])

    async def latest(self, pairs: Sequence[tuple[str, str, int, int]]) -> list[asyncpg.Record]:
        """The latest reading of each ``(device, metric, lo_ms, hi_ms)`` within its window."""
        if not pairs:
            return []
        return await self.pool.fetch(_LATEST, *(list(c) for c in zip(*pairs)))

    async def devices(self, *, location: str | None, limit: int, cursor: tuple[list[Any], int] | None
                      ) -> Page:
        key = cursor[0] if cursor else [None, None, None]
        rows = await self.pool.fetch(_DEVICES, location, *key, limit + 1)
        return page(rows, None, 0, limit, lambda r: [r[4] is None, r[4] or "", r[0]])

    async def open_alerts(self, devices: Sequence[str]) -> list[asyncpg.Record]:
        return await self.pool.fetch(_OPEN_ALERTS, list(devices)) if devices else []
