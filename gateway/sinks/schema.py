"""Database schema (PROTOCOL section 3) as numbered migrations.

``migrate(conn)`` applies the ones not yet recorded in ``schema_version`` in one
transaction (all or none), under an advisory lock so that several workers starting at once
do not race. Re-running it is a no-op. A migration is never edited once released: a change is a
new module appended to ``gateway.sinks.migrations``.

Migration 2 creates the role ``vitalgate_gateway`` (cluster-wide, so the migrating user
needs CREATEROLE, as the owner of a managed database usually has) with the privileges the
gateway needs and no more: it may insert into ``audit_log`` but not change or delete its
rows, and it only reads the registry. Tables of later migrations must be granted there too.
"""

from __future__ import annotations

import asyncpg

from gateway.sinks.migrations import MIGRATIONS

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

_LOCK_KEY = 0x76697461  # "vita"

SCHEMA_VERSION = MIGRATIONS[-1][0]


async def _up_to_date(conn: asyncpg.Connection) -> bool:
    """Every migration recorded: nothing to create, so a role without DDL rights may start too."""
    if await conn.fetchval("SELECT to_regclass('schema_version') IS NULL"):
        return False
    if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"):
        return False
    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
    return all(version in done for version, _, _ in MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; return the versions applied (empty when up to date)."""
    if await _up_to_date(conn):
        return []
    await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                   version     integer PRIMARY KEY,
                   description text        NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, description, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_version (version, description) VALUES ($1, $2)", version, description
            )
            applied.append(version)
    return applied
