"""TimescaleDB sink: one transaction per batch, binary COPY for readings and waveforms.

Deduplication is per envelope, not per reading: ``ingests`` has a unique key on
(device_id, payload_sha256). A batch first inserts its ingests rows with
``ON CONFLICT DO NOTHING RETURNING id``; readings and waveform blocks are then copied
only for the envelopes that got a new id, in the same transaction. A redelivered
envelope therefore costs one index probe, and readings need no unique index.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence

import asyncpg
import numpy as np
import orjson

from gateway.errors import SinkError
from gateway.retry import is_retriable
from gateway.sinks import History, OpenEpisode, WriteBatch
from gateway.sinks import copybin
from gateway.sinks.rollups import write_rollups
from gateway.sinks.schema import migrate

__all__ = ["TimescaleSink"]

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

_INSERT_REJECTED = """
INSERT INTO rejected (received_at, source, principal, gateway_id, topic_or_path, device_id,
                      reason, payload_sha256, payload_bytes, payload)
SELECT timestamptz 'epoch' + r * interval '1 millisecond', s, p, $4, tp, d, why, h, pb, pl
FROM unnest($1::bigint[], $2::text[], $3::text[], $5::text[], $6::text[], $7::text[], $8::bytea[],
            $9::int[], $10::bytea[]) AS u(r, s, p, tp, d, why, h, pb, pl)
"""

# Audit events of one batch, one statement; ``detail`` travels as JSON text.
_INSERT_AUDIT = """
INSERT INTO audit_log (at, actor, action, target, outcome, source_addr, correlation_id, detail)
SELECT timestamptz 'epoch' + a * interval '1 millisecond', ac, act, tg, oc, sa, ci, dt::jsonb
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
     AS u(a, ac, act, tg, oc, sa, ci, dt)
"""

# Alert episodes of one batch, written with one statement each way: episodes that opened in
# this batch are inserted (closed already, or still active); episodes opened earlier and
# closed now are updated. The partial unique index keeps one active episode per rule.
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

# State restored after a restart (``history``): the latest rows per (device, metric). Each
# pair is one ``ORDER BY time DESC LIMIT 1`` probe of the (device_id, metric, time DESC)
# index, which TimescaleDB runs chunk by chunk from the newest, stopping at the first row:
# a few buffer reads per pair. (DISTINCT ON (device_id, metric) over the same window reads
# every row of the window instead: seconds per device at 1 reading/s, measured.) The time
# bound caps the chunks probed for a pair with no row: a device silent for longer than the
# window starts afresh. Among rows of equal time, one that is not OUT_OF_ORDER (64) and was
# stored first is preferred, as the checks would have kept it.
HISTORY_WINDOW = "7 days"
_MS = "(extract(epoch FROM time) * 1000)::bigint"
_LATEST_READINGS = f"""
SELECT u.d, u.m, x.t, x.value
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, value FROM readings
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}'
    ORDER BY time DESC, (flags & 64), ingest_id LIMIT 1) AS x
"""
# ``ref``: the latest reading without OUT_OF_RANGE | SPIKE | NOT_FINITE (1 | 2 | 128); an
# OUT_OF_ORDER reading (64) never becomes ``ref`` either.
_LATEST_REFS = f"""
SELECT u.d, u.m, x.t, x.value
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, value FROM readings
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}' AND (flags & 195) = 0
    ORDER BY time DESC, ingest_id LIMIT 1) AS x
"""
_LATEST_BLOCKS = f"""
SELECT u.d, u.m, x.t, x.dur
FROM unnest($1::text[], $2::text[]) AS u(d, m)
CROSS JOIN LATERAL (
    SELECT {_MS} AS t, cardinality(samples) * 1000.0 / hz AS dur FROM waveform_blocks
    WHERE device_id = u.d AND metric = u.m AND time > now() - interval '{HISTORY_WINDOW}'
    ORDER BY time DESC, (flags & 64), ingest_id LIMIT 1) AS x
"""
_OPEN_ALERTS = """
SELECT device_id, rule, metric, priority, (extract(epoch FROM opened_at) * 1000)::bigint AS opened_at, trigger_value
FROM alerts
WHERE device_id = ANY($1::text[]) AND cleared_at IS NULL
ORDER BY opened_at, id
"""

_READING_COLUMNS = ["time", "device_id", "metric", "value", "flags", "ingest_id"]
_WAVEFORM_COLUMNS = ["time", "device_id", "metric", "hz", "samples", "flags", "ingest_id"]


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes into a list of distinct strings (few distinct values, many rows)."""
    uniques, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), uniques.tolist()


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; device-supplied text in reasons is escaped, this is the last guard."""
    return text.replace("\x00", "\\x00") if text else text


_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _json(detail: dict[str, object]) -> str:
    r"""``detail`` as JSON text for jsonb, which refuses the escape ``\u0000``: NUL becomes ``\x00``."""
    text = orjson.dumps(detail, default=str).decode()
    return _JSON_NUL.sub(r"\1\\\\x00", text) if "\\u0000" in text else text


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
    ) -> None:
        self._dsn = dsn
        self._gateway_id = gateway_id
        self._quarantine_bytes = quarantine_payload_bytes
        self._connect_timeout = connect_timeout_s
        self._command_timeout = command_timeout_s
        self._run_migrations = run_migrations
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=4,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": f"vitalgate:{self._gateway_id}"},
            )
            if self._run_migrations:
                async with self._pool.acquire() as conn:
                    applied = await migrate(conn)
                    if applied:
                        log.info("Database schema migrated.", extra={"versions": applied})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
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

    async def known(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], int]:
        if not keys:
            return {}
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT device_id, payload_sha256, id FROM ingests"
                    " WHERE (device_id, payload_sha256) IN (SELECT * FROM unnest($1::text[], $2::bytea[]))",
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
            raise SinkError(f"duplicate lookup failed: {exc}", retriable=is_retriable(exc)) from exc
        return {(r[0], bytes(r[1])): r[2] for r in rows}

    async def history(
        self, devices: list[str], numeric: Sequence[tuple[str, str]] = (), waveform: Sequence[tuple[str, str]] = ()
    ) -> History:
        """The open alert episodes of ``devices`` and the latest stored rows of the given
        (device, metric) pairs, numeric and waveform (one query per kind, whole batch)."""
        out = History()
        if not devices:
            return out
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn:
                num = ref = wav = []
                if numeric:
                    nd, nm = [k[0] for k in numeric], [k[1] for k in numeric]
                    num = await conn.fetch(_LATEST_READINGS, nd, nm)
                    ref = await conn.fetch(_LATEST_REFS, nd, nm)
                if waveform:
                    wav = await conn.fetch(_LATEST_BLOCKS, [k[0] for k in waveform], [k[1] for k in waveform])
                alerts = await conn.fetch(_OPEN_ALERTS, devices)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
            raise SinkError(f"history lookup failed: {exc}", retriable=is_retriable(exc)) from exc
        out.numeric = [(r[0], r[1], int(r[2]), float(r[3])) for r in num]
        out.numeric_ref = [(r[0], r[1], int(r[2]), float(r[3])) for r in ref]
        out.waveform = [(r[0], r[1], int(r[2]), float(r[3])) for r in wav]
        # The latest reading of any kind is the latest of the per-metric latest ones.
        latest = out.latest
        for d, _, t, _ in out.numeric + out.waveform:
            if t > latest.get(d, t - 1):
                latest[d] = t
        out.open_alerts = [
            OpenEpisode(r[0], r[1], r[2], r[3], int(r[4]), None if r[5] is None else float(r[5])) for r in alerts
        ]
        return out

    async def write(self, batch: WriteBatch) -> list[int | None]:
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                ids = await self._write_ingests(conn, batch)
                if any(i is not None for i in ids):
                    await self._copy_readings(conn, batch, ids)
                    await self._copy_waveforms(conn, batch, ids)
                if batch.rejected:
                    await self._write_rejected(conn, batch)
                if batch.alerts:
                    alert_ids = batch.alert_ingest_ids if batch.alert_ingest_ids is not None else ids
                    await self._write_alerts(conn, batch, alert_ids)
                if batch.audit:
                    await self._write_audit(conn, batch)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
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
        env_codes, duniq = _factorize(np.array([d.envelope.device_id for d in batch.items], dtype=object))
        if not keep.all():
            sel = np.flatnonzero(keep)
            t, env, met, val, flg, ingest = num.t[sel], num.env[sel], num.metric[sel], num.value[sel], batch.num_flags[sel], ingest[sel]
            dev = num.device[sel]
        else:
            t, env, met, val, flg, dev = num.t, num.env, num.metric, num.value, batch.num_flags, num.device
        if len(t) == 0:
            return
        dcodes = env_codes[env]
        mcodes, muniq = _factorize(met)
        data = copybin.encode_rows([
            copybin.timestamptz_ms(t),
            copybin.text(dcodes, duniq),
            copybin.text(mcodes, muniq),
            copybin.fixed(val, ">f8"),
            copybin.fixed(flg, ">i4"),
            copybin.fixed(ingest, ">i8"),
        ])
        await conn.copy_to_table("readings", source=_once(data), columns=_READING_COLUMNS, format="binary")
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
            samples = wav.samples[copybin._ranges(wav.offsets[:-1][sel], counts)]  # noqa: SLF001
        data = copybin.encode_waveform_rows(
            wav.t0[sel], wav.device[sel], wav.metric[sel], wav.hz[sel], samples, offsets,
            batch.wav_flags[sel], ingest[sel],
        )
        await conn.copy_to_table("waveform_blocks", source=_once(data), columns=_WAVEFORM_COLUMNS, format="binary")

    async def _write_rejected(self, conn: asyncpg.Connection, batch: WriteBatch) -> None:
        rej = batch.rejected
        limit = self._quarantine_bytes
        await conn.execute(
            _INSERT_REJECTED,
            [r.raw.received_at_ms for r in rej],
            [r.raw.source for r in rej],
            [r.raw.principal for r in rej],
            self._gateway_id,
            [r.raw.topic_or_path for r in rej],
            [_clean(r.device_id) for r in rej],
            [_clean(r.reason) for r in rej],
            [hashlib.sha256(r.raw.payload).digest() for r in rej],
            [len(r.raw.payload) for r in rej],
            [r.raw.payload[:limit] for r in rej],
        )

    async def _write_audit(self, conn: asyncpg.Connection, batch: WriteBatch) -> None:
        ev = batch.audit
        await conn.execute(
            _INSERT_AUDIT,
            [e.at_ms for e in ev],
            [_clean(e.actor) for e in ev],
            [e.action for e in ev],
            [_clean(e.target) for e in ev],
            [e.outcome for e in ev],
            [e.source_addr for e in ev],
            [_clean(e.correlation_id) for e in ev],
            [None if e.detail is None else _json(e.detail) for e in ev],
        )

    async def _write_alerts(self, conn: asyncpg.Connection, batch: WriteBatch, ids: list[int | None]) -> None:
        def ingest_of(env: int | None) -> int | None:
            return ids[env] if env is not None and env < len(ids) else None

        opened: dict[tuple[str, str], list] = {}
        episodes: list[list] = []  # rows for _INSERT_ALERTS, in opening order
        closes: list[tuple[str, str, int, float | None, int | None]] = []
        for ev in batch.alerts:
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
