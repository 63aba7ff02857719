"""Alert episodes and audit events of a batch, written in the batch's transaction.

Each kind is one statement over ``unnest`` arrays, whatever the number of rows. Episodes
that opened in this batch are inserted (closed already, or still active); episodes opened
earlier and closed now are updated. The partial unique index on ``alerts`` keeps one
active episode per (device, rule).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import asyncpg
import orjson

from gateway.model import AlertEvent, AuditEvent
from gateway.sinks.quarantine import clean_text

__all__ = ["write_alerts", "write_audit"]

_INSERT_AUDIT = """
INSERT INTO audit_log (at, actor, action, target, outcome, source_addr, correlation_id, detail)
SELECT timestamptz 'epoch' + a * interval '1 millisecond', ac, act, tg, oc, sa, ci, dt::jsonb
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
     AS u(a, ac, act, tg, oc, sa, ci, dt)
"""

_INSERT_ALERTS = """
INSERT INTO alerts (device_id, rule, metric, priority, opened_at, trigger_value, ingest_id,
                    cleared_at, clear_value, clear_ingest_id)
SELECT d, r, m, p, timestamptz 'epoch' + o * interval '1 millisecond', tv, oi,
       timestamptz 'epoch' + c * interval '1 millisecond', cv, ci
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::float8[], $7::bigint[],
            $8::bigint[], $9::float8[], $10::bigint[]) AS u(d, r, m, p, o, tv, oi, c, cv, ci)
ON CONFLICT (device_id, rule) WHERE cleared_at IS NULL DO NOTHING
"""

_CLOSE_ALERTS = """
UPDATE alerts a SET cleared_at = timestamptz 'epoch' + u.c * interval '1 millisecond', clear_value = u.cv,
                    clear_ingest_id = u.ci
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::float8[], $5::bigint[]) AS u(d, r, c, cv, ci)
WHERE a.device_id = u.d AND a.rule = u.r AND a.cleared_at IS NULL
"""

_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _json(detail: dict[str, object]) -> str:
    r"""``detail`` as JSON text for jsonb, which refuses the escape ``\u0000``: NUL becomes ``\x00``."""
    text = orjson.dumps(detail, default=str).decode()
    return _JSON_NUL.sub(r"\1\\\\x00", text) if "\\u0000" in text else text


async def write_audit(conn: asyncpg.Connection, events: Sequence[AuditEvent]) -> None:
    """Append ``events`` to ``audit_log``; ``detail`` travels as JSON text."""
    if not events:
        return
    await conn.execute(
        _INSERT_AUDIT,
        [e.at_ms for e in events],
        [clean_text(e.actor) for e in events],
        [e.action for e in events],
        [clean_text(e.target) for e in events],
        [e.outcome for e in events],
        [e.source_addr for e in events],
        [clean_text(e.correlation_id) for e in events],
        [None if e.detail is None else _json(e.detail) for e in events],
    )


async def write_alerts(conn: asyncpg.Connection, events: Sequence[AlertEvent], ids: Sequence[int | None]) -> None:
    """Store alert ``events``; ``ids[env]`` is the ingest id of the envelope an event refers to."""

    def ingest_of(env: int | None) -> int | None:
        return ids[env] if env is not None and env < len(ids) else None

    opened: dict[tuple[str, str], list] = {}
    episodes: list[list] = []  # rows for _INSERT_ALERTS, in opening order
    closes: list[tuple[str, str, int, float | None, int | None]] = []
    for ev in events:
        key = (ev.device_id, ev.rule)
        if ev.event == "open":
            row = [ev.device_id, ev.rule, ev.metric, ev.priority, ev.at, ev.value, ingest_of(ev.env), None, None, None]
            opened[key] = row
            episodes.append(row)
        elif key in opened:
            row = opened.pop(key)
            row[7:10] = [ev.at, ev.value, ingest_of(ev.env)]
        else:
            closes.append((ev.device_id, ev.rule, ev.at, ev.value, ingest_of(ev.env)))
    if closes:
        await conn.execute(_CLOSE_ALERTS, *(list(col) for col in zip(*closes)))
    if episodes:
        await conn.execute(_INSERT_ALERTS, *(list(col) for col in zip(*episodes)))
