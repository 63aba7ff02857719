"""`vitalgate db migrate` against a real database: creates the schema once, then is a no-op."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.cli import main
from gateway.sinks.schema import MIGRATIONS, SCHEMA_VERSION
from tests.harness import free_port

pytestmark = pytest.mark.integration
VERSIONS = [v for v, _, _ in MIGRATIONS]


def test_db_migrate_is_idempotent_and_records_the_version(db_dsn, monkeypatch, capsys):
    monkeypatch.setenv("VITALGATE_DATABASE_URL", db_dsn)
    assert main(["db", "migrate"]) == 0
    assert f"Applied migrations {', '.join(map(str, VERSIONS))}; schema version {SCHEMA_VERSION}." in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0
    assert f"Schema is up to date (version {SCHEMA_VERSION})." in capsys.readouterr().out

    async def inspect() -> tuple[list, list]:
        conn = await asyncpg.connect(db_dsn)
        try:
            versions = await conn.fetch("SELECT version FROM schema_version")
            hypertables = await conn.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1")
            return [r[0] for r in versions], [r[0] for r in hypertables]
        finally:
            await conn.close()

    versions, hypertables = asyncio.run(inspect())
    assert versions == VERSIONS
    assert hypertables == ["readings", "readings_1m", "waveform_blocks"]


def test_db_migrate_names_the_database_it_cannot_reach(monkeypatch, capsys):
    monkeypatch.setenv("VITALGATE_DATABASE_URL", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("VITALGATE_DATABASE_CONNECT_TIMEOUT_S", "2")
    assert main(["db", "migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitalgate db migrate: cannot connect to postgresql://postgres:***@127.0.0.1:")
    assert "secret" not in err


def test_ingests_take_any_source_name_of_the_right_form(db_dsn, monkeypatch):
    """Adding a source needs no migration: ingests.source checks the name's form, not a list."""
    monkeypatch.setenv("VITALGATE_DATABASE_URL", db_dsn)
    assert main(["db", "migrate"]) == 0
    insert = ("INSERT INTO ingests (received_at, device_id, source, gateway_id, topic_or_path, payload_sha256, payload_bytes,"
              " encoding, profile, profile_version, n_readings, n_flagged)"
              " VALUES (now(), 'po-1', $1, 'gw', 't', sha256(convert_to($1, 'UTF8')), 1, 'json', 'p', '1', 0, 0)")

    async def attempt(source: str) -> str:
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.execute(insert, source)
            return "stored"
        except asyncpg.CheckViolationError:
            return "refused"
        finally:
            await conn.close()

    assert [asyncio.run(attempt(s)) for s in ("mqtt", "nats", "udp_v2")] == ["stored"] * 3
    assert [asyncio.run(attempt(s)) for s in ("", "NATS", "x y", "a" * 33)] == ["refused"] * 4
