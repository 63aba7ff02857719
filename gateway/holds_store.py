"""Legal holds as the database sees them: add, release, list.

A hold names one device, or one patient (resolved to devices through ``associations``
when retention runs, see ``gateway.retention``), a window ``[from_time, to_time)``
(``to_time`` ``None``: open-ended) and a reason. Holds are never deleted: a release
records who released it, when and why. Each change is one transaction with its
``audit_log`` row (target ``hold:<id>``). The store validates no arguments: callers pass
subjects, times and reasons they have checked.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import orjson

from gateway.errors import GatewayError

__all__ = ["HOLD_COLUMNS", "HoldRefused", "HoldsStore"]

HOLD_COLUMNS = ("id", "device_id", "patient_ref", "from_time", "to_time", "reason", "created_at", "created_by",
                "released_at", "released_by", "release_reason")

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, correlation_id, detail)
VALUES ($1, $2, $3, 'success', $4, $5::jsonb)
"""


class HoldRefused(GatewayError):
    """The holds' state refuses the change (no such hold, already released); nothing was changed."""


class HoldsStore:
    """The ``legal_holds`` table over one connection, on behalf of ``actor``."""

    def __init__(self, conn: asyncpg.Connection, actor: str) -> None:
        self.conn = conn
        self.actor = actor
        self.correlation_id = uuid.uuid4().hex

    async def _audit(self, action: str, hold_id: int, detail: dict[str, object]) -> None:
        await self.conn.execute(_AUDIT, self.actor, action, f"hold:{hold_id}", self.correlation_id,
                                orjson.dumps(detail, default=str).decode())

    async def add(self, *, device_id: str | None, patient_ref: str | None, from_time: datetime,
                  to_time: datetime | None, reason: str) -> int:
        """Place a hold on ``device_id`` or ``patient_ref`` (exactly one); returns its id."""
        async with self.conn.transaction():
            hold_id = await self.conn.fetchval(
                "INSERT INTO legal_holds (device_id, patient_ref, from_time, to_time, reason, created_by)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                device_id, patient_ref, from_time, to_time, reason, self.actor,
            )
            await self._audit("hold.add", hold_id, {"device_id": device_id, "patient_ref": patient_ref,
                                                     "from": from_time, "to": to_time, "reason": reason})
        return hold_id

    async def release(self, hold_id: int, reason: str) -> asyncpg.Record:
        """Release hold ``hold_id``; ``HoldRefused`` if there is none or it is released already."""
        async with self.conn.transaction():
            row = await self.conn.fetchrow(
                "SELECT released_at, (SELECT count(*) FROM readings_held WHERE hold_id = $1) AS readings,"
                " (SELECT count(*) FROM waveform_blocks_held WHERE hold_id = $1) AS waveform_blocks"
                " FROM legal_holds WHERE id = $1 FOR UPDATE", hold_id)
            if row is None:
                raise HoldRefused(f"no hold {hold_id}")
            if row["released_at"] is not None:
                raise HoldRefused(f"hold {hold_id} was released at {row['released_at'].isoformat()}")
            await self.conn.execute(
                "UPDATE legal_holds SET released_at = now(), released_by = $2, release_reason = $3 WHERE id = $1",
                hold_id, self.actor, reason)
            await self._audit("hold.release", hold_id, {"reason": reason, "held_readings": row["readings"],
                                                         "held_waveform_blocks": row["waveform_blocks"]})
        return row

    async def holds(self, *, include_released: bool = False) -> list[asyncpg.Record]:
        """Active holds (or every hold), oldest first, with the rows each keeps in the held tables."""
        return await self.conn.fetch(
            f"SELECT {', '.join('h.' + c for c in HOLD_COLUMNS)},"
            " (SELECT count(*) FROM readings_held r WHERE r.hold_id = h.id) AS held_readings,"
            " (SELECT count(*) FROM waveform_blocks_held w WHERE w.hold_id = h.id) AS held_waveform_blocks"
            " FROM legal_holds h WHERE $1 OR h.released_at IS NULL ORDER BY h.id",
            include_released,
        )
