"""The same recording published over MQTT and replayed offline gives the same flags and alert episodes.

Recordings are shifted so that their last reading is a few seconds old: live receipt time
(the wall clock) and replay receipt time (the envelope's latest reading) then raise the
same clock flags, none. ``silent`` alerts are left to the unit tests: live, they follow the
wall clock by contract, and a recording published faster than real time cannot reproduce
them.
"""

from __future__ import annotations

import threading
import time

import orjson
import paho.mqtt.client as mqtt
import pytest

from gateway.model import FLAG_NAMES
from gateway.profiles import load_profiles
from gateway.replay import Replay
from tests.harness import PROFILES, wait_for
from tests.integration.support import Publisher
from tests.integration.test_ingest import count, fetch, wait_ingests

pytestmark = pytest.mark.integration

EXAMPLES = PROFILES / "examples"
RECORDINGS = ["desaturation", "probe_off", "frozen_sensor"]


def shifted(name: str, now_ms: int) -> list[bytes]:
    envs = [orjson.loads(line) for line in (EXAMPLES / f"{name}.ndjson").read_bytes().splitlines() if line.strip()]
    last = max(max([n["t"] for n in e.get("numerics", [])] + [w["t0"] for w in e.get("waveforms", [])]) for e in envs)
    offset = now_ms - 5000 - last
    for e in envs:
        e.pop("received_at", None)
        for n in e.get("numerics", []):
            n["t"] += offset
        for w in e.get("waveforms", []):
            w["t0"] += offset
        if "sent_at" in e:
            e["sent_at"] += offset
    return [orjson.dumps(e) for e in envs]


def episodes_from_replay(records: list[dict]) -> list[tuple]:
    opened: dict[tuple[str, str], dict] = {}
    out = []
    for r in records:
        if r["type"] != "alert" or r["rule"].endswith("silent"):
            continue
        key = (r["device_id"], r["rule"])
        if r["event"] == "open":
            opened[key] = r
        else:
            o = opened.pop(key)
            out.append((r["device_id"], r["rule"], r["priority"], r["metric"], o["at"], o["value"], r["at"], r["value"]))
    out += [(o["device_id"], o["rule"], o["priority"], o["metric"], o["at"], o["value"], None, None) for o in opened.values()]
    return sorted(out, key=lambda e: (e[0], e[1], e[4]))


@pytest.mark.parametrize("name", RECORDINGS)
def test_live_and_replay_agree(name: str, db_dsn, broker, gateway_factory):
    lines = shifted(name, int(time.time() * 1000))
    summary, live_episodes = live_equals_replay(lines, db_dsn, broker, gateway_factory)
    assert sum(summary["flags"].values()) > 0 or name == "desaturation"
    if name == "desaturation":
        assert any(e[1] == "spo2_low" for e in live_episodes)


def test_live_and_replay_agree_on_redeliveries_out_of_order_and_duplicate_envelopes(db_dsn, broker, gateway_factory):
    """A recording as a broker delivers it after reconnects: identical lines again (next to the
    original and far from it), envelopes out of order, and a second envelope with the same seq
    but other bytes. Live stores each payload once; replay must count, flag and alert the same."""
    now = int(time.time() * 1000)
    desat, frozen = shifted("desaturation", now), shifted("frozen_sensor", now)
    base = [x for pair in zip(desat, frozen) for x in pair] + desat[len(frozen):] + frozen[len(desat):]
    lines = list(base)
    lines[20], lines[23] = lines[23], lines[20]  # out of order
    resent = orjson.loads(base[15])
    resent["seq_note"] = "resent"  # same seq, other bytes (unknown fields are ignored): a distinct envelope
    lines.insert(16, orjson.dumps(resent))
    lines.insert(11, lines[10])  # redelivered at once
    lines.insert(24, lines[3])  # redelivered far from the original
    lines += [lines[8], lines[0], lines[8]]  # redelivered at the end, twice
    unique = len(set(lines))
    assert unique == len(base) + 1 and len(lines) - unique == 5
    summary, _ = live_equals_replay(lines, db_dsn, broker, gateway_factory, stored=unique)
    assert summary["envelopes"] == unique
    assert summary["flags"]["OUT_OF_ORDER"] > 0 and summary["flags"]["FLATLINE"] > 0


def live_equals_replay(lines: list[bytes], db_dsn, broker, gateway_factory, *, stored: int | None = None):  # noqa: ANN001, ANN201
    """Replay ``lines``, publish them over MQTT (QoS 1) to a gateway and assert that the flags,
    readings, alert episodes and published alert events agree. Returns (summary, live episodes)."""
    replay = Replay(load_profiles(PROFILES))
    records = list(replay.feed(lines)) + [replay.summary()]
    summary = records[-1]
    assert summary["rejected"] == 0

    published_alerts: list[dict] = []
    lock = threading.Lock()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_message(_c, _u, msg) -> None:  # noqa: ANN001
        with lock:
            published_alerts.append({"topic": msg.topic, **orjson.loads(msg.payload)})

    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("alerts/#", qos=1)
    sub.loop_start()

    gw = gateway_factory(db_dsn)
    gw.start()
    pub = Publisher(broker.port)
    for line in lines:
        env = orjson.loads(line)
        pub.publish(f"devices/{env['device_id']}/telemetry", line)
    pub.wait_acked()
    pub.close()
    wait_ingests(db_dsn, len(lines) if stored is None else stored, timeout=60, gw=gw)
    assert count(db_dsn, "SELECT count(*) FROM ingests") == summary["envelopes"]

    for bit, flag in enumerate(FLAG_NAMES):
        live = count(db_dsn, f"SELECT (SELECT count(*) FROM readings WHERE flags & {1 << bit} <> 0)"
                             f" + (SELECT count(*) FROM waveform_blocks WHERE flags & {1 << bit} <> 0)")
        assert live == summary["flags"][flag], flag
    assert count(db_dsn, "SELECT count(*) FROM readings") == summary["readings"]

    rows = fetch(db_dsn, """SELECT device_id, rule, priority, metric,
                                   (extract(epoch FROM opened_at) * 1000)::bigint AS o, trigger_value,
                                   (extract(epoch FROM cleared_at) * 1000)::bigint AS c, clear_value
                              FROM alerts WHERE rule NOT LIKE '%silent' ORDER BY device_id, rule, opened_at""")
    live_episodes = [tuple(r) for r in rows]
    assert live_episodes == episodes_from_replay(records)

    # every alert event was also published on alerts/{device_id}, as replay prints it
    expected = [{k: v for k, v in r.items()} for r in records if r["type"] == "alert" and not r["rule"].endswith("silent")]
    wait_for(lambda: len([a for a in published_alerts if not a["rule"].endswith("silent")]) >= len(expected), timeout=30,
             message=lambda: f"{len(published_alerts)} alerts published, {len(expected)} expected")
    sub.loop_stop()
    sub.disconnect()
    got = [a for a in published_alerts if not a["rule"].endswith("silent")]
    assert [a["topic"] for a in got] == [f"alerts/{e['device_id']}" for e in expected]
    assert [{k: v for k, v in a.items() if k != "topic"} for a in got] == expected
    assert gw.terminate() == 0
    return summary, live_episodes
