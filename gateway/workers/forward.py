"""Forwarding client: payloads of devices this worker does not own, held until their owner's ``Done``.

Each other worker has a ``_Peer``: the payloads held for it in forward order, and a task
keeping the link to its socket (``<runtime dir>/w<i>.sock``). A payload is written at once
when the link is up and caught up, otherwise queued; every (re)connection sends all that
is still held (the owner's dedupe stores a resent envelope once). A held payload is
released only by the owner's answer: ``Done`` with its outcome calls its ``ack`` and
``on_outcome``; ``refused`` (the owner is shutting down) sends it again after
``_REFUSED_RETRY_S``, or leaves it unacknowledged with the transport if this worker is
stopping too. A bad answer drops the link and reconnects; nothing held is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path

from gateway.metrics import Metrics
from gateway.model import Outcome, RawMessage
from gateway.retry import Backoff
from gateway.workers.frames import Done, forward_frame, read_frame, socket_path

__all__ = ["Forwarder"]

log = logging.getLogger("gateway.workers.router")

_REFUSED_RETRY_S = 0.5
_CHUNK = 512  # frames per write while catching up


class _Peer:
    """The link to one other worker: payloads held for it, in forward order."""

    def __init__(self, forwarder: Forwarder, index: int, path: Path) -> None:
        self.forwarder = forwarder
        self.index = index
        self.path = path
        self.held: dict[int, RawMessage] = {}  # id -> payload, insertion (forward) order
        self.unsent: deque[int] = deque()
        self.wake = asyncio.Event()
        self.up = asyncio.Event()  # connected
        self.writer: asyncio.StreamWriter | None = None  # set while connected and caught up
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

    def requeue(self, fid: int) -> None:
        if fid in self.held:
            self.unsent.append(fid)
            self.wake.set()

    async def run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        down_since: float | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError as exc:
                # The owner is not listening (starting or restarting): try again after a backoff.
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
            self.up.set()
            self.unsent = deque(self.held)  # all of them: the owner dedupes what it already stored
            answers = asyncio.create_task(self._answers(reader), name=f"forward-answers-w{self.index}")
            bad = False
            try:
                await self._send(writer, answers)
            except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
                if self.held:
                    log.warning("Link to worker lost; holding its payloads.",
                                extra={"worker": self.index, "held": len(self.held), "error": repr(exc)})
            except Exception as exc:  # noqa: BLE001 - a bad frame: drop the link, keep the payloads, reconnect
                log.error("Bad answer from a worker; reconnecting.",
                          extra={"worker": self.index, "held": len(self.held), "error": repr(exc)})
                bad = True
            finally:
                self.up.clear()
                self.writer = None
                answers.cancel()
                writer.close()
            if bad:
                await asyncio.sleep(backoff.next_delay())  # the owner answers garbage: do not spin on it

    async def _send(self, writer: asyncio.StreamWriter, answers: asyncio.Task[None]) -> None:
        while True:
            if answers.done():
                answers.result()  # raises the reader's error
                raise ConnectionError("worker closed the link")
            if self.unsent:
                chunk = []
                while self.unsent and len(chunk) < _CHUNK:
                    raw = self.held.get(fid := self.unsent.popleft())
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
        forwarder = self.forwarder
        while True:
            msg = await read_frame(reader)
            if not isinstance(msg, Done):
                raise ValueError("unexpected frame from the owner")
            if msg.status == "refused":
                if forwarder.stopping:
                    forwarder.release(self, msg.id)  # left unacknowledged: the transport redelivers it
                else:
                    loop.call_later(_REFUSED_RETRY_S, self.requeue, msg.id)
                continue
            forwarder.finish(self, msg)


class Forwarder:
    """Forwards payloads to the workers owning their devices and holds them until answered.

    Args:
        index: This worker's index (no link to itself).
        count: Number of workers.
        runtime_dir: Directory of the workers' sockets.
        metrics: For ``gateway_forwarded_total`` and ``gateway_forward_held``.
    """

    def __init__(self, *, index: int, count: int, runtime_dir: str | Path, metrics: Metrics) -> None:
        self.stopping = False
        self.held = 0  # payloads forwarded and not answered
        self.held_bytes = 0
        self._next_id = 0
        self._peers = {i: _Peer(self, i, socket_path(runtime_dir, i)) for i in range(count) if i != index}
        self._empty = asyncio.Event()
        self._empty.set()
        self._forwarded = metrics.forwarded
        metrics.forward_held.set_function(lambda: self.held)

    def most_held(self) -> int:
        """Payloads held for the peer holding most."""
        return max((len(p.held) for p in self._peers.values()), default=0)

    def put(self, owner: int, raw: RawMessage) -> None:
        if self.stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        fid = self._next_id
        self._next_id += 1
        self.held += 1
        self.held_bytes += len(raw.payload)
        self._empty.clear()
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
            self.held -= 1
            self.held_bytes -= len(raw.payload)
            if not self.held:
                self._empty.set()
        return raw

    async def start(self, wait_s: float) -> list[int]:
        """Start the links; wait up to ``wait_s`` for all of them; return the peers still unreachable."""
        for p in self._peers.values():
            p.task = asyncio.create_task(p.run(), name=f"forward-w{p.index}")
        waiting = [asyncio.ensure_future(p.up.wait()) for p in self._peers.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=wait_s)
            for w in waiting:
                w.cancel()
        return [p.index for p in self._peers.values() if not p.up.is_set()]

    def stop(self) -> None:
        """Take no more payloads; a refusal from now on leaves its payload with the transport."""
        self.stopping = True

    async def drain(self, timeout: float) -> bool:
        """Wait until every forwarded payload is answered (or refused); True if none is left."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("Forwarded payloads not answered in time; they stay with the broker.",
                        extra={"held": self.held})
        return not self.held

    async def close(self) -> None:
        tasks = [p.task for p in self._peers.values() if p.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
