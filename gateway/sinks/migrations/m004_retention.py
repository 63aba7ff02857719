"""Migration 4: legal holds, held-row tables and the *_all views, audit_log_prune()."""

VERSION = 4
DESCRIPTION = 'legal holds, held-row tables and the *_all views, audit_log_prune()'
SQL = """
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
"""
