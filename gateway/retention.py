"""Retention: drop what is past its horizon, keep what a legal hold covers.

Owns the plan (``plan``: which chunks and rows are past their horizon, pure), the job
(``run``: carry it out on one connection) and the gateway's schedule (``schedule``).

- ``readings`` and ``waveform_blocks`` (hypertables) lose whole chunks, with
  ``drop_chunks``, once a chunk's range ends at or before ``now - <table>_days``. In the
  transaction that drops a chunk, the rows of that chunk that an active legal hold covers
  are first copied to ``readings_held`` / ``waveform_blocks_held`` (with the hold's id),
  and the chunk is locked against writers, so a row is always in exactly one of the two
  tables (the views ``readings_all`` and ``waveform_blocks_all`` read both).
- ``ingests`` and ``rejected`` are plain tables: rows received before the horizon are
  deleted in batches of ``delete_batch_rows``, each batch its own transaction, except rows
  a hold covers and ingests that held rows point to (their provenance).
- ``audit_log`` is kept forever unless ``audit_log_days`` is set; then the owner-only
  function ``audit_log_prune`` (migration 4) deletes, in batches, rows older than both
  ``audit_log_days`` and ``audit_floor_days``, and audits each batch itself.
- Held rows of a released hold go back under retention: another active hold that covers
  them adopts them, else they are deleted once past the horizon.

A hold on a patient covers, on each device associated with the patient
(``associations``), the part of the hold window during which the association was open;
it is resolved again in every transaction that drops a chunk, under a SHARE lock on
``legal_holds``, so a hold added meanwhile is honoured by the next chunk. Every drop,
move, delete and purge writes its ``audit_log`` row in the same transaction.

Exactly one run at a time across processes and hosts: a run holds the session advisory
lock ``LOCK_KEY`` on its connection, and a run that cannot take it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
import orjson

from gateway.config import GatewayConfig, RetentionConfig
from gateway.errors import GatewayError

__all__ = ["LOCK_KEY", "HYPERTABLES", "PLAIN_TABLES", "Chunk", "Plan", "Report", "RetentionError", "plan", "run",
           "schedule"]

log = logging.getLogger(__name__)

LOCK_KEY = 0x76677274  # "vgrt"; the migrations' lock is another key
HYPERTABLES = ("readings", "waveform_blocks")
PLAIN_TABLES = ("ingests", "rejected")
_COLUMNS = {
    "readings": "time, device_id, metric, value, flags, ingest_id",
    "waveform_blocks": "time, device_id, metric, hz, samples, flags, ingest_id",
}

# Active holds as (hold_id, device_id, from_t, to_t), half-open [from_t, to_t).
_HELD_BY_DEVICE = """
SELECT id, device_id, from_time, coalesce(to_time, 'infinity') FROM legal_holds
 WHERE released_at IS NULL AND device_id IS NOT NULL"""
_HELD_BY_PATIENT = """
SELECT h.id, a.device_id, greatest(h.from_time, a.started_at),
       least(coalesce(h.to_time, 'infinity'), coalesce(a.ended_at, 'infinity'))
  FROM legal_holds h JOIN associations a ON a.patient_ref = h.patient_ref
 WHERE h.released_at IS NULL AND h.patient_ref IS NOT NULL
   AND a.started_at < coalesce(h.to_time, 'infinity') AND coalesce(a.ended_at, 'infinity') > h.from_time"""

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, correlation_id, detail)
SELECT $1, $2, t, 'success', $3, d::jsonb FROM unnest($4::text[], $5::text[]) AS u(t, d)
"""


class RetentionError(GatewayError):
    """Retention cannot run safely; nothing was changed by the run that raised it."""


@dataclass(frozen=True)
class Chunk:
    """A chunk of a hypertable: ``[start, end)`` of ``time``."""

    table: str
    schema: str
    name: str
    start: datetime
    end: datetime

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Plan:
    """What is past its horizon at ``now``; a table whose horizon is ``None`` is kept forever."""

    now: datetime
    horizons: dict[str, datetime | None]
    chunks: tuple[Chunk, ...]
    audit_cutoff: datetime | None


@dataclass
class Report:
    """What a run did (or, dry, would do)."""

    plan: Plan
    dry_run: bool
    moved: dict[str, dict[int, int]] = field(default_factory=dict)  # chunk -> hold id -> rows
    deleted: dict[str, int] = field(default_factory=dict)  # plain table -> rows
    held_purged: dict[str, dict[int, int]] = field(default_factory=dict)  # held table -> released hold -> rows
    held_adopted: dict[str, dict[int, int]] = field(default_factory=dict)  # held table -> adopting hold -> rows
    audit_pruned: int = 0


def _horizon(now: datetime, days: float) -> datetime | None:
    return now - timedelta(days=days) if days else None


def plan(now: datetime, cfg: RetentionConfig, chunks: Sequence[Chunk]) -> Plan:
    """The chunks (by table, oldest first) whose whole range ends at or before their table's horizon."""
    horizons = {t: _horizon(now, getattr(cfg, f"{t}_days")) for t in HYPERTABLES + PLAIN_TABLES}
    drop = sorted(
        (c for c in chunks if (h := horizons.get(c.table)) is not None and c.end <= h),
        key=lambda c: (HYPERTABLES.index(c.table), c.start),
    )
    audit = _horizon(now, max(cfg.audit_log_days, cfg.audit_floor_days)) if cfg.audit_log_days else None
    return Plan(now=now, horizons=horizons, chunks=tuple(drop), audit_cutoff=audit)


class _Job:
    """One run over one connection that holds ``LOCK_KEY``."""

    def __init__(self, conn: asyncpg.Connection, cfg: RetentionConfig, actor: str, dry_run: bool) -> None:
        self.conn = conn
        self.cfg = cfg
        self.actor = actor
        self.dry_run = dry_run
        self.correlation_id = uuid.uuid4().hex
        self.held = ""  # the WITH clause naming the active holds' (hold_id, device_id, from_t, to_t)

    async def _audit(self, action: str, targets: Sequence[str], details: Sequence[dict[str, object]]) -> None:
        if targets:
            await self.conn.execute(_AUDIT, self.actor, action, self.correlation_id, list(targets),
                                    [orjson.dumps(d, default=str).decode() for d in details])

    async def _resolve_holds(self) -> None:
        has_associations = await self.conn.fetchval("SELECT to_regclass('associations') IS NOT NULL")
        sources = [_HELD_BY_DEVICE]
        if has_associations:
            sources.append(_HELD_BY_PATIENT)
        else:
            patients = await self.conn.fetch(
                "SELECT id, patient_ref FROM legal_holds WHERE released_at IS NULL AND patient_ref IS NOT NULL ORDER BY id")
            if patients:
                names = ", ".join(f"{r['id']} (patient {r['patient_ref']!r})" for r in patients)
                raise RetentionError(f"active holds {names} name patients, but the table associations that maps "
                                     "patients to devices does not exist: nothing was dropped")
        self.held = "WITH held (hold_id, device_id, from_t, to_t) AS (" + " UNION ALL ".join(sources) + ")\n"

    def _covered(self, alias: str) -> str:
        """Rows of ``alias`` (its ctid) paired with the lowest active hold covering them.

        Driven from the holds, so each held device is an index scan of the chunk's
        (device_id, metric, time) index, not a scan of the chunk: a 1-hour chunk of 1,000,000
        readings of 1,000 devices, one held, is counted in 0.03 s and moved and dropped in
        0.12 s. DISTINCT ON the ctid keeps a row once under overlapping holds without
        merging rows that are equal in every column.
        """
        return (f"SELECT DISTINCT ON ({alias}.ctid) {alias}.ctid AS row_id, h.hold_id FROM held h"
                f" JOIN {{table}} {alias} ON {alias}.device_id = h.device_id"
                f" AND {alias}.time >= h.from_t AND {alias}.time < h.to_t ORDER BY {alias}.ctid, h.hold_id")

    async def drop_chunk(self, chunk: Chunk, horizon: datetime) -> dict[int, int]:
        """Move the held rows of ``chunk``, then drop it; hold id -> rows moved."""
        source = f'"{chunk.schema}"."{chunk.name}"'
        covered = self._covered("r").format(table=source)
        if self.dry_run:
            rows = await self.conn.fetch(f"{self.held}SELECT hold_id, count(*) FROM ({covered}) c GROUP BY hold_id")
            return {r[0]: r[1] for r in rows}
        columns = _COLUMNS[chunk.table]
        async with self.conn.transaction():
            # No hold may be added or released, and no row written to the chunk, between the
            # copy and the drop; readers of the chunk wait too (the drop would stop them anyway).
            await self.conn.execute("SET LOCAL lock_timeout = '60s'")
            await self.conn.execute("LOCK TABLE legal_holds IN SHARE MODE")
            await self.conn.execute(f"LOCK TABLE {source} IN ACCESS EXCLUSIVE MODE")
            rows = await self.conn.fetch(
                f"{self.held}, covered AS ({covered}),"
                f" moved AS (INSERT INTO {chunk.table}_held ({columns}, hold_id)"
                f"  SELECT {', '.join('r.' + c.strip() for c in columns.split(','))}, c.hold_id"
                f"  FROM covered c JOIN {source} r ON r.ctid = c.row_id RETURNING hold_id)"
                " SELECT hold_id, count(*) FROM moved GROUP BY hold_id"
            )
            moved = {r[0]: r[1] for r in rows}
            dropped = await self.conn.fetch(
                "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz, newer_than => $3::timestamptz)",
                chunk.table, chunk.end, chunk.start,
            )
            if [r[0] for r in dropped] != [chunk.qualified]:
                raise RetentionError(f"drop_chunks on {chunk.table} [{chunk.start}, {chunk.end}) dropped "
                                     f"{[r[0] for r in dropped]}, not {chunk.qualified}: rolled back")
            detail = {"table": chunk.table, "range_start": chunk.start, "range_end": chunk.end, "horizon": horizon}
            await self._audit("retention.drop_chunk", [chunk.qualified], [detail])
            await self._audit("retention.move", [f"hold:{h}" for h in moved],
                              [{"table": chunk.table, "to": f"{chunk.table}_held", "chunk": chunk.qualified, "rows": n}
                               for n in moved.values()])
        return moved

    async def delete_plain(self, table: str, cutoff: datetime) -> int:
        """Delete rows of ``table`` received before ``cutoff`` that no hold keeps; rows deleted."""
        keep = ("NOT EXISTS (SELECT FROM held h WHERE h.device_id = x.device_id"
                " AND x.received_at >= h.from_t AND x.received_at < h.to_t)")
        if table == "ingests":
            keep += (" AND NOT EXISTS (SELECT FROM readings_held r WHERE r.ingest_id = x.id)"
                     " AND NOT EXISTS (SELECT FROM waveform_blocks_held w WHERE w.ingest_id = x.id)")
        doomed = f"SELECT x.id FROM {table} x WHERE x.received_at < $1 AND {keep}"
        if self.dry_run:
            return await self.conn.fetchval(f"{self.held}SELECT count(*) FROM ({doomed}) d", cutoff)
        total = 0
        batch = self.cfg.delete_batch_rows
        while True:
            async with self.conn.transaction():
                n = await self.conn.fetchval(
                    f"{self.held}, gone AS (DELETE FROM {table} WHERE id IN ({doomed} ORDER BY x.received_at LIMIT $2)"
                    " RETURNING 1) SELECT count(*) FROM gone", cutoff, batch)
                await self._audit("retention.delete", [table] if n else [], [{"before": cutoff, "rows": n}])
            total += n
            if n < batch:
                return total

    async def release_held(self, table: str, horizon: datetime | None) -> tuple[dict[int, int], dict[int, int]]:
        """Rows of released holds in ``table``: adopted by an active hold, else deleted past ``horizon``."""
        released = "SELECT id FROM legal_holds WHERE released_at IS NOT NULL"
        covered = self._covered("x").format(table=f"(SELECT ctid, * FROM {table} WHERE hold_id IN ({released}))")
        gone_sql = f"DELETE FROM {table} x WHERE hold_id IN ({released}) AND x.time < $1 RETURNING hold_id"
        if self.dry_run:
            adopted = await self.conn.fetch(f"{self.held}SELECT hold_id, count(*) FROM ({covered}) c GROUP BY 1")
            purged = await self.conn.fetch(
                f"{self.held}SELECT hold_id, count(*) FROM {table} x WHERE hold_id IN ({released}) AND x.time < $1"
                f" AND x.ctid NOT IN (SELECT row_id FROM ({covered}) c) GROUP BY 1", horizon)
            return {r[0]: r[1] for r in adopted}, {r[0]: r[1] for r in purged}
        async with self.conn.transaction():
            await self.conn.execute("LOCK TABLE legal_holds IN SHARE MODE")
            adopted = await self.conn.fetch(
                f"{self.held}, covered AS ({covered}), moved AS (UPDATE {table} x SET hold_id = c.hold_id FROM covered c"
                " WHERE x.ctid = c.row_id RETURNING x.hold_id) SELECT hold_id, count(*) FROM moved GROUP BY 1")
            purged = [] if horizon is None else await self.conn.fetch(
                f"WITH gone AS ({gone_sql}) SELECT hold_id, count(*) FROM gone GROUP BY 1", horizon)
            await self._audit("retention.adopt_held", [f"hold:{r[0]}" for r in adopted],
                              [{"table": table, "rows": r[1]} for r in adopted])
            await self._audit("retention.purge_held", [f"hold:{r[0]}" for r in purged],
                              [{"table": table, "before": horizon, "rows": r[1]} for r in purged])
        return {r[0]: r[1] for r in adopted}, {r[0]: r[1] for r in purged}

    async def prune_audit(self, cutoff: datetime) -> int:
        if self.dry_run:
            return await self.conn.fetchval("SELECT count(*) FROM audit_log WHERE at < $1", cutoff)
        total = 0
        while True:
            n = await self.conn.fetchval("SELECT audit_log_prune($1, $2, $3, $4)", cutoff, self.cfg.audit_floor_days,
                                         self.cfg.delete_batch_rows, self.actor)
            total += n
            if n < self.cfg.delete_batch_rows:
                return total


async def _chunks(conn: asyncpg.Connection) -> list[Chunk]:
    rows = await conn.fetch(
        "SELECT hypertable_name, chunk_schema, chunk_name, range_start, range_end FROM timescaledb_information.chunks"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[]) ORDER BY range_start",
        list(HYPERTABLES),
    )
    return [Chunk(*r) for r in rows]


async def run(conn: asyncpg.Connection, cfg: RetentionConfig, actor: str, *, dry_run: bool = False) -> Report | None:
    """Carry out (or, ``dry_run``, only report) the plan; ``None`` if another run holds the lock."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return None
    try:
        job = _Job(conn, cfg, actor, dry_run)
        await job._resolve_holds()
        now = await conn.fetchval("SELECT now()")
        the_plan = plan(now, cfg, await _chunks(conn))
        report = Report(plan=the_plan, dry_run=dry_run)
        for chunk in the_plan.chunks:
            horizon = the_plan.horizons[chunk.table]
            assert horizon is not None
            report.moved[chunk.qualified] = await job.drop_chunk(chunk, horizon)
        for table in HYPERTABLES:
            adopted, purged = await job.release_held(f"{table}_held", the_plan.horizons[table])
            report.held_adopted[f"{table}_held"], report.held_purged[f"{table}_held"] = adopted, purged
        for table in PLAIN_TABLES:
            cutoff = the_plan.horizons[table]
            if cutoff is not None:
                report.deleted[table] = await job.delete_plain(table, cutoff)
        if the_plan.audit_cutoff is not None:
            report.audit_pruned = await job.prune_audit(the_plan.audit_cutoff)
        return report
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)


async def schedule(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Run retention at start and then every ``retention.interval_s`` until ``stop``; never raises.

    Each process of every gateway tries; the one that takes the lock does the work.
    """
    cfg = config.retention
    actor = f"gateway:{config.gateway_id}"
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(config.database.url, timeout=config.database.connect_timeout_s)
            try:
                report = await run(conn, cfg, actor)
            finally:
                await conn.close()
            if report is None:
                log.info("Retention skipped: another process is running it.")
            else:
                log.info("Retention done.", extra={
                    "chunks_dropped": len(report.plan.chunks),
                    "rows_moved": sum(n for m in report.moved.values() for n in m.values()),
                    "rows_deleted": sum(report.deleted.values()), "audit_rows_pruned": report.audit_pruned})
        except Exception as exc:  # noqa: BLE001 - retention must never stop ingestion; the next interval retries
            log.error("Retention failed; trying again next interval.", extra={"error": repr(exc)})
        try:
            await asyncio.wait_for(stop.wait(), cfg.interval_s)
        except asyncio.TimeoutError:
            pass
