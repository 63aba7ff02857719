"""Database schema (PROTOCOL section 3) as numbered migrations.

``migrate(conn)`` applies the ones not yet recorded in ``schema_version``, each in its
own transaction, under an advisory lock so that several workers starting at once do not
race. Re-running it is a no-op.
"""

from __future__ import annotations

import asyncpg

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

_LOCK_KEY = 0x76697461  # "vita"

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "core tables: ingests, readings, waveform_blocks, alerts, rejected",
        """
CREATE TABLE ingests (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL,
    device_id       text        NOT NULL,
    source          text        NOT NULL CHECK (source IN ('mqtt', 'https', 'replay')),
    principal       text,
    gateway_id      text        NOT NULL,
    topic_or_path   text        NOT NULL,
    payload_sha256  bytea       NOT NULL,
    payload_bytes   integer     NOT NULL,
    encoding        text        NOT NULL CHECK (encoding IN ('json', 'msgpack')),
    profile         text        NOT NULL,
    profile_version text        NOT NULL,
    firmware        text,
    seq             bigint,
    n_readings      integer     NOT NULL,
    n_flagged       integer     NOT NULL,
    CONSTRAINT ingests_device_payload_key UNIQUE (device_id, payload_sha256)
);
CREATE INDEX ingests_received_at_idx ON ingests (received_at DESC);

CREATE TABLE readings (
    time       timestamptz      NOT NULL,
    device_id  text             NOT NULL,
    metric     text             NOT NULL,
    value      double precision NOT NULL,
    flags      integer          NOT NULL DEFAULT 0,
    ingest_id  bigint           NOT NULL
);
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 hour'), create_default_indexes => FALSE);
CREATE INDEX readings_device_metric_time_idx ON readings (device_id, metric, time DESC);
CREATE INDEX readings_time_idx ON readings (time DESC);

CREATE TABLE waveform_blocks (
    time       timestamptz      NOT NULL,
    device_id  text             NOT NULL,
    metric     text             NOT NULL,
    hz         double precision NOT NULL,
    samples    real[]           NOT NULL,
    flags      integer          NOT NULL DEFAULT 0,
    ingest_id  bigint           NOT NULL
);
SELECT create_hypertable('waveform_blocks', by_range('time', INTERVAL '1 hour'), create_default_indexes => FALSE);
CREATE INDEX waveform_blocks_device_metric_time_idx ON waveform_blocks (device_id, metric, time DESC);

CREATE TABLE alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       text             NOT NULL,
    rule            text             NOT NULL,
    metric          text,
    priority        text             NOT NULL CHECK (priority IN ('high', 'medium', 'low')),
    opened_at       timestamptz      NOT NULL,
    cleared_at      timestamptz,
    trigger_value   double precision,
    clear_value     double precision,
    ingest_id       bigint,
    clear_ingest_id bigint
);
CREATE UNIQUE INDEX alerts_one_active_idx ON alerts (device_id, rule) WHERE cleared_at IS NULL;
CREATE INDEX alerts_device_opened_idx ON alerts (device_id, opened_at DESC);

CREATE TABLE rejected (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    timestamptz NOT NULL,
    source         text        NOT NULL,
    principal      text,
    gateway_id     text        NOT NULL,
    topic_or_path  text        NOT NULL,
    device_id      text,
    reason         text        NOT NULL,
    payload_sha256 bytea       NOT NULL,
    payload_bytes  integer     NOT NULL,
    payload        bytea       NOT NULL
);
CREATE INDEX rejected_received_at_idx ON rejected (received_at DESC);
CREATE INDEX rejected_device_idx ON rejected (device_id, received_at DESC);
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                   version     integer PRIMARY KEY,
                   description text        NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_version (version, description) VALUES ($1, $2)", version, description
            )
            applied.append(version)
    return applied
