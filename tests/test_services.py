"""The throwaway services behave as the integration tests and the bench rely on.

PostgreSQL: TimescaleDB loads in a fresh database, and committed data survives a killed
server. mosquitto: a persistent session keeps its queued QoS 1 messages across a broker
restart (graceful or killed), the queue is not capped at mosquitto's default 1,000
messages, and one MQTT 3.1.1 subscriber can hold thousands of messages unacknowledged.
Nothing leaks: no process and no zombie is left after cleanup.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest

from tests.harness import Mosquitto, PostgresCluster, wait_for

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- helpers


def _processes_under(base_dir: Path) -> dict[int, str]:
    """Live processes whose working directory is inside ``base_dir`` (every service process is)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == str(base_dir) or cwd.startswith(f"{base_dir}/"):
            found[int(entry)] = cmdline.strip()
    return found


def _assert_gone(pids: dict[int, str]) -> None:
    """None of ``pids`` exists any more, not even as a zombie (this machine's PID 1 never reaps)."""
    left = {pid: cmd for pid, cmd in pids.items() if os.path.exists(f"/proc/{pid}")}
    assert left == {}, f"service processes left behind (zombies included): {left}"


@pytest.fixture
def private_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, for tests that crash it (the session one stays untouched)."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-pg-")))
    try:
        yield cluster
    finally:
        pids = _processes_under(cluster.base_dir)
        cluster.cleanup()
    assert not cluster.base_dir.exists()
    _assert_gone(pids)


@pytest.fixture
def private_broker() -> Iterator[Mosquitto]:
    """A broker of the test's own, for tests that restart or kill it."""
    broker = Mosquitto(Path(tempfile.mkdtemp(prefix="vitalgate-mqtt-")))
    try:
        yield broker
    finally:
        pids = _processes_under(broker.base_dir)
        broker.cleanup()
    assert not broker.base_dir.exists()
    _assert_gone(pids)


class _Client:
    """A paho MQTT 3.1.1 client on its own network thread, recording what it receives."""

    def __init__(self, broker: Mosquitto, client_id: str, *, clean_session: bool, manual_ack: bool = False) -> None:
        self.broker = broker
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=manual_ack,  # set before connecting: redelivery starts right after CONNACK
        )
        self.client.max_inflight_messages_set(1000)  # outgoing window of this client as a publisher
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self._lock = threading.Lock()
        self._payloads: list[bytes] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            self.session_present = bool(flags.session_present)
            self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):  # type: ignore[no-untyped-def]
        self.subscribed.set()

    def _on_message(self, client, userdata, message):  # type: ignore[no-untyped-def]
        with self._lock:
            self._payloads.append(message.payload)

    @property
    def payloads(self) -> list[bytes]:
        with self._lock:
            return list(self._payloads)

    def connect(self) -> _Client:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, message=f"CONNACK from {self.broker.url}")
        return self

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        wait_for(self.subscribed.is_set, 10, message=f"SUBACK for {topic}")

    def publish_all(self, topic: str, payloads: list[bytes]) -> None:
        """Publish at QoS 1 and return once the broker acknowledged every message."""
        infos = [self.client.publish(topic, payload, qos=1) for payload in payloads]
        wait_for(lambda: all(info.is_published() for info in infos), 30, message=f"PUBACK for {len(infos)} messages")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _payloads(n: int) -> list[bytes]:
    return [f"msg-{i:06d}".encode() for i in range(n)]


# --------------------------------------------------------------------------- PostgreSQL


def test_db_dsn_is_a_fresh_empty_database(pg_cluster: PostgresCluster, db_dsn: str) -> None:
    name = db_dsn.rsplit("/", 1)[1]
    assert db_dsn == pg_cluster.dsn(name)
    assert name.startswith("t") and "fresh_empty" in name
    assert pg_cluster.psql("SELECT string_agg(extname, ',') FROM pg_extension", name) == "plpgsql"
    assert pg_cluster.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", name) == "0"


@pytest.mark.asyncio
async def test_timescaledb_hypertable_in_fresh_database(db_dsn: str) -> None:
    con = await asyncpg.connect(db_dsn)
    try:
        settings = {
            name: await con.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes", "timescaledb.telemetry_level")
        }
        assert settings == {
            "fsync": "off",
            "synchronous_commit": "on",
            "full_page_writes": "off",
            "timescaledb.telemetry_level": "off",
        }
        await con.execute("CREATE EXTENSION timescaledb")
        await con.execute(
            "CREATE TABLE readings (time timestamptz NOT NULL, device_id text NOT NULL,"
            " metric text NOT NULL, value double precision)"
        )
        await con.execute("SELECT create_hypertable('readings', by_range('time', INTERVAL '1 hour'))")
        t0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
        rows = [(t0 + timedelta(minutes=m), "po-000001", "spo2", 97.0) for m in range(0, 180, 5)]
        await con.copy_records_to_table("readings", records=rows)
        assert await con.fetchval("SELECT count(*) FROM readings") == len(rows)
        assert await con.fetchval("SELECT count(*) FROM show_chunks('readings')") == 3
    finally:
        await con.close()


def test_killed_cluster_recovers_committed_data(private_cluster: PostgresCluster) -> None:
    cluster = private_cluster
    cluster.start()
    dsn = cluster.create_database("crash")
    port = cluster.port
    cluster.psql("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)", "crash")
    cluster.psql("INSERT INTO t VALUES (1001)", "crash")  # committed just before the crash

    pids = _processes_under(cluster.base_dir)
    assert len(pids) >= 5, pids  # reaper, postmaster, checkpointer, walwriter, TimescaleDB launcher, ...
    cluster.kill()
    assert not cluster.is_running()
    _assert_gone(pids)

    cluster.restart()
    assert cluster.is_running()
    assert cluster.port == port and cluster.dsn("crash") == dsn
    assert cluster.psql("SELECT count(*), max(x) FROM t", "crash") == "1001|1001"
    assert "automatic recovery in progress" in cluster.log_path.read_text()

    pids = _processes_under(cluster.base_dir)
    cluster.stop()
    assert not cluster.is_running()
    _assert_gone(pids)
    cluster.start()
    assert cluster.psql("SELECT count(*) FROM t", "crash") == "1001"


# --------------------------------------------------------------------------- mosquitto


def test_session_broker_delivers_qos1(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    sub = _Client(mosquitto, "svc-basic-sub", clean_session=True).connect()
    pub = _Client(mosquitto, "svc-basic-pub", clean_session=True).connect()
    try:
        sub.subscribe("svc/basic/#")
        pub.publish_all("svc/basic/1", [b"hello"])
        wait_for(lambda: sub.payloads == [b"hello"], 10, message="the message at the subscriber")
    finally:
        pub.close()
        sub.close()


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_persistent_session_survives_broker_restart(private_broker: Mosquitto, how: str) -> None:
    """3,000 messages (over mosquitto's default 1,000 queue limit) queued for an offline session survive."""
    broker = private_broker
    broker.start()
    port = broker.port
    sub = _Client(broker, "svc-persistent-sub", clean_session=False).connect()
    assert sub.session_present is False
    sub.subscribe("svc/persistent/#")
    sub.close()

    expected = _payloads(3000)
    pub = _Client(broker, "svc-persistent-pub", clean_session=True).connect()
    pub.publish_all("svc/persistent/dev-1", expected)
    pub.close()
    queued_at = time.time_ns()

    if how == "kill":
        # Only what the last autosave wrote survives SIGKILL: wait for a save after the PUBACKs.
        wait_for(
            lambda: broker.db_path.exists() and broker.db_path.stat().st_mtime_ns > queued_at,
            10,
            message="an autosave of the persistence file after the messages were queued",
        )
        pids = _processes_under(broker.base_dir)
        assert len(pids) == 2, pids  # reaper, mosquitto
        broker.kill()
        assert not broker.is_running()
        _assert_gone(pids)
        broker.start()
    else:
        broker.restart()
    assert broker.is_running() and broker.port == port

    sub = _Client(broker, "svc-persistent-sub", clean_session=False).connect()
    try:
        assert sub.session_present is True
        wait_for(
            lambda: len(sub.payloads) >= len(expected), 30, message=lambda: f"3000 messages, got {len(sub.payloads)}"
        )
        assert sorted(set(sub.payloads)) == expected
    finally:
        sub.close()


def test_subscriber_holds_thousands_unacknowledged(mosquitto: Mosquitto) -> None:
    """A manual-ack 3.1.1 subscriber gets 5,000 QoS 1 messages before it acknowledges any."""
    sub = _Client(mosquitto, "svc-inflight-sub", clean_session=True, manual_ack=True).connect()
    pub = _Client(mosquitto, "svc-inflight-pub", clean_session=True).connect()
    try:
        sub.subscribe("svc/inflight/#")
        expected = _payloads(5000)
        pub.publish_all("svc/inflight/dev-1", expected)
        wait_for(
            lambda: len(sub.payloads) >= len(expected),
            30,
            message=lambda: f"5000 unacknowledged messages in flight, got {len(sub.payloads)}",
        )
        assert sub.payloads == expected  # in order, none dropped
    finally:
        pub.close()
        sub.close()
