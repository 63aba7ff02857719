"""Device-patient associations over time: the changes (CLI and API) and the windows reads use.

A row of ``associations`` says that ``device_id`` served patient ``patient_ref`` (an ADT
identifier; no other patient data is stored) at ``location`` from ``started_at`` until
``ended_at`` (``NULL``: still open). The database's exclusion constraint keeps one
device's windows from overlapping, so a device has at most one open association; this
module turns that constraint's refusal into a ``AssociationRefused`` naming the conflict.

Each change is one transaction with its ``audit_log`` row (``association.start`` /
``association.end``, target the device) and a ``NOTIFY vitalgate_associations`` that
live streams use to refresh their device filters at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncpg
import orjson

__all__ = [
    "Association",
    "AssociationRefused",
    "NOTIFY_CHANNEL",
    "PATIENT_REF_PATTERN",
    "associate",
    "dissociate",
    "list_associations",
    "windows",
]

NOTIFY_CHANNEL = "vitalgate_associations"
PATIENT_REF_PATTERN = r"^[^\x00-\x1f]{1,128}$"
_PATIENT_RE = re.compile(PATIENT_REF_PATTERN)

_COLUMNS = ("id, device_id, patient_ref, location, (extract(epoch FROM started_at) * 1000)::bigint AS started_at,"
            " (extract(epoch FROM ended_at) * 1000)::bigint AS ended_at")

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, source_addr, correlation_id, detail)
VALUES ($1, $2, $3, 'success', $4, $5, $6::jsonb)
"""


class AssociationRefused(Exception):
    """The change contradicts what is stored (overlap, nothing open, end before start)."""

    def __init__(self, reason: str, *, status: int = 409) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status  # the HTTP status the API answers with


@dataclass(frozen=True, slots=True)
class Association:
    id: int
    device_id: str
    patient_ref: str
    location: str | None
    started_at: int  # epoch ms
    ended_at: int | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> Association:
        return cls(row["id"], row["device_id"], row["patient_ref"], row["location"], int(row["started_at"]),
                   None if row["ended_at"] is None else int(row["ended_at"]))

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "device_id": self.device_id, "patient_ref": self.patient_ref,
                "location": self.location, "started_at": self.started_at, "ended_at": self.ended_at}


def check_patient_ref(value: str, what: str = "patient_ref") -> str:
    if not _PATIENT_RE.match(value):
        raise ValueError(f"{what}: must be 1-128 characters without control characters")
    return value


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _iso(ms: int | None) -> str:
    return "open" if ms is None else _ts(ms).isoformat(timespec="milliseconds")


async def _audit(conn: asyncpg.Connection, actor: str, action: str, a: Association, source_addr: str | None,
                 correlation_id: str | None) -> None:
    await conn.execute(_AUDIT, actor, action, a.device_id, source_addr, correlation_id,
                       orjson.dumps(a.to_dict()).decode())
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, a.device_id)


async def associate(
    conn: asyncpg.Connection, device_id: str, patient_ref: str, location: str | None, at_ms: int, *,
    actor: str, source_addr: str | None = None, correlation_id: str | None = None,
) -> Association:
    """Open an association at ``at_ms``; ``AssociationRefused`` when it overlaps another of the device."""
    async with conn.transaction():
        try:
            async with conn.transaction():  # a savepoint: the refusal is explained from the same transaction
                row = await conn.fetchrow(
                    f"INSERT INTO associations (device_id, patient_ref, location, started_at)"
                    f" VALUES ($1, $2, $3, timestamptz 'epoch' + $4::bigint * interval '1 millisecond')"
                    f" RETURNING {_COLUMNS}", device_id, patient_ref, location, at_ms)
        except asyncpg.ExclusionViolationError:
            other = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM associations WHERE device_id = $1"
                " AND tstzrange(started_at, ended_at, '[)') && tstzrange(timestamptz 'epoch' + $2::bigint * interval '1 millisecond', NULL)"
                " ORDER BY started_at LIMIT 1", device_id, at_ms)
            what = (f"association {other['id']} with patient {other['patient_ref']!r} from "
                    f"{_iso(other['started_at'])} to {_iso(other['ended_at'])}") if other else "another association"
            raise AssociationRefused(f"device_id: {device_id!r} overlaps {what}; end it first") from None
        a = Association.of(row)
        await _audit(conn, actor, "association.start", a, source_addr, correlation_id)
    return a


async def dissociate(
    conn: asyncpg.Connection, device_id: str, at_ms: int, *,
    actor: str, source_addr: str | None = None, correlation_id: str | None = None,
) -> Association:
    """End the device's open association at ``at_ms``; ``AssociationRefused`` when none is open
    (status 404) or ``at_ms`` is not after its start (409)."""
    async with conn.transaction():
        try:
            row = await conn.fetchrow(
                f"UPDATE associations SET ended_at = timestamptz 'epoch' + $2::bigint * interval '1 millisecond'"
                f" WHERE device_id = $1 AND ended_at IS NULL RETURNING {_COLUMNS}", device_id, at_ms)
        except asyncpg.CheckViolationError:
            raise AssociationRefused(f"at: {_iso(at_ms)} is not after the start of {device_id!r}'s open association")\
                from None
        except asyncpg.ExclusionViolationError:  # cannot happen when shortening; kept for a clear message
            raise AssociationRefused(f"at: ending at {_iso(at_ms)} overlaps another association") from None
        if row is None:
            raise AssociationRefused(f"device_id: {device_id!r} has no open association", status=404)
        a = Association.of(row)
        await _audit(conn, actor, "association.end", a, source_addr, correlation_id)
    return a


async def list_associations(conn: asyncpg.Connection, *, device_id: str | None = None,
                            patient_ref: str | None = None) -> list[Association]:
    """Every association of a device or of a patient, oldest first."""
    column, value = ("device_id", device_id) if device_id is not None else ("patient_ref", patient_ref)
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM associations WHERE {column} = $1 ORDER BY started_at, id", value)
    return [Association.of(r) for r in rows]


async def windows(conn: asyncpg.Connection, patient_ref: str, from_ms: int, to_ms: int
                  ) -> list[tuple[str, int, int]]:
    """``(device, lo_ms, hi_ms)``: each device associated with the patient, within its own window
    intersected with ``[from_ms, to_ms)``; empty intersections are left out."""
    out = []
    for a in await list_associations(conn, patient_ref=patient_ref):
        lo = max(from_ms, a.started_at)
        hi = to_ms if a.ended_at is None else min(to_ms, a.ended_at)
        if lo < hi:
            out.append((a.device_id, lo, hi))
    return out
