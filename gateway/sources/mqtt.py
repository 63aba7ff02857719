"""MQTT source: a persistent QoS 1 session whose PUBACKs wait for the database commit.

aiomqtt (2.x) acknowledges on receipt; its paho client can instead acknowledge on
request (``manual_ack_set(True)``, then ``ack(mid, qos)``). This module is the one place
that reaches into that client. Manual acks are switched on *before* connecting, because
a persistent session redelivers pending messages right after CONNACK. Messages go
straight from paho's callback to the pipeline (no intermediate queue); how many can be
unacknowledged at once is bounded by the broker: MQTT 5 ``Receive Maximum`` (our
``receive_maximum``), or the broker's ``max_inflight_messages`` for MQTT 3.1.1.

Acks go out in arrival order per connection (MQTT 3.1.1 section 4.6) whatever order the
commits complete in (``OrderedAcks``): with ``--workers`` a payload forwarded to the
worker owning its device commits independently of local batches. After a reconnect,
acks for messages of the previous connection are skipped: the broker redelivers them,
and the pipeline stores them once (envelope-level dedupe).

Memory: socket reads pause while the intake holds its budget of payload bytes or the
process's resident memory nears ``max_memory_bytes`` (``mqtt_flow.ReadGate``), so the
kernel and then the broker hold the backlog.

Publishing: the source is also the ``Publisher`` of ``gateway.sinks.alerts`` (publish on
the current connection, count what waits for its PUBACK); what to publish and how much
to let wait is that sink's policy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttConfig
from gateway.metrics import Metrics
from gateway.model import RawMessage
from gateway.retry import Backoff
from gateway.sources import SourceContext, SourceHealth, Submit
from gateway.sources import paho_speed
from gateway.sources.mqtt_flow import OrderedAcks, ReadGate, resident_bytes

__all__ = ["MqttSource", "build", "OrderedAcks", "parse_url", "resident_bytes"]  # the last two from mqtt_flow

log = logging.getLogger(__name__)


def parse_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """``mqtt[s]://[user[:password]@]host[:port]`` -> (host, port, tls, user, password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"unsupported MQTT URL scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
    tls = parts.scheme in ("mqtts", "ssl")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (8883 if tls else 1883)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return host, port, tls, user, password


def build(cfg: MqttConfig, ctx: SourceContext) -> MqttSource:
    """The MQTT source of the ``mqtt`` section (``gateway.sources.SOURCES``)."""
    intake = ctx.intake
    return MqttSource(
        cfg, client_id=cfg.client_id_for(ctx.gateway_id), submit=intake.submit, metrics=ctx.metrics,
        backed_up=lambda: intake.backed_up, held_fraction=ctx.held_fraction, max_memory_bytes=ctx.max_memory_bytes,
        share_group=cfg.share_group if ctx.workers > 1 else None,
    )


class MqttSource:
    """Subscribes the telemetry topic and feeds the pipeline (or the worker router).

    Args:
        submit: Takes one payload (``Pipeline.submit`` or ``Router.submit``).
        backed_up: True while the intake holds its budget of payload bytes: reads pause.
        held_fraction: Held payload bytes as a fraction of that budget (resume below 0.75).
        max_memory_bytes: Resident memory bound of the process (0: not watched).
        share_group: Subscribe ``$share/<group>/<topic>`` (MQTT 5 shared subscription,
            one per worker process) instead of the topic itself.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        submit: Submit,
        metrics: Metrics,
        backed_up: Callable[[], bool] | None = None,
        held_fraction: Callable[[], float] | None = None,
        max_memory_bytes: int = 0,
        share_group: str | None = None,
    ) -> None:
        self._cfg = cfg
        self._client_id = client_id
        self._submit = submit
        self._metrics = metrics
        self._gate = ReadGate(metrics, backed_up or (lambda: False), held_fraction or (lambda: 0.0), max_memory_bytes)
        self._subscription = f"$share/{share_group}/{cfg.topic}" if share_group else cfg.topic
        self._acks = OrderedAcks(lambda _mid, _qos: None)
        self._host, self._port, self._tls, user, password = parse_url(cfg.url)
        self._user = cfg.username or user
        self._password = cfg.password or password
        self._prefix, self._suffix = self._topic_parts(cfg.topic)
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._connected = False
        self._last_error = "not connected yet"  # why it is not connected, for /readyz
        self._taking = True
        self._closing = asyncio.Event()
        paho_speed.install()

    @staticmethod
    def _topic_parts(topic: str) -> tuple[str, str]:
        if topic.count("+") != 1 or "#" in topic:
            raise ValueError("mqtt.topic must contain exactly one '+' (the device id) and no '#'")
        prefix, suffix = topic.split("+")
        return prefix, suffix

    def _make_client(self) -> aiomqtt.Client:
        cfg = self._cfg
        v5 = cfg.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = cfg.receive_maximum
        tls_context = None
        if self._tls or cfg.tls_ca:
            tls_context = ssl.create_default_context(cafile=cfg.tls_ca)
            if cfg.tls_cert:
                tls_context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            username=self._user,
            password=self._password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=cfg.keepalive_s,
            tls_context=tls_context,
            timeout=10,
        )
        inner = client._client  # noqa: SLF001 - the one place that uses paho directly
        inner.manual_ack_set(True)  # before connecting: redelivered messages arrive right after CONNACK
        inner.on_message = self._on_message
        inner.disable_logger()
        inner.max_inflight_messages_set(1000)  # alert publications in flight at once (paho's default: 20)
        paho_speed.buffer_reads(inner, keep_reading=self._gate.reading, on_publish=self._on_publish)
        self._gate.hook(client, inner)
        return client

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        """Packets paho parsed itself (``paho_speed`` hands the plain ones to ``_on_publish``)."""
        props = getattr(msg, "properties", None)
        self._on_publish(msg.topic, msg.payload, msg.qos, msg.mid, getattr(props, "ContentType", None))

    def _on_publish(self, topic: str, payload: bytes, qos: int, mid: int, content_type: str | None) -> None:
        if not self._taking:
            return  # not acknowledged: the broker keeps it for the next session
        device_id = None
        if topic.startswith(self._prefix) and topic.endswith(self._suffix):
            device_id = topic[len(self._prefix): len(topic) - len(self._suffix)] or None
        ack = None
        if qos > 0:
            ack = self._acks.track(mid, qos)
        self._submit(
            RawMessage(
                payload=payload,
                source="mqtt",
                principal=device_id,
                topic_or_path=topic,
                received_at_ms=int(time.time() * 1000),
                content_type=content_type,
                topic_device_id=device_id if device_id is not None else "",
                ack=ack,
            )
        )
        self._gate.after_take()

    async def start(self) -> None:
        """Nothing to bind: ``run()`` connects, and reconnects while the broker is away."""

    def stop_intake(self) -> None:
        self._taking = False

    async def close(self) -> None:
        self._taking = False
        self._closing.set()

    async def run(self) -> None:
        backoff = Backoff(0.5, 15.0)
        while not self._closing.is_set():
            client = self._make_client()
            self._client = client
            # New acks before connecting: a persistent session redelivers its backlog in
            # the same read as CONNACK, and those messages must be acked on this
            # connection; the previous connection's outstanding acks become no-ops.
            self._generation += 1
            self._acks.close()
            self._acks = OrderedAcks(client._client.ack)  # noqa: SLF001
            governor = asyncio.create_task(self._gate.govern(), name="mqtt-intake-governor")
            try:
                async with client:
                    self._connected = True
                    self._metrics.mqtt_connected.set(1)
                    await client.subscribe(self._subscription, qos=1)
                    backoff.reset()
                    log.info(
                        "Subscribed.",
                        extra={"broker": f"{self._host}:{self._port}", "topic": self._subscription, "client_id": self._client_id},
                    )
                    await self._until_closed_or_lost(client)
            except aiomqtt.MqttError as exc:
                self._last_error = str(exc) or type(exc).__name__
                if self._closing.is_set():
                    break
                delay = backoff.next_delay()
                log.warning(
                    "MQTT connection lost; reconnecting.",
                    extra={"broker": f"{self._host}:{self._port}", "error": str(exc), "retry_in_s": round(delay, 2)},
                )
                self._mark_down()
                try:
                    await asyncio.wait_for(self._closing.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            finally:
                governor.cancel()
                self._mark_down()
        self._client = None
        self._acks.close()

    def _mark_down(self) -> None:
        self._connected = False
        self._metrics.mqtt_connected.set(0)

    async def _until_closed_or_lost(self, client: aiomqtt.Client) -> None:
        async def watch() -> None:
            async for _ in client.messages:  # our on_message bypasses the queue: this only ends on disconnect
                pass

        watcher = asyncio.create_task(watch(), name="mqtt-disconnect-watch")
        closer = asyncio.create_task(self._closing.wait(), name="mqtt-close-wait")
        try:
            done, _ = await asyncio.wait({watcher, closer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watcher, closer):
                t.cancel()
        if watcher in done and not watcher.cancelled() and watcher.exception() is not None:
            raise watcher.exception()  # type: ignore[misc]

    def health(self) -> SourceHealth:
        broker = f"{self._host}:{self._port}"
        paused_s, why = self._gate.paused_for()
        if not self.connected:
            return SourceHealth(False, f"mqtt: not connected to {broker}: {self._last_error}", paused_s)
        if why is not None:
            held = "payloads held at the budget" if why == "held" else "resident memory near the bound"
            return SourceHealth(True, f"mqtt: connected to {broker}; reads paused {paused_s:.0f} s ({held})", paused_s)
        return SourceHealth(True, f"mqtt: connected to {broker}")

    # ------------------------------------------------------------ publishing (gateway.sinks.alerts.Publisher)
    @property
    def connected(self) -> bool:
        return self._client is not None and self._connected

    def waiting(self) -> int:
        """Publications not yet PUBACKed (paho's outgoing queue); 0 while disconnected."""
        client = self._client
        return len(client._client._out_messages) if client is not None else 0  # noqa: SLF001

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Queue one publication on the current connection (paho sends it from the event loop)."""
        client = self._client
        if client is None:
            raise RuntimeError("MQTT is not connected")
        client._client.publish(topic, payload, qos=qos)  # noqa: SLF001 - synchronous, unlike aiomqtt's
