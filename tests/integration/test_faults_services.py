"""The failure suite's service faults under QoS 1 load: a broker restart, a database restart
followed by a database refusing connections for 60 s, SIGTERM, and device clocks that jump.
Each test fails on a reading lost or duplicated and prints the fault with its recovery time."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import pytest

from gateway.model import Flag
from tests.harness import PostgresCluster, wait_for
from tests.integration.faults import Load, Readyz, report
from tests.integration.support import Publisher, encode, expected_readings, fetch_readings, pulse_ox_envelopes, topic
from tests.integration.test_db_restart_race import PacedThroughRestarts
from tests.integration.test_ingest import assert_exactly_once, count, fetch, wait_ingests

pytestmark = pytest.mark.integration

REFUSE_S = 60


def test_broker_restart_under_load_session_survives(db_dsn, broker, gateway_factory):
    gw = gateway_factory(db_dsn)
    gw.start()
    envelopes = pulse_ox_envelopes(20, 150)  # 10 s at 300/s
    publisher = PacedThroughRestarts(broker.port, [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)], 300)
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > 500, timeout=60)
    broker.restart()  # persistence on: the gateway's session and its queued messages survive
    t0 = time.monotonic()
    wait_for(lambda: gw.log_since_start().count("Subscribed.") >= 2, timeout=60, interval=0.05,
             message=lambda: gw.log_tail())
    resubscribed = time.monotonic() - t0
    stored = count(db_dsn, "SELECT count(*) FROM ingests")
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > stored, timeout=60, interval=0.05)
    committed = time.monotonic() - t0
    publisher.wait_acked(120)
    wait_ingests(db_dsn, len(envelopes), timeout=120, gw=gw)
    assert_exactly_once(db_dsn, envelopes)
    assert "MQTT connection lost; reconnecting." in gw.log_text()
    report("mosquitto restarted (persistence on) under QoS 1 load", resubscribed_after=resubscribed,
           next_commit_after=committed)
    assert gw.terminate() == 0


def test_database_restart_then_60s_refusing_connections_nothing_lost_memory_bounded(broker, gateway_factory):
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-refuse-")))
    try:
        cluster.start()
        dsn = cluster.create_database("refuse")
        cluster.psql("CREATE ROLE vg_gateway LOGIN SUPERUSER")  # refused by pg_hba below; the test's role is not
        gw_dsn = dsn.replace("postgres@", "vg_gateway@")
        gw = gateway_factory(gw_dsn, env={"VITALGATE_RETRY_MAX_S": "2"})
        gw.start()
        readyz = Readyz(gw.metrics_port)
        readyz.wait(True, 30)
        load = Load(broker.port, devices=20, per_device=500, per_second=120)  # ~85 s of load through both faults
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > 300, timeout=60)

        # 1. pg_ctl restart -m fast under load
        stored = count(dsn, "SELECT count(*) FROM ingests")
        t0 = time.monotonic()
        cluster.restart()
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > stored, timeout=60, interval=0.1,
                 message=lambda: gw.log_tail())
        restart_commit = time.monotonic() - t0

        # 2. the database refuses the gateway's connections for 60 s (pg_hba reject, reload, sessions ended)
        hba = cluster.data_dir / "pg_hba.conf"
        original = hba.read_text()
        hba.write_text("host all vg_gateway 127.0.0.1/32 reject\n" + original)
        cluster.psql("SELECT pg_reload_conf()")
        rss_before = gw.rss_bytes()
        cluster.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'vg_gateway'")
        refused_at = time.monotonic()
        not_ready = readyz.wait(False, 30, failing="database")
        rss_max = rss_before
        def refused_long_enough() -> bool:
            nonlocal rss_max
            assert gw.alive(), gw.log_tail()
            rss_max = max(rss_max, gw.rss_bytes())
            return time.monotonic() - refused_at >= REFUSE_S
        wait_for(refused_long_enough, timeout=REFUSE_S + 5, interval=0.5)
        readyz()
        assert not readyz.check("database")["ok"], readyz.seen[-1]
        stored = count(dsn, "SELECT count(*) FROM ingests")
        hba.write_text(original)
        cluster.psql("SELECT pg_reload_conf()")
        t1 = time.monotonic()
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > stored, timeout=90, interval=0.1,
                 message=lambda: gw.log_tail())
        refuse_commit = time.monotonic() - t1
        refuse_ready = readyz.wait(True, 60) + refuse_commit

        load.join(180)
        wait_ingests(dsn, len(load.envelopes), timeout=180, gw=gw)
        assert asyncio.run(fetch_readings(dsn)) == expected_readings(load.envelopes), "a reading lost or duplicated"
        assert count(dsn, "SELECT count(*) FROM ingests") == len(load.envelopes)
        assert rss_max - rss_before < 64 << 20, (rss_before >> 20, rss_max >> 20)
        assert "Task failed; stopping." not in gw.log_text()
        report(f"pg_ctl restart -m fast under load, then pg_hba rejecting the gateway for {REFUSE_S} s",
               restart_next_commit_after=restart_commit, refused_not_ready_after=not_ready,
               refused_first_commit_after_allowed=refuse_commit, refused_ready_after_allowed=refuse_ready)
        print(f"resident memory while refused: {rss_before >> 20} MiB -> max {rss_max >> 20} MiB")
        assert gw.terminate() == 0
    finally:
        cluster.cleanup()


def test_sigterm_under_load_drains_exits_0_and_a_restart_stores_the_rest_once(db_dsn, broker, gateway_factory):
    client_id = f"gw-faults-sigterm-{time.monotonic_ns()}"
    gw = gateway_factory(db_dsn, client_id=client_id)
    gw.start()
    load = Load(broker.port, devices=40, per_device=100, per_second=800)
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > 500, timeout=60)
    t0 = time.monotonic()
    assert gw.terminate(timeout=40) == 0
    drained = time.monotonic() - t0
    assert "drained=True" in gw.log_text()
    load.join(120)
    gw2 = gateway_factory(db_dsn, client_id=client_id)
    t1 = time.monotonic()
    gw2.start()
    wait_ingests(db_dsn, len(load.envelopes), timeout=120, gw=gw2)
    caught_up = time.monotonic() - t1
    assert_exactly_once(db_dsn, load.envelopes)
    report("SIGTERM under QoS 1 load, then a restart on the same session", exited_0_after=drained,
           backlog_stored_after_restart=caught_up)
    assert gw2.terminate() == 0


def test_device_clock_jumping_forward_and_back_is_flagged_and_stored(db_dsn, broker, gateway_factory):
    gw = gateway_factory(db_dsn)
    gw.start()
    now = int(time.time()) * 1000
    jumps = [now - 3000, now + 3_600_000, now - 2000, now - 3 * 86_400_000, now - 1000]  # +1 h, back, -3 days, back
    envelopes = [{"v": 1, "device_id": "po-clock", "seq": i, "profile": "pulse_oximeter", "sent_at": t,
                  "numerics": [{"t": t, "values": {"spo2": 97, "pulse_rate": 70}}]} for i, t in enumerate(jumps)]
    pub = Publisher(broker.port)
    for i, e in enumerate(envelopes):
        pub.publish(topic(e), encode(e, i))
        pub.wait_acked()  # one at a time: arrival order is the device's order
    pub.close()
    t0 = time.monotonic()
    wait_ingests(db_dsn, len(envelopes), timeout=60, gw=gw)
    stored = time.monotonic() - t0
    rows = fetch(db_dsn, "SELECT (extract(epoch FROM time) * 1000)::bigint AS t, flags FROM readings "
                         "WHERE metric = 'spo2' ORDER BY ingest_id")
    CLOCK_FUTURE, CLOCK_STALE, OUT_OF_ORDER = int(Flag.CLOCK_FUTURE), int(Flag.CLOCK_STALE), int(Flag.OUT_OF_ORDER)
    clock = CLOCK_FUTURE | CLOCK_STALE | OUT_OF_ORDER  # the jump forward also makes a GAP (and spo2 97 for 1 h a FLATLINE)
    assert [(r["t"], r["flags"] & clock) for r in rows] == [
        (jumps[0], 0), (jumps[1], CLOCK_FUTURE), (jumps[2], OUT_OF_ORDER), (jumps[3], CLOCK_STALE | OUT_OF_ORDER),
        (jumps[4], OUT_OF_ORDER)]
    assert asyncio.run(fetch_readings(db_dsn)) == expected_readings(envelopes)
    report("device clock jumped +1 h, back, -3 days, back (flagged CLOCK_FUTURE, OUT_OF_ORDER, CLOCK_STALE)",
           all_stored_after_the_last_puback=stored)
    assert gw.terminate() == 0
