"""One partition of the device stream as this process sees it: pulls, pin, epoch, acks.

A partition is pulled only while membership gives it to this process (``wanted``). The
first message that arrives under a new pin (``Nats-Pin-Id``) makes the partition ours:
the owner is claimed in the database (``Fence.claim``) before that message goes further,
and when another owner held it, the check state of its devices is dropped so that it is
restored from storage. Each message carries its ``Delivery``: acknowledged after commit
only while this process still holds the epoch it was pulled under.

Order across a take-over: the server delivers in stream order, but messages the previous
holder of the pin had not acknowledged come back only when their ``ack_wait`` runs out.
When the pin moved because the holder stopped pulling (``priority_timeout`` >
``ack_wait`` + pull expiry) they are due already and come first; when it moved early (the
pins are reset when a server dies, an unpin with messages still in flight, a commit
fenced) newer messages would come first. So after a claim the partition is *gated*: what
arrives is held back until every message delivered and not acknowledged is in this
process's hands (``num_ack_pending`` of the consumer equals what the gate holds: the
undelivered ones are all newer), then handed on in stream order.

When the partition stops being ours (handed over, the pin moved, or a commit found
another owner) it is *released*: the check and rule state of its devices is forgotten, so
no ``silent`` tick of this process speaks for devices it no longer reads, and the next
owner (or this process, taking it back) restores their state from storage.

Pull replies carry a status instead of messages: 408 the pull expired, 423 the pin moved
to another gateway, 503 no leader (back off), 409 the server's limits (back off). A pull
that expired before its batch was full (408) means every message stored until then has
been delivered: ``drained_at`` is when that last happened (the ``silent`` clock waits
while a held partition has not been read up to now, see ``NatsSource.clock_behind``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from gateway.cluster.engine import GROUP, STREAM
from gateway.retry import Backoff

if TYPE_CHECKING:
    from gateway.sources.nats import NatsSource

__all__ = ["Partition", "Delivery"]

log = logging.getLogger(__name__)
_NS = 1_000_000_000


class Delivery:
    """``RawMessage.ack`` of a message from the device stream (the fence reads its fields)."""

    __slots__ = ("part", "consumer", "epoch", "reply", "pulled_at")

    def __init__(self, part: Partition, reply: str, epoch: int) -> None:
        self.part = part
        self.consumer = part.consumer
        self.epoch = epoch
        self.reply = reply
        self.pulled_at = time.monotonic()

    def __call__(self) -> None:
        part = self.part
        part.done(self)
        if part.epoch == self.epoch:
            part.source.send_ack(self.reply)
        # else: pulled under an epoch since lost; the new owner gets it again


class Partition:
    """State of partition ``index``: wanted by membership, the pin, the epoch held, what is in flight."""

    def __init__(self, source: NatsSource, index: int, consumer: str) -> None:
        self.source = source
        self.index = index
        self.consumer = consumer
        self.wanted = False
        self.pin: str | None = None
        self.epoch: int | None = None  # held in partition_owners; None: not (or no longer) ours
        self.held: dict[str, Delivery] = {}  # reply subject -> delivery, not yet acknowledged
        self.devices: set[str] = set()
        self.drained_at: float | None = None  # monotonic time of the last pull that found no more
        self.gate: dict[int, tuple[object, str, Delivery]] | None = None  # stream seq -> held back, after a claim
        self.task: asyncio.Task[None] | None = None
        self._inbox = ""
        self._sub = None
        self._want = 0  # messages the current pull may still bring
        self._pull_done: asyncio.Event = asyncio.Event()
        self._status = ""
        self._gate_task: asyncio.Task[None] | None = None
        self._adopt_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return len(self.held)

    def done(self, d: Delivery) -> None:
        if self.held.pop(d.reply, None) is not None:
            self.source.in_flight -= 1

    async def subscribe(self) -> None:
        nc = self.source.nc
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_message)

    async def run(self) -> None:
        """Pull while wanted; then hand over: wait for what is in flight, unpin."""
        src = self.source
        backoff = Backoff(0.25, 1.0)  # 503 during an election (6-7 s): retry soon after, never spin
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{self.consumer}"
        while self.wanted and src.taking:
            room = src.room()
            if room <= 0:
                await src.wait_room()
                continue
            n = min(src.cfg.pull_batch, room)
            body = {"batch": n, "expires": int(src.cfg.pull_expires_s * _NS), "group": GROUP}
            if self.pin:
                body["id"] = self.pin
            self._want, self._status = n, ""
            self._pull_done.clear()
            sent_at = time.monotonic()
            try:
                await src.nc.publish(subject, orjson.dumps(body), reply=self._inbox)
                await asyncio.wait_for(self._pull_done.wait(), src.cfg.pull_expires_s + 1.0)  # no answer: a leader gone
            except asyncio.TimeoutError:
                self._status = "timeout"
            except Exception as exc:  # noqa: BLE001 - disconnected: the client reconnects
                self._status = f"error {type(exc).__name__}"
            status = self._status
            if status in ("", "408", "404"):
                if status and self.epoch is not None:
                    self.drained_at = sent_at  # everything stored before this pull was sent has come
                backoff.reset()
                continue
            if status == "423":  # the pin moved: another gateway pulls now; the fence decides what may commit
                log.info("Partition pin moved.", extra={"partition": self.consumer})
                self.release()
                continue
            delay = backoff.next_delay()
            if backoff.attempt == 1 or backoff.attempt % 10 == 0:
                log.warning("Pull refused; backing off.", extra={"partition": self.consumer, "status": status,
                                                                 "retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)
        await self._hand_over()

    async def _hand_over(self) -> None:
        """Give the partition up: wait for its messages in flight, then unpin it for the next owner."""
        src = self.source
        if self.pin is None and not self.held:
            return
        deadline = time.monotonic() + src.cfg.ack_wait_s * 2
        while self.held and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            from gateway.cluster.engine import api

            await api(src.nc, f"$JS.API.CONSUMER.UNPIN.{STREAM}.{self.consumer}", {"group": GROUP}, timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - the server moves the pin after priority_timeout anyway
            log.warning("Unpin failed; the pin moves after priority_timeout.", extra={"partition": self.consumer,
                                                                                      "error": str(exc)})
        self.release()
        src.metrics.partition_changes.labels("handed_over").inc()
        log.info("Partition handed over.", extra={"partition": self.consumer, "left_in_flight": len(self.held)})

    async def _on_message(self, msg) -> None:  # type: ignore[no-untyped-def]
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None and not msg.data:
            self._status = status
            self._pull_done.set()
            return
        src = self.source
        pin = headers.get("Nats-Pin-Id")
        if pin is not None and pin != self.pin:
            await self._claim(pin)
        self._want -= 1
        if self._want <= 0:
            self._pull_done.set()
        if self.epoch is None or not src.taking:
            return  # not claimed (database away) or stopping: left unacknowledged, redelivered
        parsed = src.layout.parse(msg.subject)
        device_id = parsed[0] if parsed else ""
        if device_id and device_id not in self.devices:
            self.devices.add(device_id)
            src.consumer_of[device_id] = self.consumer
        d = Delivery(self, msg.reply, self.epoch)
        self.held[msg.reply] = d
        src.in_flight += 1
        if self.gate is None:
            src.take(msg, device_id, d)
            return
        try:
            sseq = int(msg.metadata.sequence.stream)
        except Exception:  # noqa: BLE001 - not a JetStream delivery: nothing to order it by
            sseq = -len(self.gate) - 1
        old = self.gate.get(sseq)
        if old is not None:  # delivered again while gated: keep the newest delivery, drop the older
            self.done(old[2])
        self.gate[sseq] = (msg, device_id, d)

    async def _open_gate(self, epoch: int) -> None:
        """Hold the partition's messages back until every unacknowledged one is here; then in order."""
        src = self.source
        from gateway.cluster.engine import api

        deadline = time.monotonic() + src.cfg.ack_wait_s * 2 + src.cfg.pull_expires_s + 1.0
        waited = 0.0
        start = time.monotonic()
        while self.epoch == epoch and self.gate is not None and time.monotonic() < deadline:
            try:
                info = await api(src.nc, f"$JS.API.CONSUMER.INFO.{STREAM}.{self.consumer}", timeout=2.0)
                if int(info.get("num_ack_pending", 0)) <= len(self.gate):
                    break
            except Exception as exc:  # noqa: BLE001 - no leader yet: ask again
                log.debug("Consumer info unavailable.", extra={"partition": self.consumer, "error": str(exc)})
            await asyncio.sleep(0.1)
        else:
            if self.epoch == epoch and self.gate is not None:
                log.warning("Take-over gate opened at its deadline: messages still held elsewhere may come late.",
                            extra={"partition": self.consumer})
        waited = time.monotonic() - start
        gate, self.gate = self.gate, None
        if gate is None or self.epoch != epoch:
            return
        for sseq in sorted(gate):
            msg, device_id, d = gate[sseq]
            if d.reply in self.held:
                src.take(msg, device_id, d)
        log.info("Partition open after take-over.", extra={"partition": self.consumer, "held_back": len(gate),
                                                           "waited_s": round(waited, 2)})

    async def _claim(self, pin: str) -> None:
        src = self.source
        backoff = Backoff(0.2, 2.0)
        while src.taking:
            try:
                epoch, taken = await src.fence.claim(self.consumer)
                break
            except Exception as exc:  # noqa: BLE001 - the database is away: messages wait unacknowledged
                delay = backoff.next_delay()
                log.warning("Partition claim failed; retrying.", extra={"partition": self.consumer, "error": str(exc)})
                await asyncio.sleep(delay)
        else:
            return
        if taken and self.devices:
            src.forget(self.devices)  # another owner wrote since: restore from storage
        self.pin, self.epoch, self.drained_at = pin, epoch, None
        self.gate = {}
        self._gate_task = asyncio.create_task(self._open_gate(epoch), name=f"nats-gate-{self.consumer}")
        self._adopt_task = asyncio.create_task(src.adopt(self, epoch), name=f"nats-adopt-{self.consumer}")
        src.metrics.partition_changes.labels("taken").inc()
        src.owned_changed()
        log.info("Partition taken.", extra={"partition": self.consumer, "epoch": epoch, "from_other_owner": taken})

    def deposed(self) -> None:
        """The database names another owner: nothing pulled so far may be acknowledged."""
        if self.epoch is None and not self.devices:
            return  # released already
        self.release()
        self.source.metrics.partition_changes.labels("lost").inc()
        log.warning("Partition lost to another owner.", extra={"partition": self.consumer})

    def release(self) -> None:
        """No longer ours: deliveries in flight are not acknowledged (their epoch is gone), and
        the state of the partition's devices is forgotten."""
        self.epoch = None
        self.pin = None
        self.drained_at = None
        if self.gate is not None:  # never handed on: not acknowledged, redelivered to the next owner
            for _msg, _dev, d in self.gate.values():
                self.done(d)
            self.gate = None
        if self.devices:
            self.source.forget(self.devices)
            self.devices = set()
        self.source.owned_changed()

    def expired_holds(self, older_than: float) -> list[str]:
        """Reply subjects of deliveries held longer than ``older_than`` seconds (for +WPI)."""
        limit = time.monotonic() - older_than
        return [r for r, d in self.held.items() if d.pulled_at < limit]


Forget = Callable[[set[str]], None]
