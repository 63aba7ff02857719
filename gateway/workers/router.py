"""Device affinity between worker processes: forward each payload to the worker owning its device.

``Router`` has the intake surface the sources call (``submit``, ``validate``,
``accept``, ``quarantine``, ``backed_up``, ``audit``). A payload of a device this
worker owns goes to the local pipeline. Any other is forwarded, raw, to its owner over
the owner's unix socket (``<runtime dir>/w<i>.sock``) and *held* here until the owner
reports its outcome (after commit); only then are its ``ack`` and ``on_outcome`` called.
A held payload is never dropped: while its owner is unreachable (restarting) it waits
and is sent again on reconnect; the owner's dedupe stores a resent envelope once.

The frames are in ``frames.py``. A ``refused`` answer (the owner is shutting down) is
sent again later, or left unacknowledged with the broker if this worker stops too.

Backpressure: the owner stops reading frames while its pipeline is backed up; the
sender counts held payload bytes with its pipeline's (``held_fraction``), so its
MQTT source pauses reads when the two together reach the budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path

import msgspec

from gateway.errors import RejectError
from gateway.metrics import Metrics
from gateway.model import Outcome, RawMessage
from gateway.pipeline import Pipeline
from gateway.retry import Backoff
from gateway.workers import owner_of
from gateway.workers.frames import (
    HEADER, MAX_FRAME, Done, Forward, decoder, forward_frame, frame, raw_of, read_frame, socket_path,
)

__all__ = ["Router"]

log = logging.getLogger(__name__)

_REFUSED_RETRY_S = 0.5
_PEERS_WAIT_S = 30.0


class _Peer:
    """The link to one other worker: payloads held for it, in forward order."""

    def __init__(self, router: Router, index: int) -> None:
        self.router = router
        self.index = index
        self.path = socket_path(router.runtime_dir, index)
        self.held: dict[int, RawMessage] = {}  # id -> payload, insertion (forward) order
        self.unsent: deque[int] = deque()
        self.wake = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None  # set while connected and caught up
        self.connected = False
        self.task: asyncio.Task[None] | None = None

    def put(self, fid: int, raw: RawMessage) -> None:
        self.held[fid] = raw
        writer = self.writer
        if writer is not None and not self.unsent and not writer.is_closing():
            # at once, not from the sender task: a task step later could let the device's next
            # payload, read by its owner directly from the broker, overtake this one
            writer.write(forward_frame(fid, raw))
            return
        self.unsent.append(fid)
        self.wake.set()

    async def run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        down_since: float | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError as exc:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                if self.held and (backoff.attempt in (5, 50) or backoff.attempt % 200 == 0):
                    log.warning("Worker unreachable; holding the payloads forwarded to it.",
                                extra={"worker": self.index, "held": len(self.held), "error": str(exc),
                                       "down_s": round(now - down_since, 1)})
                await asyncio.sleep(backoff.next_delay())
                continue
            if down_since is not None and self.held:
                log.info("Worker reachable again; resending held payloads.",
                         extra={"worker": self.index, "held": len(self.held)})
            down_since = None
            backoff.reset()
            self.connected = True
            self.unsent = deque(self.held)  # all of them: the owner dedupes what it already stored
            answers = asyncio.create_task(self._answers(reader), name=f"forward-answers-w{self.index}")
            try:
                await self._send(writer, answers)
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                if self.held:
                    log.warning("Link to worker lost; holding its payloads.",
                                extra={"worker": self.index, "held": len(self.held), "error": repr(exc)})
            except Exception as exc:  # noqa: BLE001 - a bad frame: drop the link, keep the payloads, reconnect
                log.error("Bad answer from a worker; reconnecting.",
                          extra={"worker": self.index, "held": len(self.held), "error": repr(exc)})
                await asyncio.sleep(backoff.next_delay())
            finally:
                self.connected = False
                self.writer = None
                answers.cancel()
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, answers: asyncio.Task[None]) -> None:
        while True:
            if answers.done():
                answers.result()  # raises the reader's error
                raise ConnectionError("worker closed the link")
            if self.unsent:
                chunk = []
                while self.unsent and len(chunk) < 512:
                    fid = self.unsent.popleft()
                    raw = self.held.get(fid)
                    if raw is not None:
                        chunk.append(forward_frame(fid, raw))
                writer.write(b"".join(chunk))
                await writer.drain()
                continue
            self.writer = writer  # caught up: put() writes new payloads itself
            self.wake.clear()
            if writer.transport.get_write_buffer_size() > 0:
                await writer.drain()
            waiter = asyncio.ensure_future(self.wake.wait())
            await asyncio.wait({waiter, answers}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await read_frame(reader)
            if not isinstance(msg, Done):
                raise ValueError("unexpected frame from the owner")
            if msg.status == "refused":
                if self.router.stopping:
                    self.router.release(self, msg.id)  # left unacknowledged: the broker redelivers it
                else:
                    loop.call_later(_REFUSED_RETRY_S, self.requeue, msg.id)
                continue
            self.router.finish(self, msg)

    def requeue(self, fid: int) -> None:
        if fid in self.held:
            self.unsent.append(fid)
            self.wake.set()


class _OwnerLink(asyncio.Protocol):
    """One peer's link, owner side. Frames are taken in the I/O callback itself, not in a task,
    so that a forwarded payload is submitted as early as a payload read from the broker at
    the same time: each device's order is the order the two workers received them in."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.router._links.add(self)  # noqa: SLF001

    def connection_lost(self, exc: Exception | None) -> None:
        self.router._links.discard(self)  # noqa: SLF001
        self.transport = None  # the sender resends what it still holds

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _answer(self, fid: int):  # noqa: ANN202
        def on_outcome(o: Outcome) -> None:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(frame(Done(fid, o.status, o.ingest_id, o.reason)))
        return on_outcome

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pipeline = self.router.pipeline
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (n,) = HEADER.unpack_from(buf, pos)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes")
                if len(buf) - pos - 4 < n:
                    break
                msg = decoder.decode(memoryview(buf)[pos + 4: pos + 4 + n])
                pos += 4 + n
                if not isinstance(msg, Forward):
                    raise ValueError("unexpected frame from a worker")
                raw = raw_of(msg, on_outcome=self._answer(msg.id))
                try:
                    pipeline.submit(raw)
                except RuntimeError:  # stopping: the sender keeps it
                    self.transport.write(frame(Done(msg.id, "refused")))  # type: ignore[union-attr]
        except (ValueError, msgspec.DecodeError) as exc:
            log.error("Bad frame from a worker; closing the link.", extra={"error": str(exc)})
            self.close()
            return
        finally:
            del buf[:pos]
        if pipeline.backed_up and not self.paused and self.transport is not None:
            self.paused = True  # the sender holds them meanwhile, and pauses its own reads
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.02, self._maybe_resume)

    def _maybe_resume(self) -> None:
        if self.transport is None:
            return
        if self.router.pipeline.backed_up and not self.router.stopping:
            asyncio.get_running_loop().call_later(0.02, self._maybe_resume)
            return
        self.paused = False
        self.transport.resume_reading()


class Router:
    """The intake of one worker: local pipeline for its own devices, forwarding for the others.

    Args:
        pipeline: This worker's pipeline.
        index: This worker's index, 0..count-1.
        count: Number of workers.
        runtime_dir: Directory of the workers' sockets (shared by all of them).
        max_held: Payloads held for one peer before ``backed_up`` (the MQTT window bounds them anyway).
    """

    def __init__(self, pipeline: Pipeline, *, index: int, count: int, runtime_dir: str | Path,
                 metrics: Metrics, max_held: int = 20_000) -> None:
        self.pipeline = pipeline
        self.index = index
        self.count = count
        self.runtime_dir = Path(runtime_dir)
        self.metrics = metrics
        self.max_held = max_held
        self.stopping = False
        self._next_id = 0
        self._held_bytes = 0
        self._held = 0
        self._peers = {i: _Peer(self, i) for i in range(count) if i != index}
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_OwnerLink] = set()
        if hasattr(pipeline, "audit"):
            self.audit = pipeline.audit  # security decisions have no device state: written locally
        self._forwarded = metrics.forwarded
        metrics.forward_held.set_function(lambda: self._held)

    # ------------------------------------------------------------------ intake
    def owns(self, device_id: str | None) -> bool:
        return not device_id or owner_of(device_id, self.count) == self.index

    def submit(self, raw: RawMessage) -> None:
        device_id = raw.topic_device_id or raw.principal
        if self.owns(device_id):
            self.pipeline.submit(raw)
        else:
            self._forward(raw, owner_of(device_id, self.count))  # type: ignore[arg-type]

    def validate(self, raw: RawMessage):  # noqa: ANN201 - the pipeline's Decoded
        return self.pipeline.validate(raw)  # decoding is stateless: any worker can answer 4xx

    def accept(self, raw: RawMessage, decoded) -> None:  # noqa: ANN001
        if self.stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        device_id = decoded.device_id
        if self.owns(device_id):
            self.pipeline.accept(raw, decoded)
        else:
            self._forward(raw, owner_of(device_id, self.count))  # the owner decodes it again

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        self.pipeline.quarantine(raw, exc)  # a reject touches no device state

    @property
    def backed_up(self) -> bool:
        return self.held_fraction() >= 1.0

    @property
    def in_flight(self) -> int:
        return self.pipeline.in_flight + self._held

    @property
    def pending_bytes(self) -> int:
        return self.pipeline.pending_bytes + self._held_bytes

    @property
    def held(self) -> int:
        """Payloads forwarded to other workers and not yet committed there."""
        return self._held

    def held_fraction(self) -> float:
        """What this worker holds as a fraction of its budget: payload bytes (its pipeline's and
        those forwarded, not yet committed) and, per peer, held payloads against ``max_held``."""
        budget = self.pipeline.settings.max_pending_bytes
        frac = (self.pipeline.pending_bytes + self._held_bytes) / budget
        if self.pipeline.backed_up:
            frac = max(frac, 1.0)
        for p in self._peers.values():
            frac = max(frac, len(p.held) / self.max_held)
        return frac

    def _forward(self, raw: RawMessage, owner: int) -> None:
        if self.stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        fid = self._next_id
        self._next_id += 1
        self._held += 1
        self._held_bytes += len(raw.payload)
        self._peers[owner].put(fid, raw)
        self._forwarded.inc()

    def finish(self, peer: _Peer, done: Done) -> None:
        raw = self.release(peer, done.id)
        if raw is None:
            return  # answered twice (sent again after a reconnect)
        if raw.ack is not None:
            raw.ack()
        if raw.on_outcome is not None:
            try:
                raw.on_outcome(Outcome(done.status, done.ingest_id, done.reason))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a transport's callback must not break the link
                log.warning("Outcome callback failed.", extra={"origin": raw.topic_or_path, "error": repr(exc)})

    def release(self, peer: _Peer, fid: int) -> RawMessage | None:
        raw = peer.held.pop(fid, None)
        if raw is not None:
            self._held -= 1
            self._held_bytes -= len(raw.payload)
        return raw

    # ------------------------------------------------------------------ owner side
    def _owner_link(self) -> _OwnerLink:
        return _OwnerLink(self)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen on this worker's socket and start the links to the other workers."""
        path = socket_path(self.runtime_dir, self.index)
        path.unlink(missing_ok=True)  # left by a previous run of this worker (killed)
        self._server = await asyncio.get_running_loop().create_unix_server(self._owner_link, path=str(path))
        for p in self._peers.values():
            p.task = asyncio.create_task(p.run(), name=f"forward-w{p.index}")
        # Wait (bounded) for the other workers before the sources start: a worker taking a
        # backlog alone would hold every payload of the others' devices and stall its acks.
        deadline = time.monotonic() + _PEERS_WAIT_S
        while not all(p.connected for p in self._peers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        missing = [p.index for p in self._peers.values() if not p.connected]
        if missing:
            log.warning("Starting before every worker is reachable; payloads of their devices are held until they are.",
                        extra={"worker": self.index, "unreachable": ",".join(map(str, missing))})
        log.info("Worker links up.", extra={"worker": self.index, "workers": self.count, "socket": str(path)})

    def stop(self) -> None:
        """Stop taking payloads (forwarded ones refused from now on are left with the transport)."""
        self.stopping = True

    async def drain(self, timeout: float) -> bool:
        """Wait until every forwarded payload is answered (or refused); True if none is left."""
        deadline = time.monotonic() + timeout
        while self._held and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._held:
            log.warning("Forwarded payloads not answered in time; they stay with the broker.",
                        extra={"held": self._held})
        return not self._held

    async def close(self) -> None:
        """Stop listening and close every link (after the local pipeline has drained)."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        for p in self._peers.values():
            if p.task is not None:
                p.task.cancel()
        await asyncio.gather(*(p.task for p in self._peers.values() if p.task is not None), return_exceptions=True)
        socket_path(self.runtime_dir, self.index).unlink(missing_ok=True)
