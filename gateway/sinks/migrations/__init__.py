"""The schema's migrations, one module each, in the order they are applied.

A migration is never edited once released: a change is a new module, appended here. Each
module has ``VERSION``, ``DESCRIPTION`` and ``SQL``; ``gateway.sinks.schema.migrate`` applies
the ones not yet recorded in ``schema_version``.
"""

from __future__ import annotations

from gateway.sinks.migrations import (
    m001_core,
    m002_registry,
    m003_read_side,
    m004_retention,
    m005_source_names,
    m006_rejected_once,
    m007_hl7_outbox,
)

__all__ = ["MIGRATIONS"]

MIGRATIONS: tuple[tuple[int, str, str], ...] = tuple(
    (m.VERSION, m.DESCRIPTION, m.SQL) for m in (m001_core, m002_registry, m003_read_side, m004_retention, m005_source_names, m006_rejected_once, m007_hl7_outbox)
)
