"""Migration 6: rejected: one row per refused payload and origin (a redelivery adds none)."""

VERSION = 6
DESCRIPTION = 'rejected: one row per refused payload and origin (a redelivery adds none)'
SQL = """
-- A redelivered refused payload (MQTT redelivery, an HTTP retry) is the same refusal: keep
-- the first row of each (payload, source, topic or path, principal), then let the unique
-- index make the quarantine INSERT skip repeats (ON CONFLICT DO NOTHING).
DELETE FROM rejected r USING rejected first
 WHERE r.payload_sha256 = first.payload_sha256 AND r.source = first.source
   AND r.topic_or_path = first.topic_or_path AND coalesce(r.principal, '') = coalesce(first.principal, '')
   AND r.id > first.id;
CREATE UNIQUE INDEX rejected_once_idx ON rejected (payload_sha256, source, topic_or_path, (coalesce(principal, '')));
"""
