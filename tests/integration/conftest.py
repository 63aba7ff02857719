"""Fixtures for tests that run the real gateway against throwaway PostgreSQL and mosquitto."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, Mosquitto

_ids = itertools.count(1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of this test's own: no session, queue or stray publisher of another test reaches it."""
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def gateway_factory(tmp_path: Path, broker: Mosquitto, request: pytest.FixtureRequest) -> Iterator:
    """Make GatewayProcess objects bound to this test's broker; all are stopped at the end."""
    made: list[GatewayProcess] = []

    def make(db_dsn: str, *, env: dict[str, str] | None = None, client_id: str | None = None) -> GatewayProcess:
        cid = client_id or f"gw-{request.node.name[:40]}-{next(_ids)}-{time.monotonic_ns()}"
        gw = GatewayProcess(tmp_path / f"gw{len(made)}" / "gateway.log", database_url=db_dsn, mqtt_url=broker.url,
                            client_id=cid, env=env)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
