"""`vitalgate db migrate` against a real database: creates the schema once, then is a no-op."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.cli import main
from tests.util import free_port

pytestmark = pytest.mark.integration


def test_db_migrate_is_idempotent_and_records_the_version(db_dsn, monkeypatch, capsys):
    monkeypatch.setenv("VITALGATE_DATABASE_URL", db_dsn)
    assert main(["db", "migrate"]) == 0
    assert "Applied migrations 1, 2, 3; schema version 3." in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0
    assert "Schema is up to date (version 3)." in capsys.readouterr().out

    async def inspect() -> tuple[list, list]:
        conn = await asyncpg.connect(db_dsn)
        try:
            versions = await conn.fetch("SELECT version FROM schema_version")
            hypertables = await conn.fetch("SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1")
            return [r[0] for r in versions], [r[0] for r in hypertables]
        finally:
            await conn.close()

    versions, hypertables = asyncio.run(inspect())
    assert versions == [1, 2, 3]
    assert hypertables == ["readings", "readings_1m", "waveform_blocks"]


def test_db_migrate_names_the_database_it_cannot_reach(monkeypatch, capsys):
    monkeypatch.setenv("VITALGATE_DATABASE_URL", f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("VITALGATE_DATABASE_CONNECT_TIMEOUT_S", "2")
    assert main(["db", "migrate"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to postgresql://postgres:***@127.0.0.1:" in err
    assert "secret" not in err
