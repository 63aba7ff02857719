"""Migration 2: device registry, API keys, append-only audit_log, role vitalgate_gateway."""

VERSION = 2
DESCRIPTION = 'device registry, API keys, append-only audit_log, role vitalgate_gateway'
SQL = """
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
"""
