"""decode -> batch -> evaluate -> write -> acknowledge: the orchestration of one gateway's intake.

Sources call ``submit()`` (synchronous, cheap: decode and append). The writer task ``run()``
takes sealed batches, drops envelopes already stored, evaluates the rest (checks and alert
rules, ``gateway.evaluate``), writes each batch in one transaction and acknowledges every
payload of it in arrival order: stored, duplicate and rejected alike. Nothing is
acknowledged before its outcome is committed.

Each job lives in its own room; this module only wires them:
``identity`` (who may write, audit of refusals), ``batching`` (the batch being filled,
pending-key dedupe), ``evaluate`` (dedupe -> checks -> rules, shared with replay),
``restore`` (state from storage after a restart, devices taken on), ``writepolicy`` (retry, hold, bisect),
``acks`` (ordered acknowledgement, outcomes, metrics, alert publication) and ``ticker``
(silent-device ticks, "behind" detection). Time comes from an injected ``Clock``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import cast

from gateway.acks import Acknowledger, AlertPublisher, CommitListener
from gateway.batching import Batch, Batcher
from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.decode import Decoded, decode
from gateway.errors import IdentityError, RejectError, SinkError
from gateway.evaluate import Evaluator, Key, key_of
from gateway.identity import Identity, denied_event, log_unwritten
from gateway.metrics import Metrics
from gateway.model import AlertEvent, AuditEvent, RawMessage
from gateway.profiles import Profile
from gateway.registry import Registry
from gateway.restore import Restorer
from gateway.settings import PipelineSettings
from gateway.sinks import Rejected, Sink, StateStore, WriteBatch
from gateway.ticker import Ticker
from gateway.writepolicy import WritePolicy

__all__ = ["PipelineSettings", "Pipeline"]

log = logging.getLogger(__name__)


class Pipeline:
    """The ingestion pipeline of one gateway process. ``sink`` is written to; ``store`` (default:
    ``sink``) answers which envelopes are stored already and what to restore after a restart."""

    def __init__(
        self,
        *,
        profiles: Mapping[str, Profile],
        sink: Sink,
        settings: PipelineSettings,
        store: StateStore | None = None,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        registry: Registry | None = None,
    ) -> None:
        self._identity = Identity(registry, require_registration=settings.require_registration,
                                  default_profile=settings.default_profile)
        self.profiles = profiles
        self.store = store if store is not None else cast(StateStore, sink)
        self.settings = s = settings
        self.metrics = metrics or Metrics()
        self._evaluator = Evaluator(profiles, s.checks)
        self._batcher = Batcher(max_rows=s.max_rows, max_bytes=s.max_bytes, max_age_s=s.max_age_s, clock=clock)
        self._policy = WritePolicy(sink, self.metrics, retry_initial_s=s.retry_initial_s, retry_max_s=s.retry_max_s)
        self._restorer = Restorer(self.store, self._evaluator, self._policy.retry)
        # restore_recent(horizon_s, owns): take devices seen lately on (at start, a partition taken over);
        # forget(devices): drop their state, another gateway wrote them (cluster mode). See gateway.restore.
        self.restore_recent, self.forget = self._restorer.restore_recent, self._restorer.forget
        self.ticker = Ticker(self._evaluator, clock, tick_s=s.tick_s, behind_lag_s=s.behind_lag_s,
                             behind_hold_s=s.behind_hold_s)  # public: a source may scope its clock
        self._acks = Acknowledger(self.metrics, clock, self._batcher.release)
        self._stopping = False
        self._audit_closed = False  # the writer took its last batch: audit events can only be logged
        self._received: dict[str, object] = {}
        self._write_slots = asyncio.Semaphore(s.max_concurrent_writes)
        self._writes: set[asyncio.Task[None]] = set()
        self._write_failed: BaseException | None = None
        self.metrics.in_flight.set_function(lambda: self._batcher.in_flight)
        self.metrics.backlog_rows.set_function(lambda: self._batcher.pending_rows)

    # ----------------------------------------------------------------- intake
    @property
    def in_flight(self) -> int:
        """Payloads submitted and not yet acknowledged (or handed back)."""
        return self._batcher.in_flight

    @property
    def pending_rows(self) -> int:
        return self._batcher.pending_rows

    @property
    def pending_bytes(self) -> int:
        """Payload bytes taken and not yet acknowledged."""
        return self._batcher.pending_bytes

    @property
    def backed_up(self) -> bool:
        """More payload bytes are held than ``max_pending_bytes``: sources should pause intake."""
        return self._batcher.pending_bytes >= self.settings.max_pending_bytes

    @property
    def write_error(self) -> tuple[SinkError, float] | None:
        """The latest failed commit and for how long commits have failed (s); None while they succeed."""
        return self._policy.failing()

    @property
    def committed_batches(self) -> int:
        return self._acks.committed_batches

    def add_alert_publisher(self, publish: AlertPublisher) -> None:
        """Call ``publish(events)`` after each commit that opened or closed alerts."""
        self._acks.publishers.append(publish)

    def add_commit_listener(self, listen: CommitListener) -> None:
        """Call ``listen(batch, ingest_ids)`` after every commit, in commit order (``acks.CommitListener``)."""
        self._acks.listeners.append(listen)

    def validate(self, raw: RawMessage) -> Decoded:
        """Decode and validate one payload without taking it; raise ``RejectError`` naming the field
        (``IdentityError`` for an unregistered or revoked device, or a device_id that is not the topic's)."""
        return decode(raw.payload, content_type=raw.content_type, profiles=self.profiles,
                      default_profile=self._identity.resolve, topic_device_id=raw.topic_device_id,
                      max_bytes=self.settings.max_payload_bytes)

    def audit(self, event: AuditEvent) -> None:
        """Queue a security decision for ``audit_log``: written with the current batch (even one
        holding no payload), never acknowledged, counted in ``gateway_audit_events_total``.

        Taken while draining too; once the writer has finished, the event is logged instead.
        """
        if self._audit_closed:
            log_unwritten(event)
        else:
            self._batcher.audit(event)

    def submit(self, raw: RawMessage) -> None:
        """Take one payload. Never raises for bad data: a reject is stored and acked like the rest."""
        batch = self._take(raw)
        try:
            d = self.validate(raw)
        except RejectError as exc:
            self._reject(batch, raw, exc)
        except Exception as exc:  # noqa: BLE001 - a payload must never break the transport's read loop
            log.exception("Decoder failed unexpectedly; quarantining the payload.", extra={"origin": raw.topic_or_path})
            self._reject(batch, raw, RejectError(f"payload: could not be decoded ({type(exc).__name__})", raw.topic_device_id))
        else:
            self._add(batch, raw, d)
        self._batcher.filled(batch)

    def accept(self, raw: RawMessage, decoded: Decoded) -> None:
        """Take a payload that ``validate()`` accepted (sources that answer before taking it)."""
        batch = self._take(raw)
        self._add(batch, raw, decoded)
        self._batcher.filled(batch)

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        """Take a payload the source refused (identity, authorization): stored in ``rejected``, acked
        after commit; an ``IdentityError`` is also written to ``audit_log`` under its ``action``."""
        batch = self._take(raw)
        self._reject(batch, raw, exc)
        self._batcher.filled(batch)

    def _take(self, raw: RawMessage) -> Batch:
        if self._stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        counter = self._received.get(raw.source) or self._received.setdefault(raw.source, self.metrics.received.labels(raw.source))
        counter.inc()  # type: ignore[attr-defined]
        return self._batcher.take(raw)

    def _add(self, batch: Batch, raw: RawMessage, d: Decoded) -> None:
        if not self._batcher.add(batch, raw, d, key_of(d)):  # the same envelope waits to be written: acked with it
            self.metrics.envelopes.labels(raw.source, "duplicate").inc()

    def _reject(self, batch: Batch, raw: RawMessage, exc: RejectError) -> None:
        self._batcher.reject(batch, Rejected(raw, exc.reason, exc.device_id))
        field_name = exc.reason.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
        self.metrics.rejected.labels(raw.source, field_name[:32]).inc()
        log.warning("Payload rejected.", extra={"source": raw.source, "origin": raw.topic_or_path,
                                                "device_id": exc.device_id, "reason": exc.reason})
        if isinstance(exc, IdentityError):
            batch.audit.append(denied_event(raw, exc))

    # ----------------------------------------------------------------- writer
    def stop(self) -> None:
        """Stop taking payloads; ``run()`` returns once everything taken is written."""
        self._stopping = True
        self._batcher.close()

    async def run(self) -> None:
        """Write batches until ``stop()`` was called and nothing is pending."""
        self.ticker.start()
        try:
            while True:
                if self._write_failed is not None:
                    raise self._write_failed
                batch = await self._batcher.next(until=self.ticker.next_tick)
                events = self.ticker.due(backed_up=self.backed_up, held_bytes=self.pending_bytes)
                if batch is None and not events:
                    if self._stopping and self._batcher.idle:
                        self._audit_closed = True
                        break
                    continue
                await self._process(batch if batch is not None else Batch(), events)
            while self._writes:
                await asyncio.wait(set(self._writes))
            if self._write_failed is not None:
                raise self._write_failed
        finally:
            for t in list(self._writes):
                t.cancel()

    async def _process(self, batch: Batch, tick_events: list[AlertEvent]) -> None:
        known: dict[Key, int] = {}
        if batch.items:
            known = await self._policy.lookup("duplicate lookup", lambda: self.store.known(batch.keys))
            await self._restorer.restore(batch.items, batch.keys, known)
        ev = self._evaluator.evaluate(batch.items, [r.received_at_ms for r in batch.raws], known, batch.keys)
        raws = batch.raws if ev.keep is None else [batch.raws[i] for i in ev.keep]
        if ev.items:
            self.ticker.note_lag(ev.num.t, ev.wav.t0)
        events = tick_events + ev.events
        wb = WriteBatch(items=ev.items, raws=raws, num=ev.num, num_flags=ev.num_flags, wav=ev.wav,
                        wav_flags=ev.wav_flags, rejected=batch.rejected, alerts=events, audit=batch.audit)
        await self._write_slots.acquire()  # see PipelineSettings.max_concurrent_writes
        seq = self._acks.reserve()
        before = set(self._writes) if events else set()
        task = asyncio.create_task(self._write_then_ack(seq, batch, wb, known, before), name=f"write-{seq}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_then_ack(self, seq: int, batch: Batch, wb: WriteBatch, known: dict[Key, int],
                              before: set[asyncio.Task[None]]) -> None:
        try:
            if before:
                await asyncio.wait(before)
            ids = await self._policy.write(wb)
        except BaseException as exc:
            self._write_failed = exc
            self._batcher.wake()
            raise
        finally:
            self._write_slots.release()
        self._acks.committed(seq, batch, wb, known, ids)
