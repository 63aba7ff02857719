"""bench.fleet against a real (throwaway) mosquitto: every envelope published, acked and delivered."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from bench.fleet import Fleet, FleetConfig
from tests.harness import Mosquitto, wait_for

pytestmark = pytest.mark.integration
PROFILES_DIR = str(Path(__file__).resolve().parents[2] / "device_profiles")


class _Counter:
    def __init__(self, port: int) -> None:
        self.n = 0
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.subscribed = threading.Event()
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe("devices/+/telemetry", qos=1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.n += 1

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.parametrize(("client", "version"), [("raw", "5"), ("raw", "3.1.1"), ("paho", "5"), ("paho", "3.1.1")])
def test_flat_out_fleet_is_fully_acknowledged_and_delivered(mosquitto: Mosquitto, client: str, version: str) -> None:
    sub = _Counter(mosquitto.port)
    try:
        cfg = FleetConfig(
            url=mosquitto.url, profiles_dir=PROFILES_DIR, devices=40, mix={"pulse_oximeter": 1, "patient_monitor": 1},
            processes=2, flat_out=True, envelopes=600, client=client, mqtt_version=version, malformed=0.05,
        )
        fleet = Fleet(cfg)
        fleet.start()
        assert fleet.join(60)
        s = fleet.stats()
        assert s.published == s.acked == 600
        assert s.published_malformed == s.acked_malformed > 0
        assert s.acked_readings == s.published_readings > 0
        assert s.ack_failures == 0 and s.no_subscribers == 0
        total = 600 + s.published_malformed
        wait_for(lambda: sub.n >= total, timeout=20, message=lambda: f"subscriber got {sub.n} of {total}")
        assert sub.n == total
    finally:
        sub.close()


def test_paced_fleet_sends_one_envelope_per_device_per_interval(mosquitto: Mosquitto) -> None:
    cfg = FleetConfig(
        url=mosquitto.url, profiles_dir=PROFILES_DIR, devices=30, mix={"pulse_oximeter": 1}, processes=2,
        interval_s=0.5, seconds=2.0,
    )
    fleet = Fleet(cfg)
    fleet.start()
    assert fleet.join(30)
    s = fleet.stats()
    assert s.published == s.acked
    assert 30 * 3 <= s.published <= 30 * 5  # 4 windows of 0.5 s, give or take the edges
    assert s.no_subscribers == s.acked  # nobody listening: MQTT 5 says so in the PUBACK
