"""TimescaleDB sink: one transaction per batch, COPY for readings and waveforms.

Deduplication is per envelope, not per reading: ``ingests`` has a unique key on
(device_id, payload_sha256). A batch first inserts its ingests rows with
``ON CONFLICT DO NOTHING RETURNING id``; readings and waveform blocks are then copied
only for the envelopes that got a new id, in the same transaction. A redelivered
envelope therefore costs one index probe, and readings need no unique index.

This module owns the connection pool, the transaction and the rows of envelopes
(``ingests``, ``readings``, ``waveform_blocks``). The other rows of a batch are written by
``quarantine`` (``rejected``) and ``records`` (``alerts``, ``audit_log``) inside the same
transaction, and, with the HL7 feed on, the alarm rows of ``hl7_outbox`` (``gateway.hl7.outbox``);
the storage reads (``known``, ``history``) live in ``timescale_reads``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import numpy as np

from gateway.errors import SinkError
from gateway.hl7.outbox import enqueue_alarms
from gateway.retry import DATABASE_ERRORS, WRONG_SERVER_CODES, is_retriable
from gateway.sinks import History, WriteBatch
from gateway.sinks import copybin
from gateway.sinks import timescale_reads as reads
from gateway.sinks.pooled import connection
from gateway.sinks.quarantine import write_rejected
from gateway.sinks.records import write_alerts, write_audit
from gateway.sinks.rollups import prepare_connection, write_rollups
from gateway.sinks.schema import migrate

__all__ = ["TimescaleSink", "Fence"]

# Runs first in every commit transaction; may leave envelopes, rejects and alerts out of
# the batch (cluster mode: those of partitions this process no longer owns).
Fence = Callable[[asyncpg.Connection, WriteBatch], Awaitable[None]]

log = logging.getLogger(__name__)

_INSERT_INGESTS = """
INSERT INTO ingests (received_at, device_id, source, principal, gateway_id, topic_or_path,
                     payload_sha256, payload_bytes, encoding, profile, profile_version,
                     firmware, seq, n_readings, n_flagged)
SELECT timestamptz 'epoch' + r * interval '1 millisecond', d, s, p, $4, tp, h, pb, e, pr, pv, fw, sq, nr, nf
FROM unnest($1::bigint[], $2::text[], $3::text[], $5::text[], $6::bytea[], $7::int[], $8::text[],
            $9::text[], $10::text[], $11::text[], $12::bigint[], $13::int[], $14::int[], $15::text[])
     AS u(r, d, s, tp, h, pb, e, pr, pv, fw, sq, nr, nf, p)
ON CONFLICT (device_id, payload_sha256) DO NOTHING
RETURNING id, device_id, payload_sha256
"""

_READING_COLUMNS = ["time", "device_id", "metric", "value", "flags", "ingest_id"]
_WAVEFORM_COLUMNS = ["time", "device_id", "metric", "hz", "samples", "flags", "ingest_id"]


async def _init_connection(conn: asyncpg.Connection) -> None:
    # readings are COPYed with time as microseconds since 2000 (see copybin); no query of
    # this pool reads a timestamptz column back (times come out as epoch-ms bigint).
    await conn.set_type_codec(**copybin.TIMESTAMPTZ_AS_US)
    await prepare_connection(conn)  # the rollups' staging table


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class TimescaleSink:
    """Writes ``WriteBatch``es to TimescaleDB through an asyncpg pool."""

    def __init__(
        self,
        dsn: str,
        *,
        gateway_id: str,
        quarantine_payload_bytes: int = 64 * 1024,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 60.0,
        run_migrations: bool = True,
        hl7_outbox: bool = False,
    ) -> None:
        self._dsn = dsn
        self._gateway_id = gateway_id
        self._quarantine_bytes = quarantine_payload_bytes
        self._connect_timeout = connect_timeout_s
        self._command_timeout = command_timeout_s
        self._run_migrations = run_migrations
        self._hl7_outbox = hl7_outbox  # alarm messages of associated devices, with their alerts rows
        self._pool: asyncpg.Pool | None = None
        self.fence: Fence | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=4,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": f"vitalgate:{self._gateway_id}"},
                init=_init_connection,
            )
            if self._run_migrations:
                async with connection(self._pool) as conn:
                    applied = await migrate(conn)
                    if applied:
                        log.info("Database schema migrated.", extra={"versions": applied})
        except DATABASE_ERRORS as exc:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            raise SinkError(f"cannot reach the database: {exc}", retriable=is_retriable(exc)) from exc

    async def close(self, timeout_s: float = 10.0) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), timeout_s)
        except (asyncio.TimeoutError, OSError, asyncpg.InterfaceError):
            pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise SinkError("the sink is not started", retriable=False)
        return self._pool

    async def ping(self, timeout_s: float) -> None:
        """``SELECT 1`` on a pool connection within ``timeout_s`` (waiting for the connection
        included); ``SinkError`` saying why not. For readiness probes."""
        pool = self._require_pool()
        try:
            async with asyncio.timeout(timeout_s), connection(pool) as conn:
                await conn.fetchval("SELECT 1")
        except TimeoutError:
            raise SinkError(f"no answer to SELECT 1 within {timeout_s:g} s", retriable=True) from None
        except DATABASE_ERRORS as exc:
            raise SinkError(f"SELECT 1 failed: {exc}", retriable=is_retriable(exc),
                            sqlstate=getattr(exc, "sqlstate", None)) from exc

    async def known(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], int]:
        """The (device_id, payload_sha256) pairs among ``keys`` already stored, with their ingest ids."""
        return await reads.known(self._require_pool(), keys) if keys else {}

    async def history(
        self, devices: list[str], numeric: Sequence[tuple[str, str]] = (), waveform: Sequence[tuple[str, str]] = (),
        *, runs_ms: int = 0,
    ) -> History:
        """The open alert episodes of ``devices`` and the latest stored rows of the given
        (device, metric) pairs, numeric and waveform (one query per kind, whole batch), and
        with ``runs_ms`` the numeric pairs' readings within that long before their latest."""
        if not devices:
            return History()
        return await reads.history(self._require_pool(), devices, numeric, waveform, runs_ms=runs_ms)

    async def recent(self, horizon_s: float) -> dict[str, tuple[str, int]]:
        """Per device that reported within the last ``horizon_s`` seconds: the profile of its
        latest stored envelope and its latest reading time (epoch ms)."""
        return await reads.recent(self._require_pool(), horizon_s)

    async def write(self, batch: WriteBatch) -> list[int | None]:
        pool = self._require_pool()
        try:
            async with connection(pool) as conn, conn.transaction():
                if self.fence is not None:
                    await self.fence(conn, batch)
                ids = await self._write_ingests(conn, batch)
                if any(i is not None for i in ids):
                    await self._copy_readings(conn, batch, ids)
                    await self._copy_waveforms(conn, batch, ids)
                await write_rejected(
                    conn, batch.rejected, gateway_id=self._gateway_id, payload_bytes=self._quarantine_bytes
                )
                if batch.alerts:
                    alert_ids = batch.alert_ingest_ids if batch.alert_ingest_ids is not None else ids
                    await write_alerts(conn, batch.alerts, alert_ids)
                    if self._hl7_outbox:
                        await enqueue_alarms(conn, batch.alerts)
                await write_audit(conn, batch.audit)
        except DATABASE_ERRORS as exc:
            if getattr(exc, "sqlstate", None) in WRONG_SERVER_CODES:
                await pool.expire_connections()  # reconnect: the URL's read-write host takes the retry
            raise SinkError(
                f"write failed: {exc}", retriable=is_retriable(exc), sqlstate=getattr(exc, "sqlstate", None)
            ) from exc
        return ids

    async def _write_ingests(self, conn: asyncpg.Connection, batch: WriteBatch) -> list[int | None]:
        items = batch.items
        n = len(items)
        if n == 0:
            return []
        n_rows = np.bincount(batch.num.env, minlength=n) + np.bincount(batch.wav.env, minlength=n)
        n_flag = np.bincount(batch.num.env[batch.num_flags != 0], minlength=n) + np.bincount(
            batch.wav.env[batch.wav_flags != 0], minlength=n
        )
        raws = batch.raws
        rows = await conn.fetch(
            _INSERT_INGESTS,
            [r.received_at_ms for r in raws],
            [d.envelope.device_id for d in items],
            [r.source for r in raws],
            self._gateway_id,
            [r.topic_or_path for r in raws],
            [d.sha256 for d in items],
            [d.payload_bytes for d in items],
            [d.encoding for d in items],
            [d.profile.name for d in items],
            [d.profile.version for d in items],
            [d.envelope.firmware for d in items],
            [d.envelope.seq for d in items],
            n_rows.tolist(),
            n_flag.tolist(),
            [r.principal for r in raws],
        )
        by_key = {(r[1], bytes(r[2])): r[0] for r in rows}
        ids: list[int | None] = []
        for d in items:
            ids.append(by_key.pop((d.envelope.device_id, d.sha256), None))
        return ids

    @staticmethod
    def _ingest_column(ids: list[int | None], env: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        id_arr = np.array([-1 if i is None else i for i in ids], dtype=np.int64)
        per_row = id_arr[env]
        keep = per_row >= 0
        return per_row, keep

    async def _copy_readings(self, conn: asyncpg.Connection, batch: WriteBatch, ids: list[int | None]) -> None:
        num = batch.num
        if len(num) == 0:
            return
        ingest, keep = self._ingest_column(ids, num.env)
        if not keep.all():
            sel = np.flatnonzero(keep)
            if len(sel) == 0:
                return
            t, dev, met, val, flg = num.t[sel], num.device[sel], num.metric[sel], num.value[sel], batch.num_flags[sel]
            ingest = ingest[sel]
        else:
            t, dev, met, val, flg = num.t, num.device, num.metric, num.value, batch.num_flags
        records = copybin.reading_records(t, dev, met, val, flg, ingest)
        await conn.copy_records_to_table("readings", records=records, columns=_READING_COLUMNS)
        await write_rollups(conn, dev, met, t, val, flg)  # same transaction: rollups commit with their readings

    async def _copy_waveforms(self, conn: asyncpg.Connection, batch: WriteBatch, ids: list[int | None]) -> None:
        wav = batch.wav
        if len(wav) == 0:
            return
        ingest, keep = self._ingest_column(ids, wav.env)
        sel = np.flatnonzero(keep)
        if len(sel) == 0:
            return
        if len(sel) == len(wav):
            samples, offsets = wav.samples, wav.offsets
        else:
            counts = np.diff(wav.offsets)[sel]
            offsets = np.zeros(len(sel) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            samples = wav.samples[copybin.ranges(wav.offsets[:-1][sel], counts)]
        data = copybin.encode_waveform_rows(
            wav.t0[sel], wav.device[sel], wav.metric[sel], wav.hz[sel], samples, offsets,
            batch.wav_flags[sel], ingest[sel],
        )
        await conn.copy_to_table("waveform_blocks", source=_once(data), columns=_WAVEFORM_COLUMNS, format="binary")
