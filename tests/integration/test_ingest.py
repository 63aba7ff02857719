"""The core ingestion path against real TimescaleDB and mosquitto: exactly once, provenance, faults.

Every test publishes with a real MQTT client, runs the real ``vitalgate run`` process,
and reads back what PostgreSQL holds.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest

from tests.harness import PostgresCluster, wait_for
from tests.integration.support import Publisher, encode, expected_readings, fetch_readings, publish_paced, pulse_ox_envelopes, sha256, topic

pytestmark = pytest.mark.integration


def count(dsn: str, sql: str) -> int:
    async def q() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(q())


def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    async def q() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    return asyncio.run(q())


def wait_ingests(dsn: str, n: int, timeout: float, gw=None) -> None:  # noqa: ANN001
    def done() -> bool:
        if gw is not None and not gw.alive():
            raise AssertionError(f"gateway died:\n{gw.log_tail()}")
        return count(dsn, "SELECT count(*) FROM ingests") >= n

    wait_for(done, timeout=timeout, interval=0.25,
             message=lambda: f"ingests has {count(dsn, 'SELECT count(*) FROM ingests')} of {n}")


def assert_exactly_once(dsn: str, envelopes: list[dict]) -> None:
    got = asyncio.run(fetch_readings(dsn))
    want = expected_readings(envelopes)
    missing = want - got
    extra = got - want
    assert not missing, f"{sum(missing.values())} readings missing, e.g. {list(missing)[:3]}"
    assert not extra, f"{sum(extra.values())} readings extra or duplicated, e.g. {list(extra)[:3]}"
    n_blocks = sum(len(e.get("waveforms", [])) for e in envelopes)
    assert count(dsn, "SELECT count(*) FROM waveform_blocks") == n_blocks
    assert count(dsn, "SELECT count(*) FROM ingests") == len(envelopes)


def test_20000_envelopes_from_200_devices_stored_exactly_once_with_provenance(db_dsn, broker, gateway_factory):
    envelopes = pulse_ox_envelopes(200, 100)
    payloads = [encode(e, i) for i, e in enumerate(envelopes)]
    gw = gateway_factory(db_dsn)
    gw.start()
    # MQTT 3.1.1 publisher: encoding told by the first byte; MQTT 5 publisher: by content type.
    v3 = Publisher(broker.port)
    v5 = Publisher(broker.port, protocol=mqtt.MQTTv5)
    for i, (env, payload) in enumerate(zip(envelopes, payloads)):
        if i % 4 == 3:
            v5.publish(topic(env), payload, content_type="application/json" if i % 2 == 0 else "application/msgpack")
        else:
            v3.publish(topic(env), payload)
    v3.wait_acked()
    v5.wait_acked()
    v3.close()
    v5.close()
    wait_ingests(db_dsn, len(envelopes), timeout=180, gw=gw)
    assert_exactly_once(db_dsn, envelopes)

    rows = {bytes(r["payload_sha256"]): r for r in fetch(db_dsn, "SELECT * FROM ingests")}
    assert len(rows) == len(envelopes)
    for env, payload in zip(envelopes, payloads):
        row = rows[sha256(payload)]
        assert row["device_id"] == env["device_id"]
        assert row["source"] == "mqtt"
        assert row["principal"] == env["device_id"]
        assert row["topic_or_path"] == topic(env)
        assert row["gateway_id"] == "test-gw"
        assert row["payload_bytes"] == len(payload)
        assert row["encoding"] == ("json" if payload[:1] == b"{" else "msgpack")
        assert (row["profile"], row["profile_version"]) == ("pulse_oximeter", "1.0.0")
        assert (row["firmware"], row["seq"]) == ("2.4.1", env["seq"])
        assert row["n_readings"] == 2 + len(env.get("waveforms", []))
    # every stored row points at the ingest of its own device
    assert count(db_dsn, "SELECT count(*) FROM readings r JOIN ingests i ON i.id = r.ingest_id WHERE i.device_id <> r.device_id") == 0
    assert count(db_dsn, "SELECT count(*) FROM readings r LEFT JOIN ingests i ON i.id = r.ingest_id WHERE i.id IS NULL") == 0
    sums = fetch(db_dsn, """SELECT i.id, i.n_readings, i.n_flagged,
                                   (SELECT count(*) FROM readings r WHERE r.ingest_id = i.id)
                                 + (SELECT count(*) FROM waveform_blocks w WHERE w.ingest_id = i.id) AS rows,
                                   (SELECT count(*) FROM readings r WHERE r.ingest_id = i.id AND r.flags <> 0)
                                 + (SELECT count(*) FROM waveform_blocks w WHERE w.ingest_id = i.id AND w.flags <> 0) AS flagged
                            FROM ingests i ORDER BY random() LIMIT 500""")
    for r in sums:
        assert (r["n_readings"], r["n_flagged"]) == (r["rows"], r["flagged"]), dict(r)
    samples = fetch(db_dsn, "SELECT samples FROM waveform_blocks LIMIT 1")[0]["samples"]
    assert samples == pytest.approx([0.5 + 0.01 * k for k in range(25)], abs=1e-6)
    assert gw.terminate() == 0


def test_redelivered_and_repeated_payloads_are_stored_once(db_dsn, broker, gateway_factory):
    envelopes = pulse_ox_envelopes(5, 20)
    payloads = [encode(e, i) for i, e in enumerate(envelopes)]
    gw = gateway_factory(db_dsn)
    gw.start()
    pub = Publisher(broker.port)
    for env, p in zip(envelopes, payloads):
        pub.publish(topic(env), p)
        pub.publish(topic(env), p)  # the same bytes again, as a device retry would send them
    pub.wait_acked()
    wait_ingests(db_dsn, len(envelopes), timeout=60, gw=gw)
    for env, p in zip(envelopes[:30], payloads[:30]):  # and once more after they were committed
        pub.publish(topic(env), p)
    pub.publish(topic(envelopes[0]), b"not json")  # a marker: once it is quarantined, the repeats were handled
    pub.wait_acked()
    pub.close()
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM rejected") == 1, timeout=60)
    assert_exactly_once(db_dsn, envelopes)
    assert gw.metric("gateway_envelopes_total") == len(envelopes) * 2 + 30 + 1


def test_sigkill_three_times_under_load_loses_and_duplicates_nothing(db_dsn, broker, gateway_factory):
    envelopes = pulse_ox_envelopes(100, 150)  # ~12 s of load at 1,200/s: room for three kills and restarts
    payloads = [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)]
    gw = gateway_factory(db_dsn, env={"VITALGATE_BATCH_MAX_ROWS": "400"})
    gw.start()
    rng = random.Random(20261126)
    publisher = publish_paced(broker.port, payloads, per_second=1200)
    kills = 0
    while kills < 3:
        # under load: some rows are committed, some batches are in flight
        baseline = count(db_dsn, "SELECT count(*) FROM ingests")
        wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > baseline + 200, timeout=60, interval=0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # a random point in the write cycle, not a wait for a condition
        gw.kill()
        kills += 1
        gw.start()
    publisher.join(120)
    assert not publisher.is_alive()
    wait_ingests(db_dsn, len(envelopes), timeout=180, gw=gw)
    assert_exactly_once(db_dsn, envelopes)
    assert gw.starts == 4
    assert gw.terminate() == 0


def test_postgres_down_20s_under_load_then_back_nothing_lost_memory_bounded(broker, gateway_factory):
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-outage-")))
    cluster.start()
    try:
        dsn = cluster.create_database("outage")
        receive_max = 1000
        gw = gateway_factory(dsn, env={"VITALGATE_MQTT_RECEIVE_MAXIMUM": str(receive_max)})
        gw.start()
        envelopes = pulse_ox_envelopes(50, 320)
        payloads = [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)]
        publisher = publish_paced(broker.port, payloads, per_second=400)  # ~40 s of load
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > 1000, timeout=60)
        rss_before = gw.rss_bytes()
        cluster.stop()
        down_at = time.monotonic()
        rss_max = 0
        in_flight_max = 0.0
        while time.monotonic() - down_at < 20:
            assert gw.alive(), gw.log_tail()
            rss_max = max(rss_max, gw.rss_bytes())
            in_flight_max = max(in_flight_max, gw.metric("gateway_in_flight_messages"))
            time.sleep(0.25)  # sampling period while the outage lasts
        cluster.start()
        publisher.join(120)
        assert not publisher.is_alive()
        wait_ingests(dsn, len(envelopes), timeout=180, gw=gw)
        assert_exactly_once(dsn, envelopes)
        # the broker held the backlog: the gateway never had more than receive_maximum unacked
        assert in_flight_max <= receive_max
        assert in_flight_max >= receive_max * 0.9, in_flight_max
        assert rss_max - rss_before < 64 * 1024 * 1024, (rss_before, rss_max)
        assert "Database unavailable; holding the batch and retrying." in gw.log_text()
        assert gw.terminate() == 0
    finally:
        cluster.cleanup()


def test_sigterm_under_load_drains_acks_and_exits_0(db_dsn, broker, gateway_factory):
    envelopes = pulse_ox_envelopes(40, 100)
    payloads = [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)]
    client_id = f"gw-sigterm-{time.monotonic_ns()}"
    gw = gateway_factory(db_dsn, client_id=client_id)
    gw.start()
    publisher = publish_paced(broker.port, payloads, per_second=1000)
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > 500, timeout=60)
    started = time.monotonic()
    assert gw.terminate(timeout=40) == 0
    assert time.monotonic() - started < 35
    log = gw.log_text()
    assert "drained=True" in log
    stored_at_stop = count(db_dsn, "SELECT count(*) FROM ingests")
    publisher.join(120)
    # what the stopped gateway did not take waits in its session; a restart stores it, once
    gw2 = gateway_factory(db_dsn, client_id=client_id)
    gw2.start()
    wait_ingests(db_dsn, len(envelopes), timeout=120, gw=gw2)
    assert stored_at_stop < len(envelopes)
    assert_exactly_once(db_dsn, envelopes)
    assert gw2.terminate() == 0


def test_broker_restart_gateway_reconnects_and_keeps_its_session(db_dsn, broker, gateway_factory):
    client_id = f"gw-broker-restart-{time.monotonic_ns()}"
    gw = gateway_factory(db_dsn, client_id=client_id)
    gw.start()
    first = pulse_ox_envelopes(10, 10, prefix="a")
    pub = Publisher(broker.port)
    for i, e in enumerate(first):
        pub.publish(topic(e), encode(e, i))
    pub.wait_acked()
    pub.close()
    wait_ingests(db_dsn, len(first), timeout=60, gw=gw)
    broker.restart()
    wait_for(lambda: gw.log_text().count("Subscribed.") >= 2, timeout=60, message=lambda: gw.log_tail())
    assert "MQTT connection lost; reconnecting." in gw.log_text()
    # stop the gateway; what is published meanwhile waits in its persistent session
    assert gw.terminate() == 0
    second = pulse_ox_envelopes(10, 10, prefix="b")
    pub = Publisher(broker.port)
    for i, e in enumerate(second):
        pub.publish(topic(e), encode(e, i))
    pub.wait_acked()
    pub.close()
    gw2 = gateway_factory(db_dsn, client_id=client_id)
    gw2.start()
    wait_ingests(db_dsn, len(first) + len(second), timeout=60, gw=gw2)
    assert_exactly_once(db_dsn, first + second)
    assert gw2.metric("gateway_messages_received_total") == len(second)
    assert gw2.terminate() == 0
    # the backlog redelivered right after CONNACK was acknowledged: a new session start gets nothing back
    gw3 = gateway_factory(db_dsn, client_id=client_id)
    gw3.start()
    marker = pulse_ox_envelopes(1, 1, prefix="c")
    pub = Publisher(broker.port)
    pub.publish(topic(marker[0]), encode(marker[0], 0))
    pub.wait_acked()
    pub.close()
    wait_ingests(db_dsn, len(first) + len(second) + 1, timeout=60, gw=gw3)
    assert gw3.metric("gateway_messages_received_total") == 1
    assert gw3.terminate() == 0
