"""``vitalgate db migrate``: create or upgrade the schema."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import add_config_option, connect, load_config
from gateway.sinks.schema import SCHEMA_VERSION, migrate

__all__ = ["add_parser"]


async def _migrate(args: argparse.Namespace) -> None:
    async with connect(load_config(args)) as conn:
        applied = await migrate(conn)
    if applied:
        print(f"Applied migrations {', '.join(map(str, applied))}; schema version {SCHEMA_VERSION}.")
    else:
        print(f"Schema is up to date (version {SCHEMA_VERSION}).")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``db`` (with its ``migrate`` action) on the top-level subparsers."""
    p = subparsers.add_parser("db", help="database administration", description="Database administration.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    mig = add_config_option(actions.add_parser(
        "migrate", help="create or upgrade the schema (idempotent)",
        description="Create the TimescaleDB extension, the tables of PROTOCOL section 3 and their indexes, "
        "and record the schema version. Running it again changes nothing.",
        epilog="exit status: 0 done (or nothing to do); 2 invalid configuration, or the database cannot be "
        "reached or refuses the migration.",
    ))
    mig.set_defaults(func=_migrate, prog=mig.prog)
    return p
