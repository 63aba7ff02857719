"""The storage-read side of the TimescaleDB sink: stored duplicates and restart history.

``known`` answers which (device, payload SHA-256) pairs are already in ``ingests``;
``history`` reads back what the checks and alert rules kept in memory before a restart
(PROTOCOL section 3: ``prev`` and ``ref`` per device and metric, the latest waveform block,
the open alert episodes, with ``runs_ms`` the readings of the threshold rules' runs in
progress); ``recent`` lists the devices that reported within a horizon, so they are taken on
(restored, ``silent`` rules armed) at start or when their partition is taken over. Flag masks in the SQL come from ``gateway.model.Flag``.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from gateway.errors import SinkError
from gateway.model import ARTIFACT_FLAGS, Flag
from gateway.retry import DATABASE_ERRORS, is_retriable
from gateway.sinks import History, OpenEpisode
from gateway.sinks.pooled import connection

__all__ = ["HISTORY_WINDOW", "known", "history", "recent"]

_OUT_OF_ORDER = int(Flag.OUT_OF_ORDER)
# A reading never becomes ``ref`` when it is an artifact or OUT_OF_ORDER (PROTOCOL section 3).
_NOT_REF = ARTIFACT_FLAGS | _OUT_OF_ORDER

_KNOWN = """
SELECT device_id, payload_sha256, id FROM ingests
WHERE (device_id, payload_sha256) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))
"""

# The latest rows per (device, metric). Each pair is one ``ORDER BY time DESC LIMIT 1``
# probe of the (device_id, metric, time DESC) index, which TimescaleDB runs chunk by chunk
# from the newest, stopping at the first row: a few buffer reads per pair. (DISTINCT ON
# (device_id, metric) over the same window reads every row of the window instead: seconds
# per device at 1 reading/s, measured.) The time bound caps the chunks probed for a pair
# with no row: a device silent for longer than the window starts afresh. Among rows of
# equal time, one that is not OUT_OF_ORDER and was stored first is preferred, as the
# checks would have kept it.
HISTORY_WINDOW = "7 days"
_MS = "(extract(epoch FROM time) * 1000)::bigint"
_LATEST_READINGS = f"""
SELECT u.d, u.m, x.t, x.value
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, value FROM readings
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}'
    ORDER BY time DESC, (flags & {_OUT_OF_ORDER}), ingest_id LIMIT 1) AS x
"""
_LATEST_REFS = f"""
SELECT u.d, u.m, x.t, x.value
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, value FROM readings
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}' AND (flags & {_NOT_REF}) = 0
    ORDER BY time DESC, ingest_id LIMIT 1) AS x
"""
_LATEST_BLOCKS = f"""
SELECT u.d, u.m, x.t, x.dur
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, cardinality(samples) * 1000.0 / hz AS dur FROM waveform_blocks
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}'
    ORDER BY time DESC, (flags & {_OUT_OF_ORDER}), ingest_id LIMIT 1) AS x
"""
# The readings that may belong to a threshold rule's run in progress: per pair, those within
# ``runs_ms`` of the pair's latest reading (found as in _LATEST_READINGS), artifacts left out
# as the rules leave them out, in the order they were stored (ingest id, then time).
_RUN_READINGS = f"""
SELECT u.d, u.m, {_MS} AS t, r.value
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(d, m, latest)
JOIN readings r ON r.device_id = u.d AND r.metric = u.m
    AND r.time >= to_timestamp((u.latest - $4::bigint) / 1000.0) AND r.time <= to_timestamp(u.latest / 1000.0)
WHERE (r.flags & {int(ARTIFACT_FLAGS)}) = 0
ORDER BY r.ingest_id, r.time
"""
_OPEN_ALERTS = """
SELECT device_id, rule, metric, priority, (extract(epoch FROM opened_at) * 1000)::bigint AS opened_at, trigger_value
FROM alerts
WHERE device_id = ANY($1::text[]) AND cleared_at IS NULL
ORDER BY opened_at, id
"""

# Every (device, metric) pair with a row within the horizon, then its latest row and the
# profile of the envelope that stored it. The pairs come from a skip scan of the
# (device_id, metric, time DESC) index: each step is one ``> (d, m) ... LIMIT 1`` probe per
# chunk of the horizon, so the cost grows with the pairs, not with the rows (a DISTINCT over
# a day of 1 Hz readings would read every one of them).
_RECENT = """
WITH RECURSIVE pairs(d, m) AS (
    (SELECT device_id, metric FROM {table} WHERE time > $1 ORDER BY device_id, metric LIMIT 1)
    UNION ALL
    SELECT x.device_id, x.metric FROM pairs CROSS JOIN LATERAL (
        SELECT device_id, metric FROM {table}
        WHERE (device_id, metric) > (pairs.d, pairs.m) AND time > $1
        ORDER BY device_id, metric LIMIT 1) AS x
)
SELECT pairs.d, {ms} AS t, i.profile
FROM pairs CROSS JOIN LATERAL (
    SELECT time, ingest_id FROM {table} WHERE device_id = pairs.d AND metric = pairs.m AND time > $1
    ORDER BY time DESC LIMIT 1) AS r
JOIN ingests i ON i.id = r.ingest_id
"""
_RECENT_READINGS = _RECENT.format(table="readings", ms=_MS.replace("time", "r.time"))
_RECENT_BLOCKS = _RECENT.format(table="waveform_blocks", ms=_MS.replace("time", "r.time"))


async def known(pool: asyncpg.Pool, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], int]:
    """The pairs among ``keys`` already in ``ingests``, with their ingest ids."""
    if not keys:
        return {}
    try:
        async with connection(pool) as conn:
            rows = await conn.fetch(_KNOWN, [k[0] for k in keys], [k[1] for k in keys])
    except DATABASE_ERRORS as exc:
        raise SinkError(f"duplicate lookup failed: {exc}", retriable=is_retriable(exc)) from exc
    return {(r[0], bytes(r[1])): r[2] for r in rows}


async def history(
    pool: asyncpg.Pool, devices: list[str], numeric: Sequence[tuple[str, str]], waveform: Sequence[tuple[str, str]],
    *, runs_ms: int = 0,
) -> History:
    """See ``TimescaleSink.history``: one query per kind, for the whole batch."""
    out = History()
    if not devices:
        return out
    try:
        async with connection(pool) as conn:
            num = ref = wav = recent = []
            if numeric:
                nd, nm = [k[0] for k in numeric], [k[1] for k in numeric]
                num = await conn.fetch(_LATEST_READINGS, nd, nm)
                ref = await conn.fetch(_LATEST_REFS, nd, nm)
                if runs_ms > 0 and num:
                    recent = await conn.fetch(_RUN_READINGS, [r[0] for r in num], [r[1] for r in num],
                                              [int(r[2]) for r in num], runs_ms)
            if waveform:
                wav = await conn.fetch(_LATEST_BLOCKS, [k[0] for k in waveform], [k[1] for k in waveform])
            alerts = await conn.fetch(_OPEN_ALERTS, devices)
    except DATABASE_ERRORS as exc:
        raise SinkError(f"history lookup failed: {exc}", retriable=is_retriable(exc)) from exc
    out.numeric = [(r[0], r[1], int(r[2]), float(r[3])) for r in num]
    out.numeric_ref = [(r[0], r[1], int(r[2]), float(r[3])) for r in ref]
    out.waveform = [(r[0], r[1], int(r[2]), float(r[3])) for r in wav]
    out.recent = [(r[0], r[1], int(r[2]), float(r[3])) for r in recent]
    # The latest reading of any kind is the latest of the per-metric latest ones.
    latest = out.latest
    for d, _, t, _ in out.numeric + out.waveform:
        if t > latest.get(d, t - 1):
            latest[d] = t
    out.open_alerts = [
        OpenEpisode(r[0], r[1], r[2], r[3], int(r[4]), None if r[5] is None else float(r[5])) for r in alerts
    ]
    return out


async def recent(pool: asyncpg.Pool, horizon_s: float) -> dict[str, tuple[str, int]]:
    """See ``TimescaleSink.recent``: per device with a reading or waveform block newer than
    ``horizon_s`` seconds, the profile of its latest stored envelope and that reading's time."""
    try:
        async with connection(pool) as conn:
            since = await conn.fetchval("SELECT now() - $1::float8 * interval '1 second'", horizon_s)
            rows = [*await conn.fetch(_RECENT_READINGS, since), *await conn.fetch(_RECENT_BLOCKS, since)]
    except DATABASE_ERRORS as exc:
        raise SinkError(f"recent devices lookup failed: {exc}", retriable=is_retriable(exc)) from exc
    out: dict[str, tuple[str, int]] = {}
    for device, t, profile in rows:
        if device not in out or t > out[device][1]:
            out[device] = (profile, int(t))
    return out
