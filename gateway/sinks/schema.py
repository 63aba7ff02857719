"""Database schema (PROTOCOL section 3) as numbered migrations.

``migrate(conn)`` applies the ones not yet recorded in ``schema_version``, each in its
own transaction, under an advisory lock so that several workers starting at once do not
race. Re-running it is a no-op. A migration is never edited once released: a change is a
new one appended to ``MIGRATIONS``.

Migration 2 creates the role ``vitalgate_gateway`` (cluster-wide, so the migrating user
needs CREATEROLE, as the owner of a managed database usually has) with the privileges the
gateway needs and no more: it may insert into ``audit_log`` but not change or delete its
rows, and it only reads the registry. Tables of later migrations must be granted there too.
"""

from __future__ import annotations

import asyncpg

from gateway.model import SOURCE_NAME_PATTERN

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
    (
        2,
        "device registry, API keys, append-only audit_log, role vitalgate_gateway",
        """
CREATE TABLE devices (
    device_id        text        PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    profile          text        NOT NULL,
    status           text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    revoked_at       timestamptz,
    token_id         text        UNIQUE,
    token_sha256     bytea,
    token_created_at timestamptz,
    cert_subject     text,
    note             text,
    CHECK ((token_id IS NULL) = (token_sha256 IS NULL)),
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE UNIQUE INDEX devices_cert_subject_key ON devices (cert_subject) WHERE cert_subject IS NOT NULL;

CREATE TABLE api_keys (
    key_id      text        PRIMARY KEY,
    name        text        NOT NULL,
    scopes      text[]      NOT NULL CHECK (scopes <@ ARRAY['telemetry:read', 'admin']::text[] AND cardinality(scopes) > 0),
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    key_sha256  bytea       NOT NULL,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);

CREATE TABLE audit_log (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor          text        NOT NULL,
    action         text        NOT NULL,
    target         text,
    outcome        text        NOT NULL,
    source_addr    text,
    correlation_id text,
    detail         jsonb
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC);
CREATE INDEX audit_log_target_idx ON audit_log (target, at DESC);

-- Append-only for everyone, the owner included: rows can be added, never changed or removed.
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$fn$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- The gateway's privileges, as a role operators GRANT to the login role the gateway uses
-- (which then runs with database.migrate = false: it cannot create tables).
DO $do$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vitalgate_gateway') THEN
        CREATE ROLE vitalgate_gateway NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created meanwhile by a migration of another database of the cluster
END
$do$;
GRANT SELECT ON schema_version TO vitalgate_gateway;
GRANT SELECT, INSERT ON ingests, readings, waveform_blocks, rejected TO vitalgate_gateway;
GRANT SELECT, INSERT, UPDATE ON alerts TO vitalgate_gateway;
GRANT SELECT ON devices, api_keys TO vitalgate_gateway;
GRANT INSERT ON audit_log TO vitalgate_gateway;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO vitalgate_gateway;
""",
    ),
    (
        3,
        "read side: associations (device -> patient over time), readings_1m rollups",
        """
CREATE EXTENSION IF NOT EXISTS btree_gist;

-- Which patient (an ADT identifier, nothing more) and bed a device served, and when. The
-- exclusion constraint is the rule "one association per device at a time": windows of one
-- device never overlap, so at most one is open (ended_at NULL = open-ended).
CREATE TABLE associations (
    id          bigserial   PRIMARY KEY,
    device_id   text        NOT NULL CHECK (device_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    patient_ref text        NOT NULL CHECK (length(patient_ref) BETWEEN 1 AND 128),
    location    text        CHECK (length(location) BETWEEN 1 AND 128),
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    CHECK (ended_at IS NULL OR ended_at > started_at),
    CONSTRAINT associations_no_overlap
        EXCLUDE USING gist (device_id WITH =, tstzrange(started_at, ended_at, '[)') WITH &&)
);
CREATE INDEX associations_patient_idx ON associations (patient_ref, started_at);
CREATE INDEX associations_open_idx ON associations (device_id) WHERE ended_at IS NULL;

-- Per-minute rollups of numeric readings, written in the transaction of the readings and
-- merged on conflict; readings flagged OUT_OF_RANGE, SPIKE or NOT_FINITE are left out.
CREATE TABLE readings_1m (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    bucket    timestamptz      NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    sum       double precision NOT NULL,
    count     bigint           NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
SELECT create_hypertable('readings_1m', by_range('bucket', INTERVAL '1 day'));

GRANT SELECT, INSERT, UPDATE ON associations, readings_1m TO vitalgate_gateway;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO vitalgate_gateway;
""",
    ),
    # ---- migration 4: retention and legal holds (gateway/retention.py, gateway/holds_store.py)
    (
        4,
        "legal holds, held-row tables and the *_all views, audit_log_prune()",
        """
-- A hold names a device, or a patient whose devices are found through `associations` when
-- retention runs; it covers readings with from_time <= time < to_time (to_time NULL: open).
CREATE TABLE legal_holds (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      text,
    patient_ref    text,
    from_time      timestamptz NOT NULL,
    to_time        timestamptz,
    reason         text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    created_by     text        NOT NULL,
    released_at    timestamptz,
    released_by    text,
    release_reason text,
    CHECK ((device_id IS NULL) <> (patient_ref IS NULL)),
    CHECK (to_time IS NULL OR to_time > from_time),
    CHECK ((released_at IS NULL) = (released_by IS NULL))
);
CREATE INDEX legal_holds_active_idx ON legal_holds (id) WHERE released_at IS NULL;

-- Rows a hold kept when their chunk was dropped: the columns of the hypertable plus the hold.
CREATE TABLE readings_held (
    time       timestamptz      NOT NULL,
    device_id  text             NOT NULL,
    metric     text             NOT NULL,
    value      double precision NOT NULL,
    flags      integer          NOT NULL DEFAULT 0,
    ingest_id  bigint           NOT NULL,
    hold_id    bigint           NOT NULL REFERENCES legal_holds (id)
);
CREATE INDEX readings_held_device_metric_time_idx ON readings_held (device_id, metric, time DESC);
CREATE INDEX readings_held_hold_idx ON readings_held (hold_id);
CREATE INDEX readings_held_ingest_idx ON readings_held (ingest_id);

CREATE TABLE waveform_blocks_held (
    time       timestamptz      NOT NULL,
    device_id  text             NOT NULL,
    metric     text             NOT NULL,
    hz         double precision NOT NULL,
    samples    real[]           NOT NULL,
    flags      integer          NOT NULL DEFAULT 0,
    ingest_id  bigint           NOT NULL,
    hold_id    bigint           NOT NULL REFERENCES legal_holds (id)
);
CREATE INDEX waveform_blocks_held_device_metric_time_idx ON waveform_blocks_held (device_id, metric, time DESC);
CREATE INDEX waveform_blocks_held_hold_idx ON waveform_blocks_held (hold_id);
CREATE INDEX waveform_blocks_held_ingest_idx ON waveform_blocks_held (ingest_id);

-- What readers query: a row is in exactly one of the two tables (moved in the transaction
-- that drops its chunk), so UNION ALL neither loses nor repeats one.
CREATE VIEW readings_all AS
    SELECT time, device_id, metric, value, flags, ingest_id FROM readings
    UNION ALL
    SELECT time, device_id, metric, value, flags, ingest_id FROM readings_held;
CREATE VIEW waveform_blocks_all AS
    SELECT time, device_id, metric, hz, samples, flags, ingest_id FROM waveform_blocks
    UNION ALL
    SELECT time, device_id, metric, hz, samples, flags, ingest_id FROM waveform_blocks_held;

-- The one way rows leave audit_log: older than cutoff, which must lie beyond floor_days.
-- The append-only trigger is disabled and enabled again inside this transaction, under
-- ALTER TABLE's ACCESS EXCLUSIVE lock, so no other session ever sees it disabled. The
-- prune is audited in the same transaction. Only the owner may run it (EXECUTE revoked).
CREATE FUNCTION audit_log_prune(cutoff timestamptz, floor_days double precision, max_rows integer, actor text)
RETURNS bigint LANGUAGE plpgsql SET search_path = public, pg_temp AS $fn$
DECLARE
    n bigint;
BEGIN
    IF floor_days IS NULL OR floor_days < 1 OR cutoff IS NULL OR cutoff > now() - floor_days * interval '1 day' THEN
        RAISE EXCEPTION 'audit_log_prune: cutoff % is not older than the floor of % days', cutoff, floor_days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only;
    DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < cutoff ORDER BY id LIMIT max_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only;
    INSERT INTO audit_log (actor, action, target, outcome, detail)
    VALUES (actor, 'retention.audit_prune', 'audit_log', 'success',
            jsonb_build_object('cutoff', cutoff, 'floor_days', floor_days, 'rows', n));
    RETURN n;
END
$fn$;
REVOKE ALL ON FUNCTION audit_log_prune(timestamptz, double precision, integer, text) FROM PUBLIC;

GRANT SELECT ON legal_holds, readings_held, waveform_blocks_held, readings_all, waveform_blocks_all TO vitalgate_gateway;
""",
    ),
    # ---- migration 5: any source's name in ingests.source
    (
        5,
        "ingests.source checks the form of a transport name, not a fixed list",
        f"""
ALTER TABLE ingests DROP CONSTRAINT IF EXISTS ingests_source_check;
ALTER TABLE ingests ADD CONSTRAINT ingests_source_name CHECK (source ~ '{SOURCE_NAME_PATTERN}');
""",
    ),
    # ---- migration 6: a refused payload stored once
    (
        6,
        "rejected: one row per refused payload and origin (a redelivery adds none)",
        """
-- A redelivered refused payload (MQTT redelivery, an HTTP retry) is the same refusal: keep
-- the first row of each (payload, source, topic or path, principal), then let the unique
-- index make the quarantine INSERT skip repeats (ON CONFLICT DO NOTHING).
DELETE FROM rejected r USING rejected first
 WHERE r.payload_sha256 = first.payload_sha256 AND r.source = first.source
   AND r.topic_or_path = first.topic_or_path AND coalesce(r.principal, '') = coalesce(first.principal, '')
   AND r.id > first.id;
CREATE UNIQUE INDEX rejected_once_idx ON rejected (payload_sha256, source, topic_or_path, (coalesce(principal, '')));
""",
    ),
    # ---- migration 7: the HL7 feed's outbox (gateway/hl7/outbox.py)
    (
        7,
        "HL7 feed: hl7_outbox (store and forward) and hl7_feed_cursor",
        """
-- One row per HL7 message to send: an alarm transition (written with its alerts row) or a
-- patient's numerics of one period (written by the feed's periodic job). ``body`` holds the
-- facts, rendered with the device profile at send time; MSH-10 is derived from ``id``.
CREATE TABLE hl7_outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('numerics', 'alarm')),
    patient_ref     text        NOT NULL,
    location        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    period_start    timestamptz,
    alert_id        bigint,
    phase           text        CHECK (phase IN ('start', 'end')),
    body            jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'parked')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    sent_at         timestamptz,
    ack_code        text,
    reason          text,
    CHECK ((kind = 'numerics') = (period_start IS NOT NULL)),
    CHECK ((kind = 'alarm') = (alert_id IS NOT NULL AND phase IS NOT NULL))
);
CREATE UNIQUE INDEX hl7_outbox_numerics_key ON hl7_outbox (patient_ref, period_start) WHERE kind = 'numerics';
CREATE UNIQUE INDEX hl7_outbox_alarm_key ON hl7_outbox (alert_id, phase) WHERE kind = 'alarm';
CREATE INDEX hl7_outbox_pending_idx ON hl7_outbox (id) WHERE status = 'pending';
CREATE INDEX hl7_outbox_pending_patient_idx ON hl7_outbox (patient_ref, id) WHERE status = 'pending';

-- Up to where the numerics job has reported (end of the last period written).
CREATE TABLE hl7_feed_cursor (
    feed       text        PRIMARY KEY,
    done_until timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON hl7_outbox, hl7_feed_cursor TO vitalgate_gateway;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO vitalgate_gateway;
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]


async def _up_to_date(conn: asyncpg.Connection) -> bool:
    """Every migration recorded: nothing to create, so a role without DDL rights may start too."""
    if await conn.fetchval("SELECT to_regclass('schema_version') IS NULL"):
        return False
    if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"):
        return False
    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
    return all(version in done for version, _, _ in MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    if await _up_to_date(conn):
        return []
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
