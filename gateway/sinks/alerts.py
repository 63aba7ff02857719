"""Alert publication: each committed alert event as JSON, QoS 1, on ``alerts/{device_id}``.

The policy lives here: the topic (``mqtt.alerts_topic``), the payload (PROTOCOL section
4, the same object ``vitalgate replay`` prints), and the bound on publications waiting
for their acknowledgement (``mqtt.alerts_max_queued``). Beyond the bound, the events
published are the highest priorities first, in their order; the others are counted in
``gateway_alert_events_unpublished_total`` and logged at most every 10 s. An alert storm
(``silent`` alerts while a backlog drains) must not grow the transport's queue without
bound. Publication is best effort after commit: every episode is in the ``alerts`` table
either way.

The transport is anything with the ``Publisher`` surface (the MQTT source's connection);
``app.py`` wires the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import orjson

from gateway.metrics import Metrics
from gateway.model import AlertEvent

__all__ = ["Publisher", "AlertPublication", "alert_payload"]

log = logging.getLogger(__name__)

_RANK = {"high": 0, "medium": 1, "low": 2}
_LOG_EVERY_S = 10.0


class Publisher(Protocol):
    """A transport that publishes messages and knows how many wait for their acknowledgement."""

    @property
    def connected(self) -> bool:
        """False while the transport cannot publish (disconnected, not yet connected)."""
        ...

    def waiting(self) -> int:
        """Publications handed to the transport and not yet acknowledged by the broker."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Queue one publication; returns at once."""
        ...


def alert_payload(ev: AlertEvent) -> bytes:
    return orjson.dumps(
        {
            "type": "alert",
            "event": ev.event,
            "device_id": ev.device_id,
            "rule": ev.rule,
            "priority": ev.priority,
            "metric": ev.metric,
            "at": ev.at,
            "value": ev.value,
        }
    )


class AlertPublication:
    """Publishes committed alert events through ``publisher`` (see the module docstring).

    Args:
        publisher: The transport.
        topic: Topic template with ``{device_id}``.
        max_queued: Publications waiting for their acknowledgement before events are left unpublished.
        metrics: For ``gateway_alert_events_unpublished_total``.
    """

    def __init__(self, publisher: Publisher, *, topic: str, max_queued: int, metrics: Metrics) -> None:
        self._publisher = publisher
        self._topic = topic
        self._max_queued = max_queued
        self._metrics = metrics
        self._unpublished_logged = -_LOG_EVERY_S

    def publish(self, events: Sequence[AlertEvent]) -> None:
        """Publish ``events`` (called after the commit that stored them)."""
        publisher = self._publisher
        if not publisher.connected:
            self._metrics.alerts_unpublished.inc(len(events))
            log.warning("Alerts not published: the transport is disconnected (they are stored).",
                        extra={"count": len(events)})
            return
        room = self._max_queued - publisher.waiting()
        if room < len(events):
            events = self._within(events, max(room, 0))
        for ev in events:
            publisher.publish(self._topic.format(device_id=ev.device_id), alert_payload(ev), 1)

    def _within(self, events: Sequence[AlertEvent], room: int) -> list[AlertEvent]:
        """The ``room`` events to publish: highest priority first, in their order; the rest are counted."""
        keep = sorted(range(len(events)), key=lambda i: _RANK.get(events[i].priority, 3))[:room]
        dropped = len(events) - len(keep)
        self._metrics.alerts_unpublished.inc(dropped)
        now = time.monotonic()
        if now - self._unpublished_logged >= _LOG_EVERY_S:
            self._unpublished_logged = now
            log.warning("Alert publication queue full; alerts stored but not published.",
                        extra={"unpublished": dropped, "max_queued": self._max_queued})
        return [events[i] for i in sorted(keep)]
