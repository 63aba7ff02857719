"""Migration 3: read side: associations (device -> patient over time), readings_1m rollups."""

VERSION = 3
DESCRIPTION = 'read side: associations (device -> patient over time), readings_1m rollups'
SQL = """
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
"""
