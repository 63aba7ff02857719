"""Alert publication is bounded: an alert storm cannot grow the MQTT client's queue without limit."""

from __future__ import annotations

import json

import aiomqtt
import pytest

from gateway.config import MqttConfig
from gateway.metrics import Metrics
from gateway.model import AlertEvent
from gateway.sources.mqtt import MqttSource

pytestmark = pytest.mark.asyncio


def event(i: int, priority: str) -> AlertEvent:
    return AlertEvent("open", f"pm-{i:03d}", "monitor_silent", priority, None, 1_000 * i, None)


async def test_beyond_the_queue_bound_alerts_are_counted_high_priority_first():
    metrics = Metrics()
    src = MqttSource(MqttConfig(alerts_max_queued=5), client_id="t", submit=lambda raw: None, metrics=metrics)
    client = aiomqtt.Client("127.0.0.1", 1)  # never connected: paho queues what is published
    src._client, src._connected = client, True  # noqa: SLF001
    priorities = ["low", "medium", "high", "low", "low", "medium", "high", "low"]
    src.publish_alerts([event(i, p) for i, p in enumerate(priorities)])
    queued = [json.loads(m.payload) for m in client._client._out_messages.values()]  # noqa: SLF001
    assert [q["device_id"] for q in queued] == ["pm-000", "pm-001", "pm-002", "pm-005", "pm-006"], \
        "both high, both medium and the earliest low, in their order"
    assert metrics.registry.get_sample_value("gateway_alert_events_unpublished_total") == 3
    src.publish_alerts([event(9, "high")])  # the queue is full: nothing more is queued
    assert len(client._client._out_messages) == 5  # noqa: SLF001
    assert metrics.registry.get_sample_value("gateway_alert_events_unpublished_total") == 4
