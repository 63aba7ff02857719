"""The memory bound: with the database down, intake pauses at the payload budget and the broker holds the rest.

``max_memory_mib = 224`` gives a budget of ``pending_budget(224)`` = 8 MiB of payloads.
The publisher sends about 1.5 times that in ICU-bed envelopes (10 numerics, ECG 250 Hz,
pleth 125 Hz, resp 62.5 Hz) while the database is stopped; the MQTT window (20,000
messages) is far larger, so only the pause can hold the gateway to its budget. The
database stays down for more than three keepalive intervals of 5 s, so a paused client
that let its keepalive lapse would be disconnected and show it.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import orjson
import pytest

from gateway.app import pending_budget
from tests.harness import PostgresCluster, wait_for
from tests.integration.support import Publisher, expected_readings, fetch_readings
from tests.integration.test_ingest import count, wait_ingests

pytestmark = pytest.mark.integration

MAX_MEMORY_MIB = 224
KEEPALIVE_S = 5
NUMERICS = {"heart_rate": 72, "resp_rate": 16, "spo2": 97, "pulse_rate": 72, "perfusion_index": 2.5,
            "nibp_sys": 120, "nibp_dia": 80, "nibp_mean": 93, "body_temp": 36.8, "etco2": 38}


def icu_envelope(d: int, s: int, t0: int) -> dict:
    t = t0 + s * 1000

    def wave(hz: float, f: float) -> list[float]:
        return [round(math.sin(2 * math.pi * f * k / hz + d), 4) for k in range(int(hz))]

    return {"v": 1, "device_id": f"icu-{d:04d}", "seq": s, "profile": "patient_monitor", "sent_at": t + 900,
            "numerics": [{"t": t, "values": {k: v + (s % 3) for k, v in NUMERICS.items()}}],
            "waveforms": [{"metric": "ecg_ii", "t0": t, "hz": 250.0, "samples": wave(250, 1.2)},
                          {"metric": "pleth", "t0": t, "hz": 125.0, "samples": wave(125, 1.2)},
                          {"metric": "resp", "t0": t, "hz": 62.5, "samples": wave(62.5, 0.25)}]}


def test_database_down_intake_pauses_at_the_budget_keepalive_holds_then_drains_once(broker, gateway_factory):
    budget = pending_budget(MAX_MEMORY_MIB)
    assert budget == 8 << 20
    t0 = (int(time.time()) - 600) * 1000
    envelopes = [icu_envelope(d, s, t0) for s in range(20) for d in range(170)]
    payloads = [orjson.dumps(e) for e in envelopes]
    total = sum(map(len, payloads))
    assert 1.4 * budget < total < 1.7 * budget, total

    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-membound-")))
    cluster.start()
    try:
        dsn = cluster.create_database("membound")
        gw = gateway_factory(dsn, env={"VITALGATE_MAX_MEMORY_MIB": str(MAX_MEMORY_MIB),
                                       "VITALGATE_MQTT_KEEPALIVE_S": str(KEEPALIVE_S)})
        gw.start()
        cluster.stop()
        pub = Publisher(broker.port)
        for e, p in zip(envelopes, payloads):
            pub.publish(f"devices/{e['device_id']}/telemetry", p)
        wait_for(lambda: gw.metric("gateway_intake_paused") == 1, timeout=60,
                 message=lambda: f"intake never paused; pending_bytes={gw.metric('gateway_pending_bytes')}")
        paused_at = time.monotonic()
        pending_max = 0.0
        rss_max = 0
        while time.monotonic() - paused_at < 3.5 * KEEPALIVE_S:  # the outage lasts this long
            assert gw.alive(), gw.log_tail()
            pending_max = max(pending_max, gw.metric("gateway_pending_bytes"))
            rss_max = max(rss_max, gw.rss_bytes())
            assert gw.metric("gateway_intake_paused") == 1
            assert gw.metric("gateway_mqtt_connected") == 1
            time.sleep(0.1)  # sampling period
        received = gw.metric("gateway_messages_received_total")
        # paused at the budget: over it by less than one read buffer (64 KiB) and a payload,
        # far less than one batch (batch.max_bytes, 8 MiB)
        assert budget <= pending_max <= budget + 64 * 1024 + max(map(len, payloads)), (pending_max, budget)
        assert received < len(payloads) * 0.8, received
        assert rss_max < MAX_MEMORY_MIB << 20, rss_max >> 20
        cluster.start()
        pub.wait_acked()
        pub.close()
        wait_ingests(dsn, len(envelopes), timeout=120, gw=gw)
        assert count(dsn, "SELECT count(*) FROM ingests") == len(envelopes)
        assert count(dsn, "SELECT count(*) FROM waveform_blocks") == 3 * len(envelopes)
        import asyncio

        assert asyncio.run(fetch_readings(dsn)) == expected_readings(envelopes)
        wait_for(lambda: gw.metric("gateway_intake_paused") == 0, timeout=30)
        log = gw.log_text()
        assert "Intake paused; the broker holds the backlog. reason=\"pending payloads at budget\"" in log
        assert "Intake resumed." in log
        # the paused client kept its connection (keepalive) and its session: no reconnect
        assert "MQTT connection lost" not in log
        assert log.count("Subscribed.") == 1
        assert gw.terminate() == 0
    finally:
        cluster.cleanup()
