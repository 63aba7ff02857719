"""Cluster mode on one host: NATS JetStream (3 nodes) in front, gateways as processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, NatsCluster, vitalgate, wait_for
from tests.integration.support import Publisher, encode, expected_readings, fetch_readings, pulse_ox_envelopes, topic

pytestmark = pytest.mark.integration


@pytest.fixture
def nats_cluster(tmp_path: Path):
    c = NatsCluster(tmp_path / "nats", partitions=8)
    c.start()
    try:
        yield c
    finally:
        c.cleanup()


def cluster_env(c: NatsCluster, **more: str) -> dict[str, str]:
    return {"VITALGATE_MQTT_ENABLED": "false", "VITALGATE_NATS_ENABLED": "true", "VITALGATE_NATS_SERVERS": c.servers,
            "VITALGATE_NATS_PARTITIONS": str(c.partitions), **more}


def test_one_gateway_stores_what_devices_published(nats_cluster: NatsCluster, db_dsn: str, tmp_path: Path) -> None:
    env = cluster_env(nats_cluster)
    host, port = nats_cluster.mqtt_address(0)
    out = vitalgate(db_dsn, "cluster", "init", "--mqtt", f"{host}:{port}", env=env)
    assert "mappings" in out
    gw = GatewayProcess(tmp_path / "gw.log", database_url=db_dsn, gateway_id="gw-a", env=env, ready_line="Partition taken.")
    envs = pulse_ox_envelopes(20, 5)
    pub = Publisher(nats_cluster.mqtt_ports[1], client_id="dev-pub")
    for i, e in enumerate(envs):
        pub.publish(topic(e), encode(e, i))
    pub.wait_acked(60)
    pub.close()
    try:
        gw.start(timeout=60)
        want = expected_readings(envs)
        wait_for(lambda: asyncio.run(fetch_readings(db_dsn)) == want, 60, 0.5, "every reading stored once")
        status = vitalgate(db_dsn, "cluster", "status", env=env)
        assert "gw-a/" in status
    finally:
        assert gw.stop() == 0, gw.log_tail()
