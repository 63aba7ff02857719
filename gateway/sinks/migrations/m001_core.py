"""Migration 1: core tables: ingests, readings, waveform_blocks, alerts, rejected."""

VERSION = 1
DESCRIPTION = 'core tables: ingests, readings, waveform_blocks, alerts, rejected'
SQL = """
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
"""
