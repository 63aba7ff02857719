"""Migration 5: ingests.source checks the form of a transport name, not a fixed list."""

from gateway.model import SOURCE_NAME_PATTERN

VERSION = 5
DESCRIPTION = 'ingests.source checks the form of a transport name, not a fixed list'
SQL = f"""
ALTER TABLE ingests DROP CONSTRAINT IF EXISTS ingests_source_check;
ALTER TABLE ingests ADD CONSTRAINT ingests_source_name CHECK (source ~ '{SOURCE_NAME_PATTERN}');
"""
