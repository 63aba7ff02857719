"""Network faults with the gateway in a network namespace of its own: links that drop
packets without a reset (a firewall, a dead switch), the kind a process kill never shows.

The gateway reaches PostgreSQL over one veth link and mosquitto over another (``Netns``);
the test and the devices use the services' loopback addresses in the root namespace. A
black-holed link answers nothing and resets nothing: a connection that was open stays
"established" on the gateway's side until its own deadlines say otherwise (TCP user
timeout and keepalive on database connections, the MQTT keepalive on the broker's).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import GatewayProcess, Mosquitto, Netns, PostgresCluster, free_port, wait_for
from tests.integration.faults import Load, Readyz, report
from tests.integration.support import expected_readings, fetch_readings
from tests.integration.test_ingest import count, wait_ingests

pytestmark = pytest.mark.integration

DB_NET, MQTT_NET = "10.232.1", "10.232.2"
DB_CUT_S = 30
KEEPALIVE_S = 5


@pytest.fixture
def netns():
    ns = Netns(f"{os.getpid() % 10000}")
    try:
        yield ns.create()
    finally:
        ns.cleanup()


def test_database_then_broker_links_black_holed_nothing_lost_readiness_follows(tmp_path: Path, netns: Netns):
    db_addr, _ = netns.link("db", DB_NET)
    mq_addr, _ = netns.link("mq", MQTT_NET)
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-netfault-")),
                              settings={"listen_addresses": f"127.0.0.1,{db_addr}"})
    mq_port = free_port()
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=(f"listener {mq_port} {mq_addr}",))
    gw = None
    try:
        cluster.start()
        with (cluster.data_dir / "pg_hba.conf").open("a") as f:
            f.write(f"host all all {DB_NET}.0/24 trust\n")
        cluster.psql("SELECT pg_reload_conf()")
        broker.start()
        dsn = cluster.create_database("netfault")
        metrics_port = free_port()
        gw = GatewayProcess(
            tmp_path / "gw" / "gateway.log", database_url=dsn.replace("127.0.0.1", db_addr),
            mqtt_url=f"mqtt://{mq_addr}:{mq_port}", client_id=f"gw-net-{time.monotonic_ns()}",
            python_args=netns.python_prefix(), metrics_port=0,  # /metrics lives in the namespace: probed below
            env={"VITALGATE_METRICS_PORT": str(metrics_port), "VITALGATE_MQTT_KEEPALIVE_S": str(KEEPALIVE_S),
                 "VITALGATE_RETRY_MAX_S": "2"})
        gw.start()
        readyz = Readyz(metrics_port, via=netns.call)
        readyz.wait(True, 30)
        load = Load(broker.port, devices=20, per_device=450, per_second=150)  # ~60 s of load through both faults
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > 500, timeout=60)

        # 1. the database link drops everything for DB_CUT_S seconds
        netns.cut("db")
        cut_at = time.monotonic()
        detected = readyz.wait(False, 15, failing="database")
        assert gw.alive(), gw.log_tail()
        wait_for(lambda: time.monotonic() - cut_at >= DB_CUT_S and gw.alive(), timeout=DB_CUT_S + 5, interval=0.5)
        readyz()
        assert not readyz.check("database")["ok"], readyz.seen[-1]
        stored = count(dsn, "SELECT count(*) FROM ingests")
        netns.heal("db")
        healed_at = time.monotonic()
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > stored, timeout=60, interval=0.1,
                 message=lambda: f"no commit after the database link came back\n{gw.log_tail()}")
        db_commit_s = time.monotonic() - healed_at
        db_ready_s = readyz.wait(True, 60) + db_commit_s

        # 2. the broker link drops everything: the MQTT keepalive notices, the session survives
        netns.cut("mq")
        mq_cut_at = time.monotonic()
        mq_detected = readyz.wait(False, 4 * KEEPALIVE_S, failing="broker")
        assert "not connected" in readyz.check("broker")["detail"], readyz.seen[-1]
        wait_for(lambda: time.monotonic() - mq_cut_at >= 3 * KEEPALIVE_S, timeout=4 * KEEPALIVE_S, interval=0.5)
        netns.heal("mq")
        mq_ready_s = readyz.wait(True, 60)

        load.join(180)
        wait_ingests(dsn, len(load.envelopes), timeout=180, gw=gw)
        assert asyncio.run(fetch_readings(dsn)) == expected_readings(load.envelopes), "a reading lost or duplicated"
        assert count(dsn, "SELECT count(*) FROM ingests") == len(load.envelopes)
        log = gw.log_text()
        assert "Task failed; stopping." not in log
        assert "MQTT connection lost; reconnecting." in log
        report(f"database link black-holed {DB_CUT_S} s (veth down, no reset), then the broker link "
               f"{3 * KEEPALIVE_S} s (MQTT keepalive {KEEPALIVE_S} s)",
               db_not_ready_after=detected, db_first_commit_after_heal=db_commit_s, db_ready_after_heal=db_ready_s,
               broker_not_ready_after=mq_detected, broker_ready_after_heal=mq_ready_s)
        assert gw.terminate() == 0
    finally:
        if gw is not None:
            gw.stop()
        broker.cleanup()
        cluster.cleanup()
