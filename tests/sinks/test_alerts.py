"""Alert publication is bounded: an alert storm cannot grow the transport's queue without limit."""

from __future__ import annotations

import json

import aiomqtt
import pytest

from gateway.config import MqttConfig
from gateway.metrics import Metrics
from gateway.model import AlertEvent
from gateway.sinks.alerts import AlertPublication, Publisher
from gateway.sources.mqtt import MqttSource

pytestmark = pytest.mark.asyncio


def event(i: int, priority: str) -> AlertEvent:
    return AlertEvent("open", f"pm-{i:03d}", "monitor_silent", priority, None, 1_000 * i, None)


class Recorder:
    """An in-memory transport: nothing is ever acknowledged."""

    def __init__(self, connected: bool = True) -> None:
        self.connected = connected
        self.sent: list[tuple[str, bytes, int]] = []

    def waiting(self) -> int:
        return len(self.sent)

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.sent.append((topic, payload, qos))


def mqtt_publisher() -> tuple[Publisher, callable]:
    src = MqttSource(MqttConfig(), client_id="t", submit=lambda raw: None, metrics=Metrics())
    client = aiomqtt.Client("127.0.0.1", 1)  # never connected: paho queues what is published
    src._client, src._connected = client, True  # noqa: SLF001
    return src, lambda: [json.loads(m.payload) for m in client._client._out_messages.values()]  # noqa: SLF001


def recorder() -> tuple[Publisher, callable]:
    rec = Recorder()
    return rec, lambda: [json.loads(p) for _, p, _ in rec.sent]


@pytest.mark.parametrize("make", [recorder, mqtt_publisher], ids=["recorder", "mqtt"])
async def test_beyond_the_queue_bound_alerts_are_counted_high_priority_first(make):
    metrics = Metrics()
    publisher, queued = make()
    alerts = AlertPublication(publisher, topic="alerts/{device_id}", max_queued=5, metrics=metrics)
    priorities = ["low", "medium", "high", "low", "low", "medium", "high", "low"]
    alerts.publish([event(i, p) for i, p in enumerate(priorities)])
    assert [q["device_id"] for q in queued()] == ["pm-000", "pm-001", "pm-002", "pm-005", "pm-006"], \
        "both high, both medium and the earliest low, in their order"
    assert metrics.registry.get_sample_value("gateway_alert_events_unpublished_total") == 3
    alerts.publish([event(9, "high")])  # the queue is full: nothing more is queued
    assert len(queued()) == 5
    assert publisher.waiting() == 5
    assert metrics.registry.get_sample_value("gateway_alert_events_unpublished_total") == 4


async def test_topic_and_payload_follow_the_protocol():
    rec = Recorder()
    alerts = AlertPublication(rec, topic="site/alerts/{device_id}", max_queued=10, metrics=Metrics())
    alerts.publish([AlertEvent("close", "pm-7", "spo2_low", "high", "spo2", 1_700_000_000_000, 88.5, env=3)])
    topic, payload, qos = rec.sent[0]
    assert (topic, qos) == ("site/alerts/pm-7", 1)
    assert json.loads(payload) == {"type": "alert", "event": "close", "device_id": "pm-7", "rule": "spo2_low",
                                   "priority": "high", "metric": "spo2", "at": 1_700_000_000_000, "value": 88.5}


async def test_disconnected_alerts_are_counted_not_published():
    metrics = Metrics()
    rec = Recorder(connected=False)
    AlertPublication(rec, topic="alerts/{device_id}", max_queued=10, metrics=metrics).publish(
        [event(1, "high"), event(2, "low")])
    assert rec.sent == []
    assert metrics.registry.get_sample_value("gateway_alert_events_unpublished_total") == 2
    src, _ = mqtt_publisher()
    src._connected = False  # noqa: SLF001
    assert not src.connected
