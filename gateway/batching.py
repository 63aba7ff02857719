"""The batch being filled: what the writer takes next, and when it is sealed.

Owns the open batch and the sealed ones waiting for the writer, sealing by rows, bytes or
age, and the pending-key dedupe: a payload equal to one still waiting to be written is not
added twice, it is acknowledged with that write. Also keeps the totals sources read for
backpressure (payloads, rows and bytes taken and not yet acknowledged).
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.clock import Clock
from gateway.decode import Decoded
from gateway.evaluate import Key
from gateway.model import AuditEvent, RawMessage
from gateway.sinks import Rejected

__all__ = ["Batch", "Batcher"]


class Batch:
    """Payloads taken together: decoded envelopes, rejects, audit events, in arrival order."""

    __slots__ = ("items", "raws", "order", "rejected", "rows", "nbytes", "held", "created", "keys", "dups",
                 "outcomes", "ids_by_key", "keep_ids", "audit")

    def __init__(self) -> None:
        self.items: list[Decoded] = []
        self.raws: list[RawMessage] = []
        self.order: list[RawMessage] = []
        self.rejected: list[Rejected] = []
        self.rows = 0
        self.nbytes = 0
        self.created = 0.0
        self.keys: list[Key] = []
        self.held = 0  # payload bytes of every message in ``order``
        # payloads equal to one already pending: (raw, key, batch holding the original)
        self.dups: list[tuple[RawMessage, Key, Batch]] = []
        self.outcomes = False  # some payload wants its Outcome (RawMessage.on_outcome)
        self.keep_ids = False  # a later duplicate needs this batch's ingest ids
        self.ids_by_key: dict[Key, int | None] = {}
        self.audit: list[AuditEvent] = []

    @property
    def empty(self) -> bool:
        """Nothing to write: no payload and no audit event."""
        return not self.order and not self.audit

    def __len__(self) -> int:
        return len(self.order)


class Batcher:
    """Fills batches and hands sealed ones to the writer (``next``)."""

    def __init__(self, *, max_rows: int, max_bytes: int, max_age_s: float, clock: Clock) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self.current = Batch()
        self._sealed: deque[Batch] = deque()
        self._pending_keys: dict[Key, Batch] = {}
        self._wakeup = asyncio.Event()
        self.closed = False  # draining: ``next`` seals what is open and ends when all is handed out
        self.in_flight = 0
        self.pending_rows = 0
        self.pending_bytes = 0

    def take(self, raw: RawMessage) -> Batch:
        """Count ``raw`` as held by the open batch; return that batch."""
        batch = self.current
        if batch.empty:
            batch.created = self._clock.monotonic()
        self.in_flight += 1
        batch.order.append(raw)
        size = len(raw.payload)
        batch.held += size
        self.pending_bytes += size
        if raw.on_outcome is not None:
            batch.outcomes = True
        return batch

    def add(self, batch: Batch, raw: RawMessage, d: Decoded, key: Key) -> bool:
        """Add a decoded envelope; False when an equal one is already pending (acked with it)."""
        holder = self._pending_keys.get(key)
        if holder is not None:
            holder.keep_ids = True
            batch.dups.append((raw, key, holder))
            return False
        self._pending_keys[key] = batch
        batch.items.append(d)
        batch.raws.append(raw)
        batch.keys.append(key)
        rows = len(d.num_t) + len(d.wav_t0)
        batch.rows += rows
        self.pending_rows += rows
        batch.nbytes += d.payload_bytes
        return True

    def reject(self, batch: Batch, rejected: Rejected) -> None:
        batch.rejected.append(rejected)
        batch.nbytes += len(rejected.raw.payload)

    def audit(self, event: AuditEvent) -> None:
        """Add an audit event to the open batch (which may hold nothing else)."""
        batch = self.current
        if batch.empty:
            batch.created = self._clock.monotonic()
            self._wakeup.set()
        batch.audit.append(event)

    def filled(self, batch: Batch) -> None:
        """After a payload was taken: seal a full batch, wake the writer for a new one."""
        if batch.rows >= self.max_rows or batch.nbytes >= self.max_bytes:
            self.seal()
        elif len(batch.order) == 1:
            self._wakeup.set()

    def seal(self) -> None:
        if not self.current.empty:
            self._sealed.append(self.current)
            self.current = Batch()
        self._wakeup.set()

    def close(self) -> None:
        """No more payloads will be taken: hand out what is open, then end ``next``."""
        self.closed = True
        self.seal()

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        """Nothing taken that the writer has not been handed."""
        return not self._sealed and self.current.empty

    async def next(self, *, until: float) -> Batch | None:
        """The next sealed batch; ``None`` at monotonic time ``until`` or, once ``closed``,
        when everything taken was handed out. A batch older than ``max_age_s`` is sealed."""
        while True:
            if self._sealed:
                return self._sealed.popleft()
            cur = self.current
            if self.closed:
                if not cur.empty:
                    self.seal()
                    continue
                return None
            now = self._clock.monotonic()
            deadline = until
            if not cur.empty:
                age_deadline = cur.created + self.max_age_s
                if now >= age_deadline:
                    self.seal()
                    continue
                deadline = min(deadline, age_deadline)
            if now >= until:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - now))
            except asyncio.TimeoutError:
                pass

    def release(self, batch: Batch) -> None:
        """A batch was committed and acknowledged: it no longer holds its keys, rows, bytes."""
        for k in batch.keys:
            self._pending_keys.pop(k, None)
        self.in_flight -= len(batch.order)
        self.pending_rows -= batch.rows
        self.pending_bytes -= batch.held
