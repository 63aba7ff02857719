"""The store-and-forward outbox of the HL7 feed (``hl7_outbox``, migration 7): who writes a
row, in which transaction, and how the sender takes and settles them.

- Alarms: ``enqueue_alarms`` runs in the transaction that stores the alert events, after
  the ``alerts`` rows: one statement turns the batch's events of associated devices (the
  association open at the event's time) into rows, one per episode and phase, so an alarm
  message exists exactly when its episode was committed.
- Numerics: ``enqueue_numerics`` is the periodic job. Numerics are not reported one per
  reading but one message per patient and period, so the rows cannot be written with the
  readings; the job reads, in one transaction, each completed period's latest reading (or
  rollup from ``readings_1m``) per associated device and inserts the messages' rows. The
  unique key (patient, period) makes a rerun of a period insert nothing, and the cursor
  ``hl7_feed_cursor`` moves in the same transaction.
- Order: every writer takes the transaction advisory lock ``ORDER_LOCK`` before it inserts
  and holds it to its commit, so rows become visible in id order: a sender that sees row n
  has seen every row below n. Sending by id per patient is then the order of the data.
  The lock is taken only by transactions that carry alert events (rare) and by the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from gateway.model import ARTIFACT_FLAGS, AlertEvent

__all__ = ["ORDER_LOCK", "advance_cursor", "enqueue_alarms", "enqueue_numerics", "fetch_due", "periods_due",
           "settle"]

ORDER_LOCK = 0x76676837  # "vgh7": the transaction lock of outbox writers (commit order = id order)
_MS = "timestamptz 'epoch' + ({}) * interval '1 millisecond'"
_EPOCH_MS = "(extract(epoch FROM {}) * 1000)::bigint"

_ENQUEUE_ALARMS = f"""
INSERT INTO hl7_outbox (kind, patient_ref, location, alert_id, phase, body)
SELECT 'alarm', a.patient_ref, a.location, al.id, ph,
       jsonb_build_object('device_id', u.d, 'rule', u.r, 'metric', u.m, 'priority', u.p, 'value', u.v,
                          'at', u.at, 'opened_at', {_EPOCH_MS.format('al.opened_at')}, 'alert_id', al.id,
                          'phase', ph, 'profile', coalesce(u.pr, dv.profile))
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::float8[], $8::text[])
     WITH ORDINALITY AS u(e, d, r, m, p, at, v, pr, n)
CROSS JOIN LATERAL (SELECT {_MS.format('u.at')} AS ts, CASE u.e WHEN 'open' THEN 'start' ELSE 'end' END AS ph) x
JOIN associations a ON a.device_id = u.d AND a.started_at <= x.ts AND (a.ended_at IS NULL OR x.ts < a.ended_at)
CROSS JOIN LATERAL (SELECT id, opened_at FROM alerts
                     WHERE device_id = u.d AND rule = u.r
                       AND CASE u.e WHEN 'open' THEN opened_at = x.ts ELSE cleared_at = x.ts END
                     ORDER BY id DESC LIMIT 1) al
LEFT JOIN devices dv ON dv.device_id = u.d
ORDER BY u.n
ON CONFLICT (alert_id, phase) WHERE kind = 'alarm' DO NOTHING
"""

# $1 period starts (ms), $2 cadence (ms), $3 artifact flags; the CTE ``vals`` per mode below
_ENQUEUE_NUMERICS = """
WITH per AS (SELECT {p} AS p, {q} AS q FROM unnest($1::bigint[]) AS s(ms)),
assoc AS (
    SELECT per.p, per.q, a.device_id, a.patient_ref, a.location,
           greatest(per.p, a.started_at) AS lo, least(per.q, coalesce(a.ended_at, 'infinity')) AS hi
      FROM per JOIN associations a ON a.started_at < per.q AND coalesce(a.ended_at, 'infinity') > per.p),
vals AS ({vals}),
dev AS (
    SELECT p, q, patient_ref, device_id, min(location) AS location,
           jsonb_object_agg(metric, jsonb_build_array(v, {t_ms})) AS metrics
      FROM vals GROUP BY p, q, patient_ref, device_id)
INSERT INTO hl7_outbox (kind, patient_ref, location, period_start, body)
SELECT 'numerics', d.patient_ref, min(d.location), d.p,
       jsonb_build_object('start', {p_ms}, 'end', {q_ms}, 'devices', jsonb_agg(jsonb_build_object(
           'device_id', d.device_id, 'metrics', d.metrics, 'alerts', al.rules,
           'profile', coalesce(dv.profile, ing.profile)) ORDER BY d.device_id))
  FROM dev d
  LEFT JOIN devices dv ON dv.device_id = d.device_id
  LEFT JOIN LATERAL (SELECT profile FROM ingests i WHERE i.device_id = d.device_id
                      ORDER BY i.id DESC LIMIT 1) ing ON dv.profile IS NULL
  CROSS JOIN LATERAL (SELECT coalesce(jsonb_agg(rule ORDER BY rule), '[]') AS rules FROM alerts
                       WHERE device_id = d.device_id AND opened_at < d.q
                         AND (cleared_at IS NULL OR cleared_at >= d.q)) al
 GROUP BY d.patient_ref, d.p, d.q
 ORDER BY d.p, d.patient_ref
ON CONFLICT (patient_ref, period_start) WHERE kind = 'numerics' DO NOTHING
"""
_LATEST = """
    SELECT DISTINCT ON (s.p, s.device_id, r.metric) s.p, s.q, s.patient_ref, s.location, s.device_id, r.metric,
           r.value AS v, r.time AS t
      FROM assoc s JOIN readings r ON r.device_id = s.device_id AND r.time >= s.lo AND r.time < s.hi
     WHERE r.flags & $3 = 0
     ORDER BY s.p, s.device_id, r.metric, r.time DESC"""
_ROLLUP = """
    SELECT s.p, s.q, s.patient_ref, s.location, s.device_id, r.metric, sum(r.sum) / sum(r.count) AS v, s.q AS t
      FROM assoc s JOIN readings_1m r ON r.device_id = s.device_id AND r.bucket >= s.lo AND r.bucket < s.hi
     WHERE $3::int IS NOT NULL
     GROUP BY s.p, s.q, s.patient_ref, s.location, s.device_id, r.metric"""
_NUMERICS_SQL = {
    mode: _ENQUEUE_NUMERICS.format(
        p=_MS.format("s.ms"), q=_MS.format("s.ms + $2"), vals=vals, t_ms=_EPOCH_MS.format("t"),
        p_ms=_EPOCH_MS.format("d.p"), q_ms=_EPOCH_MS.format("d.q"))
    for mode, vals in (("latest", _LATEST), ("rollup", _ROLLUP))
}

# Due rows in id order, none of a patient whose earlier row waits for a retry (order per patient).
_FETCH_DUE = f"""
SELECT o.id, o.kind, o.patient_ref, o.location, {_EPOCH_MS.format('o.created_at')}, o.body::text, o.attempts
  FROM hl7_outbox o
 WHERE o.status = 'pending' AND o.next_attempt_at <= now()
   AND NOT EXISTS (SELECT FROM hl7_outbox e WHERE e.status = 'pending' AND e.patient_ref = o.patient_ref
                                              AND e.id < o.id AND e.next_attempt_at > now())
 ORDER BY o.id LIMIT $1
"""

# Outcomes: sent (ACK AA/CA), parked (with the reason), or retry after a delay (seconds).
_SETTLE = """
UPDATE hl7_outbox o
   SET status = u.st, attempts = o.attempts + 1, ack_code = u.code, reason = u.why,
       sent_at = CASE WHEN u.st = 'sent' THEN now() END,
       next_attempt_at = CASE WHEN u.st = 'pending' THEN now() + u.delay * interval '1 second'
                              ELSE o.next_attempt_at END
  FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::float8[]) AS u(id, st, code, why, delay)
 WHERE o.id = u.id AND o.status = 'pending'
"""


async def enqueue_alarms(conn: asyncpg.Connection, events: Sequence[AlertEvent]) -> None:
    """Rows for ``events`` of associated devices, inside the caller's transaction (after ``alerts``)."""
    if not events:
        return
    await conn.execute("SELECT pg_advisory_xact_lock($1)", ORDER_LOCK)
    await conn.execute(_ENQUEUE_ALARMS, [e.event for e in events], [e.device_id for e in events],
                       [e.rule for e in events], [e.metric for e in events], [e.priority for e in events],
                       [e.at for e in events], [e.value for e in events], [e.profile for e in events])


def periods_due(now_ms: int, *, cadence_ms: int, delay_ms: int, done_until_ms: int | None, catch_up: int) -> list[int]:
    """Starts of the completed periods not yet reported: ends at or before ``now - delay``, after
    the cursor, at most ``catch_up`` of them (the most recent); the last one only on a first run."""
    end = (now_ms - delay_ms) // cadence_ms * cadence_ms
    first = end - cadence_ms if done_until_ms is None else max(done_until_ms, end - catch_up * cadence_ms)
    return list(range(first, end, cadence_ms))


async def advance_cursor(conn: asyncpg.Connection, until_ms: int) -> None:
    await conn.execute(
        f"INSERT INTO hl7_feed_cursor (feed, done_until) VALUES ('numerics', {_MS.format('$1::bigint')})"
        " ON CONFLICT (feed) DO UPDATE SET done_until = greatest(hl7_feed_cursor.done_until, excluded.done_until)",
        until_ms)


async def enqueue_numerics(conn: asyncpg.Connection, *, now_ms: int, cadence_ms: int, delay_ms: int, mode: str,
                           catch_up: int) -> int:
    """One transaction: the due periods' rows and the cursor; returns the rows inserted."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ORDER_LOCK)
        done = await conn.fetchval(
            f"SELECT {_EPOCH_MS.format('done_until')} FROM hl7_feed_cursor WHERE feed = 'numerics'")
        periods = periods_due(now_ms, cadence_ms=cadence_ms, delay_ms=delay_ms, done_until_ms=done, catch_up=catch_up)
        if not periods:
            return 0
        status = await conn.execute(_NUMERICS_SQL[mode], periods, cadence_ms, ARTIFACT_FLAGS)
        await advance_cursor(conn, periods[-1] + cadence_ms)
    return int(status.rsplit(" ", 1)[-1])


async def fetch_due(conn: asyncpg.Connection, limit: int) -> list[tuple[int, str, str, str | None, int, Any, int]]:
    """``(id, kind, patient_ref, location, created_ms, body, attempts)`` of due rows, in id order."""
    rows = await conn.fetch(_FETCH_DUE, limit)
    return [(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5]), r[6]) for r in rows]


async def settle(conn: asyncpg.Connection, outcomes: Sequence[tuple[int, str, str | None, str | None, float]]) -> None:
    """Record ``(id, status, ack code, reason, retry delay s)`` for each row sent, in one statement."""
    if outcomes:
        await conn.execute(_SETTLE, *(list(col) for col in zip(*outcomes)))
