"""State restored from the database after a restart: a desaturation opened by one gateway
process is closed by the next, and a reading older than the stored ones is OUT_OF_ORDER."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.harness import PROFILES, wait_for
from tests.integration.support import Publisher
from tests.integration.test_ingest import fetch, wait_ingests

pytestmark = pytest.mark.integration

DEVICE = "po-restart-1"
RECORDED_T0 = 1_764_187_200_000  # first reading time of the example recording


def desaturation(t0: int) -> list[dict]:
    """The example desaturation recording, moved to ``t0`` and to this test's device."""
    out = []
    for line in (PROFILES / "examples" / "desaturation.ndjson").read_bytes().splitlines():
        env = orjson.loads(line)
        env["device_id"] = DEVICE
        for n in env.get("numerics", []):
            n["t"] += t0 - RECORDED_T0
        for w in env.get("waveforms", []):
            w["t0"] += t0 - RECORDED_T0
        out.append(env)
    return out


def publish(port: int, envelopes: list[dict]) -> None:
    pub = Publisher(port)
    for env in envelopes:
        pub.publish(f"devices/{DEVICE}/telemetry", orjson.dumps(env))
    pub.wait_acked()
    pub.close()


def spo2_low(dsn: str) -> list:
    return fetch(dsn, f"""SELECT (extract(epoch FROM opened_at) * 1000)::bigint AS o,
                                 (extract(epoch FROM cleared_at) * 1000)::bigint AS c, clear_value
                            FROM alerts WHERE device_id = '{DEVICE}' AND rule = 'spo2_low' ORDER BY opened_at""")


def test_an_episode_opened_before_a_restart_closes_after_it_and_order_survives(db_dsn, broker, gateway_factory):
    t0 = (int(time.time()) - 600) * 1000
    envelopes = desaturation(t0)
    # seq 0..7 (t = 0..39 s): spo2 below 90 from t = 17 s, spo2_low opens at t = 27 s; 8..11 clear it at t = 47 s
    before, after = envelopes[:8], envelopes[8:]
    last_stored = max(n["t"] for e in before for n in e["numerics"])
    assert last_stored == t0 + 39_000

    gw = gateway_factory(db_dsn)
    gw.start()
    publish(broker.port, before)
    wait_ingests(db_dsn, len(before), timeout=60, gw=gw)
    wait_for(lambda: len(spo2_low(db_dsn)) == 1, timeout=30, interval=0.1, message="spo2_low never opened")
    assert [tuple(r) for r in spo2_low(db_dsn)] == [(t0 + 27_000, None, None)]
    assert gw.terminate() == 0

    gw2 = gateway_factory(db_dsn)
    gw2.start()
    late = {"v": 1, "device_id": DEVICE, "seq": 100, "profile": "pulse_oximeter", "firmware": "2.4.1",
            "numerics": [{"t": t0 + 30_500, "values": {"spo2": 87.5}}]}
    publish(broker.port, [late, *after])
    wait_ingests(db_dsn, len(envelopes) + 1, timeout=60, gw=gw2)
    wait_for(lambda: spo2_low(db_dsn)[0]["c"] is not None, timeout=30, interval=0.1,
             message=lambda: f"spo2_low never cleared: {spo2_low(db_dsn)}\n{gw2.log_tail()}")
    assert [tuple(r) for r in spo2_low(db_dsn)] == [(t0 + 27_000, t0 + 47_000, 92.0)], "closed, not re-opened"
    flags = fetch(db_dsn, f"""SELECT flags FROM readings WHERE device_id = '{DEVICE}' AND metric = 'spo2'
                                AND time = timestamptz 'epoch' + {t0 + 30_500} * interval '1 millisecond'""")
    assert [r["flags"] for r in flags] == [64], "older than the last stored reading: OUT_OF_ORDER only"
    # the first reading after the late one follows the stored t = 39 s by 1 s: no GAP, no SPIKE (88 vs 87)
    first_after = fetch(db_dsn, f"""SELECT flags FROM readings WHERE device_id = '{DEVICE}' AND metric = 'spo2'
                                      AND time = timestamptz 'epoch' + {t0 + 40_000} * interval '1 millisecond'""")
    assert [r["flags"] for r in first_after] == [0]
    assert gw2.terminate() == 0
