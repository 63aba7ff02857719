"""Migration 7: HL7 feed: hl7_outbox (store and forward) and hl7_feed_cursor."""

VERSION = 7
DESCRIPTION = 'HL7 feed: hl7_outbox (store and forward) and hl7_feed_cursor'
SQL = """
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
"""
