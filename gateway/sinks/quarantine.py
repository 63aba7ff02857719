"""The quarantine: refused payloads stored in ``rejected`` with their reason.

A payload is kept whole up to ``payload_bytes`` (the configured quarantine size) and
truncated beyond; its SHA-256 and full length are stored either way, so a truncated copy
still identifies the original. Rows are written with one INSERT over ``unnest`` arrays,
inside the batch's transaction: a reject is committed (and its payload acknowledged)
together with the rows of its neighbours or not at all. A payload refused again from the
same origin (source, topic or path, principal), such as an MQTT redelivery or an HTTP retry,
is the same refusal and adds no row (unique index of migration 6).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import asyncpg

from gateway.sinks import Rejected

__all__ = ["clean_text", "rejected_rows", "write_rejected"]

_INSERT_REJECTED = """
INSERT INTO rejected (received_at, source, principal, gateway_id, topic_or_path, device_id,
                      reason, payload_sha256, payload_bytes, payload)
SELECT timestamptz 'epoch' + r * interval '1 millisecond', s, p, $4, tp, d, why, h, pb, pl
FROM unnest($1::bigint[], $2::text[], $3::text[], $5::text[], $6::text[], $7::text[], $8::bytea[],
            $9::int[], $10::bytea[]) AS u(r, s, p, tp, d, why, h, pb, pl)
ON CONFLICT (payload_sha256, source, topic_or_path, (coalesce(principal, ''))) DO NOTHING
"""


def clean_text(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; device-supplied text in reasons is escaped, this is the last guard."""
    return text.replace("\x00", "\\x00") if text else text


def rejected_rows(rejected: Sequence[Rejected], gateway_id: str, payload_bytes: int) -> list[object]:
    """The arguments of the quarantine INSERT: one array per column (``gateway_id`` is a scalar)."""
    return [
        [r.raw.received_at_ms for r in rejected],
        [r.raw.source for r in rejected],
        [r.raw.principal for r in rejected],
        gateway_id,
        [r.raw.topic_or_path for r in rejected],
        [clean_text(r.device_id) for r in rejected],
        [clean_text(r.reason) for r in rejected],
        [hashlib.sha256(r.raw.payload).digest() for r in rejected],
        [len(r.raw.payload) for r in rejected],
        [r.raw.payload[:payload_bytes] for r in rejected],
    ]


async def write_rejected(
    conn: asyncpg.Connection, rejected: Sequence[Rejected], *, gateway_id: str, payload_bytes: int
) -> None:
    """Insert ``rejected`` in the caller's transaction."""
    if rejected:
        await conn.execute(_INSERT_REJECTED, *rejected_rows(rejected, gateway_id, payload_bytes))
