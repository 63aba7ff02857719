"""NATS source (cluster mode): the partitions of the device stream this process owns.

Devices publish QoS 1 over MQTT 3.1.1 to any node of a NATS JetStream cluster; their
PUBACK means the message is stored in the replicated ``$MQTT_msgs`` stream (see
``gateway.cluster``). This source joins the members (``membership``), pulls the
partitions rendezvous hashing gives it (``partition``), hands each message to the
pipeline with the same decode, identity (the device id in the subject binds the envelope,
as the MQTT topic does), dedupe, checks and alerts as MQTT, and acknowledges it after
commit. Unacknowledged messages are bounded by ``max_in_flight`` here, ``max_ack_pending``
per partition on the server, and the pipeline's memory budget (pulls wait while it is
backed up). Messages held longer than half of ``ack_wait_s`` get a progress ack, so a slow
commit does not turn into redeliveries.

It is also the ``Publisher`` of alert events (``alerts_subject``; an MQTT client sees
``alerts.d1`` as ``alerts/d1``), the owner of the ``Fence`` the sink checks in every
commit, and the scope of the ``silent`` clock (``app.py`` wires all three). The clock is
the one part of the rules that does not follow messages: replay's clock is the latest
receipt seen, so a device is silent only when the stream has been read up to now and
holds nothing newer of it. Live, the tick therefore waits while this process is
disconnected or a partition it holds has not been read up to now (``clock_behind``), and
speaks only for devices of partitions it holds, stamped with their epoch so that the
fence drops it if the partition changed hands meanwhile (``clock_events``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
import secrets
import time

import nats

from gateway.cluster.engine import EngineError, Layout, connect
from gateway.cluster.fence import Fence
from gateway.cluster.membership import Members, rendezvous
from gateway.config import NatsConfig
from gateway.metrics import Metrics
from gateway.model import AlertEvent, RawMessage
from gateway.sources import Intake, SourceContext, SourceHealth
from gateway.sources.nats.partition import Delivery, Forget, Partition

__all__ = ["NatsSource", "build"]

log = logging.getLogger(__name__)
_POLL_S = 0.5
# Devices heard from within the longest silent after_s plus this are taken on with a
# partition: a device that went quiet just before its partition's owner failed is among them.
_ADOPT_MARGIN_S = 60.0
# ``Pipeline.restore_recent(window_s, owns)``: restore and arm the devices ``owns`` picks
# among those heard from within ``window_s``; returns those taken on.
Adopt = Callable[[float, Callable[[str], bool]], Awaitable[list[str]]]


def build(cfg: NatsConfig, ctx: SourceContext) -> NatsSource:
    """The NATS source of the ``nats`` section (``gateway.sources.SOURCES``)."""
    return NatsSource(cfg, member=ctx.gateway_id, intake=ctx.intake, metrics=ctx.metrics)


class NatsSource:
    """Membership, partition pulls and acknowledgements of one gateway process."""

    def __init__(self, cfg: NatsConfig, *, member: str, intake: Intake, metrics: Metrics) -> None:
        self.cfg = cfg
        self.member = member
        self.owner = f"{member}/{secrets.token_hex(4)}"  # a restarted process is a new owner
        self.intake = intake
        self.metrics = metrics
        self.layout = Layout.of(cfg)
        self.nc: nats.NATS = None  # type: ignore[assignment]
        self.members: Members | None = None
        self.fence: Fence | None = None
        self.parts = [Partition(self, p, self.layout.durable(p)) for p in range(cfg.partitions)]
        self.consumer_of: dict[str, str] = {}  # device id -> partition consumer, as seen
        self.in_flight = 0
        self.taking = True
        self._forget: Forget = lambda _devices: None
        self._adopt: Adopt | None = None
        self._adopt_window_s = 0.0
        self._acks: list[tuple[str, bytes]] = []
        self._acks_ready = asyncio.Event()
        self._room = asyncio.Event()
        self._closing = asyncio.Event()
        self._live: set[str] = set()
        self._last_error = ""

    def bind(self, dsn: str, forget: Forget, adopt: Adopt | None = None, silent_after_s: float = 0.0) -> Fence:
        """Wire the database (claims, the commit fence) and the pipeline's ``forget`` and
        ``adopt``; return the fence."""
        self._forget = forget
        self._adopt = adopt
        self._adopt_window_s = silent_after_s + _ADOPT_MARGIN_S
        self.fence = Fence(dsn, self.owner, consumer_of_device=self.consumer_of.get,
                           held_epoch=lambda c: self.parts[self._index(c)].epoch, deposed=self._deposed,
                           left_out=self.metrics.fenced.inc, stale=self.forget)
        return self.fence

    def _index(self, consumer: str) -> int:
        return int(consumer.rsplit("-p", 1)[1])

    # ---------------------------------------------------------------- lifecycle (gateway.sources.Source)
    async def start(self) -> None:
        if self.fence is None:
            raise RuntimeError("NatsSource.bind() must be called before start()")
        await self.fence.start()

    async def run(self) -> None:
        backoff_s = 0.5
        while not self._closing.is_set():
            try:
                self.nc = await connect(self.cfg, name=f"vitalgate-{self.member}",
                                        disconnected_cb=self._down, reconnected_cb=self._up, error_cb=self._error)
                break
            except Exception as exc:  # noqa: BLE001 - no node reachable yet
                if "older than" in str(exc):
                    raise
                log.warning("NATS not reachable yet; retrying.", extra={"servers": self.cfg.servers, "error": str(exc)})
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
        if self._closing.is_set():
            return
        self.metrics.nats_connected.set(1)
        self.members = Members(self.nc, self.cfg.members_bucket, self.member, ttl_s=self.cfg.member_ttl_s,
                               replicas=self.cfg.replicas)
        for part in self.parts:
            await part.subscribe()
        log.info("Joined the cluster.", extra={"member": self.member, "owner": self.owner,
                                                "partitions": self.cfg.partitions, "servers": self.cfg.servers})
        tasks = [asyncio.create_task(self._membership(), name="nats-membership"),
                 asyncio.create_task(self._send_acks(), name="nats-acks"),
                 asyncio.create_task(self._progress(), name="nats-progress")]
        try:
            await self._closing.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop_intake(self) -> None:
        self.taking = False
        for part in self.parts:
            part.wanted = False
        self._room.set()

    async def close(self) -> None:
        """Send the acks of what was committed, leave the members, unpin, disconnect."""
        self.stop_intake()
        pulls = [p.task for p in self.parts if p.task is not None]
        if pulls:
            await asyncio.wait(pulls, timeout=self.cfg.ack_wait_s * 2 + self.cfg.pull_expires_s + 3)
        if self.nc is not None and self.nc.is_connected:
            await self._flush_acks()
            try:
                if self.members is not None:
                    await self.members.leave()
                await self.nc.drain()
            except Exception as exc:  # noqa: BLE001
                log.warning("NATS close failed.", extra={"error": str(exc)})
        self._closing.set()
        if self.fence is not None:
            await self.fence.close()
        self.metrics.nats_connected.set(0)

    # ---------------------------------------------------------------- membership and ownership
    async def _membership(self) -> None:
        """Heartbeat every third of the TTL; list the members twice a second; follow rendezvous.

        While the bucket had no leader (6-7 s after a node dies) every member's heartbeat
        failed and their keys expired: right after it answers again, the list shows only the
        members whose heartbeat got through first, or none. A list without this member's own
        key is not believed at all, and departures only once the bucket has answered for a
        whole TTL (every live member has heartbeated since); arrivals at once. Without that,
        a node kill moved partitions back and forth.
        """
        assert self.members is not None
        last_beat = 0.0
        opened = False
        answering_since: float | None = None
        while True:
            try:
                if not opened:
                    await self.members.open()
                    opened = True
                now = time.monotonic()
                if now - last_beat >= self.cfg.member_ttl_s / 3:
                    await self.members.heartbeat()
                    last_beat = now
                live = await self.members.live()
                if self.member not in live:  # our own key, renewed within a third of the TTL, is missing
                    raise EngineError("the member list is incomplete (the bucket is recovering)")
            except Exception as exc:  # noqa: BLE001 - no leader or no connection: keep what we have
                log.debug("Membership unavailable.", extra={"error": str(exc)})
                answering_since = None
                await asyncio.sleep(_POLL_S)
                continue
            if answering_since is None:
                answering_since = time.monotonic()
            if time.monotonic() - answering_since < self.cfg.member_ttl_s and self._live:
                live = live | self._live
            if live != self._live:
                log.info("Members changed.", extra={"members": ",".join(sorted(live))})
                self._live = live
            mine = rendezvous(self.cfg.partitions, live, self.member) if self.taking else set()
            for part in self.parts:
                want = part.index in mine
                if want and (part.task is None or part.task.done()):
                    part.wanted = True
                    part.task = asyncio.create_task(part.run(), name=f"nats-pull-{part.consumer}")
                elif not want and part.wanted:
                    part.wanted = False
            await asyncio.sleep(_POLL_S)

    def _deposed(self, consumers: set[str]) -> None:
        for c in consumers:
            self.parts[self._index(c)].deposed()

    def owned_changed(self) -> None:
        self.metrics.partitions_owned.set(sum(1 for p in self.parts if p.pin is not None and p.epoch is not None))

    def forget(self, devices: set[str]) -> None:
        self._forget(set(devices))

    async def adopt(self, part: Partition, epoch: int) -> None:
        """Take on the partition's devices heard from lately, before any new reading of theirs:
        one that went quiet while the partition changed hands has no reading to arm its
        ``silent`` rule here, yet must still open its episode."""
        if self._adopt is None or not self._adopt_window_s > _ADOPT_MARGIN_S:
            return
        try:
            devices = await self._adopt(self._adopt_window_s, lambda d: self.layout.partition_of(d) == part.index)
        except Exception as exc:  # noqa: BLE001 - the devices are taken on when their readings come
            log.warning("Devices of a partition taken over not looked up.", extra={"partition": part.consumer,
                                                                                   "error": str(exc)})
            return
        if part.epoch != epoch:  # lost meanwhile: release() forgot what it knew; these too
            self.forget(set(devices))
            return
        for d in devices:
            part.devices.add(d)
            self.consumer_of[d] = part.consumer
        log.info("Devices of the partition taken on.", extra={"partition": part.consumer, "devices": len(devices)})

    # ---------------------------------------------------------------- the silent clock (Pipeline.scope_clock)
    def clock_behind(self) -> bool:
        """True while ticks would mistake messages waiting in the engine for silence."""
        if not self.connected:
            return True
        limit = time.monotonic() - (self.cfg.pull_expires_s + 2.0)
        return any(p.epoch is not None and (p.drained_at is None or p.drained_at < limit) for p in self.parts)

    def clock_events(self, events: list[AlertEvent]) -> list[AlertEvent]:
        """The tick's events for devices of partitions held now, each stamped with the epoch."""
        assert self.fence is not None
        keep, stale = [], set()
        for ev in events:
            consumer = self.consumer_of.get(ev.device_id)
            if consumer is None:  # not a device of the stream (HTTPS): not partitioned
                keep.append(ev)
                continue
            part = self.parts[self._index(consumer)]
            if part.epoch is None or ev.device_id not in part.devices:
                stale.add(ev.device_id)
                continue
            self.fence.stamp(ev, consumer, part.epoch)
            keep.append(ev)
        if stale:
            self.forget(stale)
        return keep

    # ---------------------------------------------------------------- intake
    def room(self) -> int:
        if self.intake.backed_up:
            return 0
        return self.cfg.max_in_flight - self.in_flight

    async def wait_room(self) -> None:
        self._room.clear()
        try:
            await asyncio.wait_for(self._room.wait(), 0.05)
        except asyncio.TimeoutError:
            pass

    def take(self, msg, device_id: str, delivery: Delivery) -> None:  # type: ignore[no-untyped-def]
        headers = msg.headers or {}
        source = "https" if headers.get("Vg-Source") == "https" else "mqtt"
        topic = "/v1/telemetry"
        if source == "mqtt":  # the MQTT topic: $MQTT.msgs.<topic levels>.n<count>.<partition>
            topic = "/".join(t.replace("//", ".") for t in msg.subject.split(".")[2:-2])
        self.intake.submit(RawMessage(
            payload=msg.data, source=source, principal=headers.get("Vg-Principal", device_id or None),
            topic_or_path=topic, received_at_ms=int(time.time() * 1000), content_type=headers.get("Content-Type"),
            topic_device_id=device_id, ack=delivery, remote_addr=headers.get("Vg-Remote-Addr"),
        ))

    # ---------------------------------------------------------------- acknowledgements
    def send_ack(self, reply: str) -> None:
        self._acks.append((reply, b"+ACK"))
        self._acks_ready.set()
        self._room.set()

    async def _send_acks(self) -> None:
        while True:
            await self._acks_ready.wait()
            self._acks_ready.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        for reply, what in acks:
            try:
                await self.nc.publish(reply, what)
            except Exception as exc:  # noqa: BLE001 - connection closed: the message is redelivered, stored once
                log.warning("Ack not sent.", extra={"error": str(exc), "acks": len(acks)})
                return

    async def _progress(self) -> None:
        """Progress acks (+WPI) for held messages of owned partitions, every third of ack_wait."""
        period = self.cfg.ack_wait_s / 3
        while True:
            await asyncio.sleep(period)
            for part in self.parts:
                if part.epoch is None or not part.wanted:
                    continue  # handing over: let ack_wait run out before the next owner pulls
                for reply in part.expired_holds(self.cfg.ack_wait_s / 2):
                    self._acks.append((reply, b"+WPI"))
                    part.held[reply].pulled_at = time.monotonic()
            if self._acks:
                self._acks_ready.set()

    # ---------------------------------------------------------------- connection events
    async def _down(self) -> None:
        self.metrics.nats_connected.set(0)
        log.warning("NATS connection lost; reconnecting.")

    async def _up(self) -> None:
        self.metrics.nats_connected.set(1)
        log.info("NATS reconnected.", extra={"server": str(self.nc.connected_url.netloc if self.nc.connected_url else "")})

    async def _error(self, exc: Exception) -> None:
        self._last_error = str(exc) or type(exc).__name__
        log.debug("NATS client error.", extra={"error": str(exc)})

    def health(self) -> SourceHealth:
        """``/readyz``: connected to a server of the cluster, and how many partitions are held."""
        if not self.connected:
            return SourceHealth(False, f"nats: not connected to {self.cfg.servers}: {self._last_error or 'connecting'}")
        held = sum(1 for p in self.parts if p.pin is not None and p.epoch is not None)
        url = self.nc.connected_url
        return SourceHealth(True, f"nats: connected to {url.netloc if url else self.cfg.servers}; "
                                  f"{held} of {self.cfg.partitions} partitions held")

    # ---------------------------------------------------------------- alert publication (gateway.sinks.alerts.Publisher)
    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def waiting(self) -> int:
        return len(self._acks)

    def publish(self, topic: str, payload: bytes, qos: int) -> None:  # noqa: ARG002 - core NATS: as sent
        self._acks.append((topic, payload))
        self._acks_ready.set()
