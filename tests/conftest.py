"""Session-wide throwaway services for integration tests (see tests/harness/services.py).

Fixtures:
    pg_cluster: one PostgreSQL 15 + TimescaleDB cluster per session.
    mosquitto: one mosquitto broker per session; a test that stops or restarts it
        must leave it running.
    db_dsn: a fresh, uniquely named, empty database on ``pg_cluster`` per test (no
        extension created: the app runs ``CREATE EXTENSION timescaledb`` itself),
        dropped afterwards.

Subfolders add their own fixtures in their own conftest files.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Mosquitto, PostgresCluster

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A running PostgresCluster shared by the whole session."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-pg-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """A running Mosquitto broker shared by the whole session."""
    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="vitalgate-mqtt-")))
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def db_dsn(pg_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """DSN of a new empty database named after the test, dropped (WITH FORCE) afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    name = f"t{next(_database_numbers):04d}_{slug}"[:63]
    dsn = pg_cluster.create_database(name)
    yield dsn
    if pg_cluster.is_running():  # a test that killed the cluster and failed has no database to drop
        pg_cluster.drop_database(name)
