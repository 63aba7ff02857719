"""Fixtures for tests that run the real gateway against throwaway PostgreSQL and mosquitto."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import orjson
import pytest

from tests.gwproc import GatewayProcess
from tests.services import Mosquitto

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
        gw = GatewayProcess(tmp_path / f"gw{len(made)}", db_dsn=db_dsn, mqtt_url=broker.url, client_id=cid, env=env)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def pulse_ox_envelopes(n_devices: int, per_device: int, *, t0: int | None = None, prefix: str = "po") -> list[dict]:
    """Deterministic pulse-oximeter envelopes, device-interleaved; every 10th carries a pleth block."""
    t0 = t0 if t0 is not None else (int(time.time()) - 3600) * 1000
    out = []
    for s in range(per_device):
        for d in range(n_devices):
            t = t0 + s * 1000
            env: dict = {
                "v": 1,
                "device_id": f"{prefix}-{d:05d}",
                "seq": s,
                "profile": "pulse_oximeter",
                "firmware": "2.4.1",
                "sent_at": t + 50,
                "numerics": [{"t": t, "values": {"spo2": 90 + (s + d) % 10, "pulse_rate": 60 + (7 * s + d) % 40}}],
            }
            if (s + d) % 10 == 0:
                env["waveforms"] = [
                    {"metric": "pleth", "t0": t, "hz": 125.0, "samples": [round(0.5 + 0.01 * k, 3) for k in range(25)]}
                ]
            out.append(env)
    return out


def encode(env: dict, i: int) -> bytes:
    """JSON for even i, MessagePack for odd i."""
    return orjson.dumps(env) if i % 2 == 0 else msgspec.msgpack.encode(env)


def topic(env: dict) -> str:
    return f"devices/{env['device_id']}/telemetry"
