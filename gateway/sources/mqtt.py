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

Memory: socket reads pause (the reader is taken off the event loop, so the kernel and
then the broker hold the backlog) while the intake holds its budget of payload bytes
(``backed_up``) or the process's resident memory is above 90% of ``max_memory_bytes``,
and resume once the held bytes are under 75% of the budget and resident memory under
80%. While paused the client still sends PINGREQs and PUBACKs; it cannot read PINGRESPs
queued behind unread PUBLISH packets, so its own keepalive timeout is suspended until
reads resume (the broker's side of keepalive is met by the PINGREQs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from urllib.parse import unquote, urlsplit

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttConfig
from gateway.metrics import Metrics
from gateway.model import AlertEvent, RawMessage
from gateway.retry import Backoff
from gateway.sources import Submit
from gateway.sources import paho_speed

__all__ = ["MqttSource", "OrderedAcks", "parse_url", "resident_bytes"]

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


_PAGE = os.sysconf("SC_PAGE_SIZE")
_SAMPLE_S = 0.1  # how often resident memory and the held bytes are looked at while connected
_PAUSE_AT, _RESUME_HELD, _RESUME_RSS = 0.9, 0.75, 0.8  # watermarks (fractions of the bounds)
_LOG_EVERY_S = 10.0  # pause/resume log lines at most this often


def resident_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (a few microseconds)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _noop_send(_mid: int, _qos: int) -> None:
    pass


class OrderedAcks:
    """PUBACKs of one connection in arrival order, whatever order the commits complete in.

    ``track(mid, qos)`` is called as each message arrives and returns its ``ack``
    callable; calling it marks the message done and sends every acknowledgement from
    the oldest pending message up to the first one still waiting. ``close()`` (the
    connection is gone) turns every outstanding ``ack`` into a no-op: the broker
    redelivers those messages on the next connection.
    """

    __slots__ = ("_send", "_pending")

    def __init__(self, send: Callable[[int, int], object]) -> None:
        self._send = send
        self._pending: deque[list] = deque()  # [mid, qos, done], arrival order

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, mid: int, qos: int) -> Callable[[], None]:
        slot = [mid, qos, False]
        pending = self._pending
        pending.append(slot)

        def ack() -> None:
            slot[2] = True
            if pending and pending[0] is slot:
                self._flush()

        return ack

    def _flush(self) -> None:
        pending, send = self._pending, self._send
        while pending and pending[0][2]:
            mid, qos, _ = pending.popleft()
            send(mid, qos)

    def close(self) -> None:
        self._send = _noop_send
        self._pending.clear()


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
        self._backed_up = backed_up or (lambda: False)
        self._held_fraction = held_fraction or (lambda: 0.0)
        self._max_memory = max_memory_bytes
        self._subscription = f"$share/{share_group}/{cfg.topic}" if share_group else cfg.topic
        self._acks = OrderedAcks(_noop_send)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: object | None = None  # paho's socket while connected
        self._reader_off = False  # our reader is taken off the loop (reads paused)
        self._paused: str | None = None  # why intake is paused: "held" | "memory" | None
        self._paused_at = 0.0
        self._pauses = 0  # pauses since the last pause log line
        self._last_log = -_LOG_EVERY_S
        self._rss = 0
        self._host, self._port, self._tls, user, password = parse_url(cfg.url)
        self._user = cfg.username or user
        self._password = cfg.password or password
        self._prefix, self._suffix = self._topic_parts(cfg.topic)
        self._client: aiomqtt.Client | None = None
        self._generation = 0
        self._connected = False
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
        paho_speed.buffer_reads(inner, keep_reading=lambda: not self._reader_off)
        self._hook_socket(client, inner)
        return client

    # ------------------------------------------------------------ pausing reads
    def _hook_socket(self, client: aiomqtt.Client, inner: paho.Client) -> None:
        """Know paho's socket (to take its reader off the loop) and keep keepalive alive while paused.

        aiomqtt 2.5.1 registers ``loop.add_reader(sock, callback)`` in its ``on_socket_open``
        and removes it in ``on_socket_close``; its ``_misc_loop`` calls ``loop_misc()`` once a
        second, which sends PINGREQs and closes the connection when no byte arrived within
        the keepalive. Both hooks are wrapped here, nothing else is changed.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened, closed = inner.on_socket_open, inner.on_socket_close

        def on_open(c: paho.Client, userdata: object, sock: object) -> None:
            opened(c, userdata, sock)  # schedules aiomqtt's add_reader; ours runs after it
            loop.call_soon_threadsafe(self._socket_opened, client, sock)

        def on_close(c: paho.Client, userdata: object, sock: object) -> None:
            self._sock = None
            closed(c, userdata, sock)

        inner.on_socket_open = on_open
        inner.on_socket_close = on_close
        misc = inner.loop_misc

        def loop_misc() -> paho.MQTTErrorCode:
            if self._reader_off:
                # Unread bytes are ours to read later, not a silent broker: restart paho's
                # no-bytes-received clock so that it keeps sending PINGREQs and does not close.
                with inner._msgtime_mutex:  # noqa: SLF001
                    inner._last_bytes_received = paho.time_func()  # noqa: SLF001
                inner._ping_t = 0  # noqa: SLF001
            return misc()

        inner.loop_misc = loop_misc  # type: ignore[method-assign]

    def _socket_opened(self, client: aiomqtt.Client, sock: object) -> None:
        if client is not self._client or sock.fileno() < 0:  # type: ignore[attr-defined]
            return  # a connection that is already gone again
        self._sock = sock
        self._reader_off = False
        if self._paused:
            self._reads_off()

    def _reads_off(self) -> None:
        sock = self._sock
        if sock is not None and not self._reader_off and self._loop is not None and sock.fileno() >= 0:  # type: ignore[attr-defined]
            self._loop.remove_reader(sock.fileno())  # type: ignore[attr-defined]
            self._reader_off = True

    def _reads_on(self) -> None:
        sock, client = self._sock, self._client
        if sock is None or client is None or not self._reader_off or self._loop is None:
            return
        if sock.fileno() < 0:  # type: ignore[attr-defined]
            self._reader_off = False
            return
        inner = client._client  # noqa: SLF001
        with inner._msgtime_mutex:  # noqa: SLF001
            inner._last_bytes_received = paho.time_func()  # noqa: SLF001
        inner._ping_t = 0  # noqa: SLF001
        self._reader_off = False

        def read_ready() -> None:  # the same as aiomqtt's reader callback
            try:
                while True:
                    inner.loop_read()
                    if hasattr(inner._sock, "pending") and inner._sock.pending() > 0:  # type: ignore[union-attr] # noqa: SLF001
                        continue
                    break
            except Exception as exc:  # noqa: BLE001 - a broken connection: aiomqtt reconnects
                if not client._disconnected.done():  # noqa: SLF001
                    client._disconnected.set_exception(exc)  # noqa: SLF001

        self._loop.add_reader(sock.fileno(), read_ready)  # type: ignore[attr-defined]
        self._loop.call_soon(read_ready)  # packets already in the read buffer: the socket will not signal them

    def _pause(self, why: str) -> None:
        self._paused = why
        self._paused_at = time.monotonic()
        self._pauses += 1
        self._metrics.intake_paused.set(1)
        self._reads_off()
        now = self._paused_at
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning(
                "Intake paused; the broker holds the backlog.",
                extra={"reason": "pending payloads at budget" if why == "held" else "resident memory near the bound",
                       "held_fraction": round(self._held_fraction(), 2), "rss_mib": self._rss >> 20,
                       "max_memory_mib": self._max_memory >> 20, "pauses": self._pauses},
            )
            self._pauses = 0

    def _resume(self) -> None:
        paused_s = time.monotonic() - self._paused_at
        self._paused = None
        self._metrics.intake_paused.set(0)
        self._reads_on()
        if paused_s >= 1.0 or time.monotonic() - self._last_log >= _LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("Intake resumed.", extra={"paused_s": round(paused_s, 1), "rss_mib": self._rss >> 20})

    def _govern(self) -> None:
        """Pause or resume reads from the held bytes and resident memory (every ``_SAMPLE_S``)."""
        held = self._held_fraction()
        rss = self._rss = resident_bytes() if self._max_memory else 0
        high = self._max_memory and rss >= _PAUSE_AT * self._max_memory
        if self._paused is None:
            if self._backed_up():
                self._pause("held")
            elif high and held > 0:
                self._pause("memory")
            return
        if self._backed_up() or held >= _RESUME_HELD:
            return
        if self._max_memory and rss >= _RESUME_RSS * self._max_memory and held > 0:
            return  # payloads are still being written: what they hold is what pausing frees
        if self._paused == "memory" and held == 0 and rss >= _RESUME_RSS * self._max_memory:
            log.warning("Resident memory stays near the bound with no payload held; reading on.",
                        extra={"rss_mib": rss >> 20, "max_memory_mib": self._max_memory >> 20})
        self._resume()

    async def _governor(self) -> None:
        while True:
            await asyncio.sleep(_SAMPLE_S)
            self._govern()

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        if not self._taking:
            return  # not acknowledged: the broker keeps it for the next session
        topic = msg.topic
        device_id = None
        if topic.startswith(self._prefix) and topic.endswith(self._suffix):
            device_id = topic[len(self._prefix): len(topic) - len(self._suffix)] or None
        content_type = None
        props = getattr(msg, "properties", None)
        if props is not None:
            content_type = getattr(props, "ContentType", None)
        ack = None
        if msg.qos > 0:
            ack = self._acks.track(msg.mid, msg.qos)
        self._submit(
            RawMessage(
                payload=msg.payload,
                source="mqtt",
                principal=device_id,
                topic_or_path=topic,
                received_at_ms=int(time.time() * 1000),
                content_type=content_type,
                topic_device_id=device_id if device_id is not None else "",
                ack=ack,
            )
        )
        if self._paused is None and self._backed_up():
            self._pause("held")

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
            governor = asyncio.create_task(self._governor(), name="mqtt-intake-governor")
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

    def publish_alerts(self, events: Sequence[AlertEvent]) -> None:
        """Publish alert events (JSON, QoS 1) on ``alerts/{device_id}``; best effort, after commit."""
        client = self._client
        if client is None or not self._connected:
            log.warning("Alerts not published: MQTT is disconnected (they are stored).", extra={"count": len(events)})
            return
        inner = client._client  # noqa: SLF001
        for ev in events:
            payload = orjson.dumps(
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
            inner.publish(self._cfg.alerts_topic.format(device_id=ev.device_id), payload, qos=1)
