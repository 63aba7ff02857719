"""Malformed payloads over MQTT land in ``rejected`` with a precise reason and never stop the pipeline."""

from __future__ import annotations

import time

import msgspec
import orjson
import pytest

from tests.harness import wait_for
from tests.integration.support import Publisher, sha256
from tests.integration.test_ingest import count, fetch, wait_ingests

pytestmark = pytest.mark.integration

T = (int(time.time()) - 60) * 1000


def env(**over: object) -> dict:
    base: dict = {"v": 1, "device_id": "po-bad", "profile": "pulse_oximeter",
                  "numerics": [{"t": T, "values": {"spo2": 97, "pulse_rate": 70}}]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


J = orjson.dumps
M = msgspec.msgpack.encode
TOPIC = "devices/po-bad/telemetry"
_BIG = J(env(firmware="x" * (300 * 1024)))

# (case, topic, payload, exact reason, device_id recorded)
CASES = [
    ("bad json", TOPIC, b'{"v": 1, "device_id": ', "payload: invalid JSON: Input data was truncated", "po-bad"),
    ("not an object", TOPIC, b"[1, 2, 3]", "payload: expected object, got array", "po-bad"),
    ("empty payload", TOPIC, b"", "payload: empty", "po-bad"),
    ("bad msgpack", TOPIC, b"\x81\xa1v\xc1", "payload: invalid MessagePack: invalid opcode '\\xc1' (byte 3)", "po-bad"),
    ("wrong type", TOPIC, J(env(numerics=[{"t": T, "values": {"spo2": 97}}, {"t": T + 1000, "values": {"spo2": "97"}}])),
     "numerics[1].values.spo2: expected number, got string", "po-bad"),
    ("wrong type msgpack", TOPIC, M(env(seq="7")), "seq: expected integer or null, got string", "po-bad"),
    ("missing device_id", TOPIC, J(env(device_id=None)), "device_id: required field missing", "po-bad"),
    ("missing v", TOPIC, J(env(v=None)), "v: required field missing", "po-bad"),
    ("missing t", TOPIC, J(env(numerics=[{"values": {"spo2": 97}}])), "numerics[0].t: required field missing", "po-bad"),
    ("unsupported version", TOPIC, J(env(v=2)), "v: unsupported envelope version 2, expected 1", "po-bad"),
    ("unknown metric", TOPIC, J(env(numerics=[{"t": T, "values": {"spo2": 97, "glucose": 5}}])),
     "numerics[0].values.glucose: unknown metric for profile 'pulse_oximeter'", "po-bad"),
    ("waveform as numeric", TOPIC, J(env(numerics=[{"t": T, "values": {"pleth": 0.5}}])),
     "numerics[0].values.pleth: 'pleth' is a waveform metric, send it in waveforms", "po-bad"),
    ("unknown profile", TOPIC, J(env(profile="toaster")), "profile: unknown profile 'toaster'", "po-bad"),
    ("topic mismatch", "devices/po-other/telemetry", J(env()),
     "device_id: 'po-bad' does not match the device id 'po-other' of the topic", "po-other"),
    ("bad device id", "devices/po bad/telemetry", J(env(device_id="po bad")),
     "device_id: must match [A-Za-z0-9._-]{1,64}", "po bad"),
    ("oversize", TOPIC, _BIG, f"payload: {len(_BIG)} bytes exceeds the limit of 262144 bytes", "po-bad"),
    ("empty readings", TOPIC, J(env(numerics=[])),
     "numerics: at least one reading is required (numerics and waveforms are both empty)", "po-bad"),
    ("empty values", TOPIC, J(env(numerics=[{"t": T, "values": {}}])), "numerics[0].values: must name at least one metric", "po-bad"),
    ("empty samples", TOPIC, J(env(numerics=[], waveforms=[{"metric": "pleth", "t0": T, "hz": 125, "samples": []}])),
     "waveforms[0].samples: must not be empty", "po-bad"),
    ("zero hz", TOPIC, J(env(waveforms=[{"metric": "pleth", "t0": T, "hz": 0, "samples": [1.0]}])),
     "waveforms[0].hz: expected number > 0.0", "po-bad"),
    ("timestamp without offset", TOPIC, J(env(numerics=[{"t": "2026-11-26T10:00:00", "values": {"spo2": 97}}])),
     "numerics[0].t: RFC 3339 timestamp must carry an offset", "po-bad"),
    ("timestamp garbage", TOPIC, J(env(numerics=[{"t": "yesterday", "values": {"spo2": 97}}])),
     "numerics[0].t: invalid RFC 3339 timestamp", "po-bad"),
    ("negative timestamp", TOPIC, J(env(numerics=[{"t": -1, "values": {"spo2": 97}}])), "numerics[0].t: expected integer >= 0", "po-bad"),
    ("float timestamp", TOPIC, J(env(numerics=[{"t": 1.5e12, "values": {"spo2": 97}}])),
     "numerics[0].t: expected integer epoch milliseconds or RFC 3339 timestamp, got number", "po-bad"),
    ("nan value", TOPIC, M(env(numerics=[{"t": T, "values": {"spo2": float("nan")}}])),
     "numerics[0].values.spo2: expected a finite number, got nan", "po-bad"),
    ("nul in firmware", TOPIC, J(env(firmware="2.4\u00001")), "firmware: must not contain NUL characters", "po-bad"),
]


def test_every_malformed_class_is_quarantined_with_its_reason_and_the_pipeline_goes_on(db_dsn, broker, gateway_factory):
    gw = gateway_factory(db_dsn)
    gw.start()
    pub = Publisher(broker.port)
    good = J(env(device_id="po-good", seq=1))
    for _, topic, payload, _, _ in CASES:
        pub.publish(topic, payload)
        pub.publish("devices/po-good/telemetry", good)  # a valid one between each: it must be stored once
    pub.wait_acked()
    pub.close()
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM rejected") >= len(CASES), timeout=60,
             message=lambda: gw.log_tail())
    wait_ingests(db_dsn, 1, timeout=30, gw=gw)
    rows = fetch(db_dsn, "SELECT * FROM rejected ORDER BY id")
    assert len(rows) == len(CASES)
    for row, (case, topic, payload, reason, device_id) in zip(rows, CASES):
        assert row["reason"] == reason, case
        assert row["device_id"] == device_id, case
        assert row["topic_or_path"] == topic, case
        assert row["source"] == "mqtt"
        assert bytes(row["payload_sha256"]) == sha256(payload), case
        assert row["payload_bytes"] == len(payload), case
        assert bytes(row["payload"]) == payload[: 64 * 1024], case
    assert count(db_dsn, "SELECT count(*) FROM ingests") == 1
    assert count(db_dsn, "SELECT count(*) FROM readings") == 2
    assert gw.metric("gateway_rejected_total") == len(CASES)
    assert gw.alive()
    assert gw.terminate() == 0


def test_a_redelivered_rejected_payload_is_stored_once(db_dsn, broker, gateway_factory):
    gw = gateway_factory(db_dsn)
    gw.start()
    bad = J(env(v=2))
    pub = Publisher(broker.port)
    for _ in range(3):  # the same refused payload three times in one batch
        pub.publish(TOPIC, bad)
    pub.publish("devices/po-other/telemetry", bad)  # from another origin: another refusal
    pub.wait_acked()
    wait_for(lambda: gw.metric("gateway_rejected_total", 0) >= 4, timeout=60, message=lambda: gw.log_tail())
    pub.publish(TOPIC, bad)  # and again in a later batch, as a redelivery would arrive
    pub.wait_acked()
    pub.close()
    wait_for(lambda: gw.metric("gateway_rejected_total", 0) >= 5, timeout=60, message=lambda: gw.log_tail())
    # every delivery acknowledged, so committed: nothing of it is still on its way to the table
    wait_for(lambda: gw.metric("gateway_in_flight_messages") == 0, timeout=30, message=lambda: gw.log_tail())
    rows = fetch(db_dsn, "SELECT topic_or_path, reason, payload_sha256 FROM rejected ORDER BY id")
    assert [(r["topic_or_path"], bytes(r["payload_sha256"])) for r in rows] == [
        (TOPIC, sha256(bad)), ("devices/po-other/telemetry", sha256(bad))]
    assert gw.metric("gateway_rejected_total") == 5  # every delivery is still counted
    assert gw.terminate() == 0
