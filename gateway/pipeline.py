"""decode -> batch -> checks -> rules -> sink, acknowledging each payload only after commit.

Sources call ``submit()`` (synchronous, cheap: decode and append). The writer task
``run()`` seals batches by row count, bytes or age, drops envelopes already stored,
runs the vectorized checks and alert rules over the whole batch, writes it in one
transaction (retrying with backoff while the database is unavailable) and then
acknowledges every payload of the batch in arrival order: stored, duplicate and
rejected alike. Nothing is acknowledged before its outcome is committed.

Identity: with ``require_registration``, an envelope of a device missing from the
registry, or revoked in it, is rejected (``IdentityError``), and so is one whose
``device_id`` differs from its topic's. Such rejects, and the decisions sources report
through ``audit()``, are written to ``audit_log`` in the transaction of their batch.
The registry is an in-memory cache: one dict lookup per envelope.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.checks import CheckSettings, CheckState, run_checks
from gateway.decode import DEFAULT_MAX_BYTES, Decoded, decode, to_columns
from gateway.errors import IdentityError, RejectError, SinkError
from gateway.metrics import Metrics
from gateway.model import FLAG_NAMES, AlertEvent, AuditEvent, Outcome, RawMessage
from gateway.profiles import Profile
from gateway.registry import Registry
from gateway.retry import Backoff
from gateway.rules import AlertEngine
from gateway.sinks import History, Rejected, Sink, WriteBatch
from gateway.sinks.subset import subset

__all__ = ["PipelineSettings", "Pipeline"]

log = logging.getLogger(__name__)
_LOG_ALERTS_MAX = 20  # alert events logged one by one per batch; beyond, one summary line


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    max_rows: int = 20_000
    max_bytes: int = 8 * 1024 * 1024
    max_age_s: float = 0.2
    max_payload_bytes: int = DEFAULT_MAX_BYTES
    default_profile: str | None = None
    require_registration: bool = False  # refuse devices missing from (or revoked in) the registry
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    tick_s: float = 1.0
    # ``silent`` ticks wait while the gateway itself is behind: its payload budget was full,
    # or the newest reading it took lagged the wall clock by more than ``behind_lag_s``,
    # within the last ``behind_hold_s``.
    behind_lag_s: float = 10.0
    behind_hold_s: float = 5.0
    max_concurrent_writes: int = 2
    max_pending_bytes: int = 64 * 1024 * 1024  # payload bytes held unacknowledged before ``backed_up``
    checks: CheckSettings = field(default_factory=CheckSettings)


class _Batch:
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
        self.keys: list[tuple[str, bytes]] = []
        self.held = 0  # payload bytes of every message in ``order``
        # payloads equal to one already pending: (raw, key, batch holding the original)
        self.dups: list[tuple[RawMessage, tuple[str, bytes], _Batch]] = []
        self.outcomes = False  # some payload wants its Outcome (RawMessage.on_outcome)
        self.keep_ids = False  # a later duplicate needs this batch's ingest ids
        self.ids_by_key: dict[tuple[str, bytes], int | None] = {}
        self.audit: list[AuditEvent] = []

    @property
    def empty(self) -> bool:
        """Nothing to write: no payload and no audit event."""
        return not self.order and not self.audit

    def __len__(self) -> int:
        return len(self.order)


AlertPublisher = Callable[[Sequence[AlertEvent]], None]
CommitListener = Callable[[WriteBatch, Sequence[int | None]], None]


class Pipeline:
    """The ingestion pipeline of one gateway process."""

    def __init__(
        self,
        *,
        profiles: Mapping[str, Profile],
        sink: Sink,
        settings: PipelineSettings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        registry: Registry | None = None,
    ) -> None:
        if settings.require_registration and registry is None:
            raise ValueError("require_registration needs a registry")
        self.profiles = profiles
        self.registry = registry
        self.sink = sink
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._state = CheckState()
        self._engine = AlertEngine(profiles)
        self._current = _Batch()
        self._sealed: deque[_Batch] = deque()
        self._pending_keys: dict[tuple[str, bytes], _Batch] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._audit_closed = False  # the writer took its last batch: audit events can only be logged
        self._in_flight = 0
        self._pending_rows = 0
        self._pending_bytes = 0
        self._last_seq: dict[str, int] = {}
        self._restored: set[str] = set()  # devices whose stored state was looked up since start
        self._next_tick = 0.0
        self._behind_until = 0.0  # monotonic time until which silent ticks wait (see _tick_events)
        self._deferring = False
        self._alert_publishers: list[AlertPublisher] = []
        self._commit_listeners: list[CommitListener] = []
        self._received: dict[str, object] = {}
        self._resolve: str | None | Callable[[str], str | None] = (
            self._registered_profile if settings.require_registration
            else self._profile_or_default if registry is not None
            else settings.default_profile
        )
        self.committed_batches = 0
        self._write_slots = asyncio.Semaphore(settings.max_concurrent_writes)
        self._writes: set[asyncio.Task[None]] = set()
        self._next_seq = 0
        self._acked_seq = 0
        self._committed: dict[int, tuple[_Batch, WriteBatch, dict[tuple[str, bytes], int], list[int | None]]] = {}
        self._write_failed: BaseException | None = None
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self.metrics.backlog_rows.set_function(lambda: self._pending_rows)

    # ----------------------------------------------------------------- intake
    @property
    def in_flight(self) -> int:
        """Payloads submitted and not yet acknowledged (or handed back)."""
        return self._in_flight

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def add_alert_publisher(self, publish: AlertPublisher) -> None:
        """Call ``publish(events)`` after each commit that opened or closed alerts."""
        self._alert_publishers.append(publish)

    def add_commit_listener(self, listen: CommitListener) -> None:
        """Call ``listen(batch, ingest_ids)`` after every commit, in commit order, from the writer.

        ``batch`` holds the new envelopes' numeric and waveform columns with their flags, and
        the alert events; rows of an envelope whose id is ``None`` were stored before and are
        not in the database twice. The call must be quick (O(batch)) and never block.
        """
        self._commit_listeners.append(listen)

    @property
    def pending_bytes(self) -> int:
        """Payload bytes taken and not yet acknowledged."""
        return self._pending_bytes

    @property
    def backed_up(self) -> bool:
        """More payload bytes are held than ``max_pending_bytes``: sources should pause intake."""
        return self._pending_bytes >= self.settings.max_pending_bytes

    def validate(self, raw: RawMessage) -> Decoded:
        """Decode and validate one payload without taking it; raise ``RejectError`` naming the field
        (``IdentityError`` for an unregistered or revoked device, or a device_id that is not the topic's)."""
        return decode(
            raw.payload,
            content_type=raw.content_type,
            profiles=self.profiles,
            default_profile=self._resolve,
            topic_device_id=raw.topic_device_id,
            max_bytes=self.settings.max_payload_bytes,
        )

    def _registered_profile(self, device_id: str) -> str | None:
        dev = self.registry.device(device_id)  # type: ignore[union-attr]
        if dev is None:
            raise IdentityError(f"device_id: {device_id!r} is not registered", device_id, action="device.unregistered")
        if dev.status != "active":
            raise IdentityError(f"device_id: {device_id!r} is revoked", device_id, action="device.revoked")
        return dev.profile

    def _profile_or_default(self, device_id: str) -> str | None:
        if self.registry is not None:
            registered = self.registry.profile_of(device_id)
            if registered is not None:
                return registered
        return self.settings.default_profile

    def audit(self, event: AuditEvent) -> None:
        """Queue a security decision for ``audit_log``: written with the current batch (even one
        holding no payload), never acknowledged, counted in ``gateway_audit_events_total``.

        Taken while draining too; once the writer has finished, the event is logged instead.
        """
        if self._audit_closed:
            log.warning("Audit event after the writer finished; logged here only.",
                        extra={"action": event.action, "actor": event.actor, "target": event.target,
                               "outcome": event.outcome, "source_addr": event.source_addr, "at": event.at_ms,
                               "correlation_id": event.correlation_id})
            return
        batch = self._current
        if batch.empty:
            batch.created = time.monotonic()
            self._wakeup.set()
        batch.audit.append(event)

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
        self._after_take(batch)

    def accept(self, raw: RawMessage, decoded: Decoded) -> None:
        """Take a payload that ``validate()`` accepted (sources that answer before taking it)."""
        batch = self._take(raw)
        self._add(batch, raw, decoded)
        self._after_take(batch)

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        """Take a payload refused by the source itself (identity, authorization): stored in
        ``rejected`` and acknowledged after commit like any other reject. An ``IdentityError``
        is also written to ``audit_log`` under its ``action``."""
        batch = self._take(raw)
        self._reject(batch, raw, exc)
        self._after_take(batch)

    def _take(self, raw: RawMessage) -> _Batch:
        if self._stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        batch = self._current
        if batch.empty:
            batch.created = time.monotonic()
        self._in_flight += 1
        counter = self._received.get(raw.source)
        if counter is None:
            counter = self._received[raw.source] = self.metrics.received.labels(raw.source)
        counter.inc()
        batch.order.append(raw)
        size = len(raw.payload)
        batch.held += size
        self._pending_bytes += size
        if raw.on_outcome is not None:
            batch.outcomes = True
        return batch

    def _add(self, batch: _Batch, raw: RawMessage, d: Decoded) -> None:
        key = (d.envelope.device_id, d.sha256)
        holder = self._pending_keys.get(key)
        if holder is None:
            self._pending_keys[key] = batch
            batch.items.append(d)
            batch.raws.append(raw)
            batch.keys.append(key)
            rows = len(d.num_t) + len(d.wav_t0)
            batch.rows += rows
            self._pending_rows += rows
            batch.nbytes += d.payload_bytes
        else:
            # the same envelope is already waiting to be written: ack it with that write
            self.metrics.envelopes.labels(raw.source, "duplicate").inc()
            holder.keep_ids = True
            batch.dups.append((raw, key, holder))

    def _after_take(self, batch: _Batch) -> None:
        if batch.rows >= self.settings.max_rows or batch.nbytes >= self.settings.max_bytes:
            self._seal()
        elif len(batch.order) == 1:
            self._wakeup.set()

    def _reject(self, batch: _Batch, raw: RawMessage, exc: RejectError) -> None:
        batch.rejected.append(Rejected(raw, exc.reason, exc.device_id))
        batch.nbytes += len(raw.payload)
        self._log_reject(raw, exc)
        if isinstance(exc, IdentityError):
            batch.audit.append(AuditEvent(
                at_ms=raw.received_at_ms,
                actor=f"{raw.source}:{raw.principal or 'anonymous'}",
                action=exc.action,
                target=exc.target,
                outcome="denied",
                source_addr=raw.remote_addr,
                correlation_id=hashlib.sha256(raw.payload).hexdigest(),  # = rejected.payload_sha256
                detail={"reason": exc.reason, "source": raw.source, "topic_or_path": raw.topic_or_path},
            ))

    def _log_reject(self, raw: RawMessage, exc: RejectError) -> None:
        reason = exc.reason
        field_name = reason.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
        self.metrics.rejected.labels(raw.source, field_name[:32]).inc()
        log.warning(
            "Payload rejected.",
            extra={"source": raw.source, "origin": raw.topic_or_path, "device_id": exc.device_id, "reason": reason},
        )

    def _seal(self) -> None:
        if not self._current.empty:
            self._sealed.append(self._current)
            self._current = _Batch()
        self._wakeup.set()

    # ----------------------------------------------------------------- writer
    def stop(self) -> None:
        """Stop taking payloads; ``run()`` returns once everything taken is written."""
        self._stopping = True
        self._seal()

    async def run(self) -> None:
        """Write batches until ``stop()`` was called and nothing is pending."""
        self._next_tick = time.monotonic() + self.settings.tick_s
        try:
            while True:
                if self._write_failed is not None:
                    raise self._write_failed
                batch = await self._next_batch()
                events = self._tick_events()
                if batch is None and not events:
                    if self._stopping and not self._sealed and self._current.empty:
                        self._audit_closed = True
                        break
                    continue
                await self._process(batch if batch is not None else _Batch(), events)
            while self._writes:
                await asyncio.wait(set(self._writes))
            if self._write_failed is not None:
                raise self._write_failed
        finally:
            for t in list(self._writes):
                t.cancel()

    def _tick_events(self) -> list[AlertEvent]:
        now = time.monotonic()
        if now < self._next_tick:
            return []
        self._next_tick = now + self.settings.tick_s
        if self.backed_up:
            self._behind_until = now + self.settings.behind_hold_s
        if now < self._behind_until:
            # While a backlog drains, the devices' messages wait at the broker: they are not
            # silent, the gateway is behind. Ticking now would open and close a ``silent``
            # episode per device and second. Once caught up the tick runs, and a device that
            # really went quiet opens with the same ``at`` (its latest reading + after_s).
            if not self._deferring:
                self._deferring = True
                log.warning("Intake is behind; silent-device checks wait until it has caught up.",
                            extra={"held_mib": self._pending_bytes >> 20})
            return []
        if self._deferring:
            self._deferring = False
            log.info("Intake caught up; silent-device checks resume.")
        return self._engine.tick(int(self._clock() * 1000))

    def _note_lag(self, num_t: np.ndarray, wav_t0: np.ndarray) -> None:
        """Remember that the gateway is behind when even the newest reading of a batch is old."""
        newest = max(int(num_t.max()) if len(num_t) else 0, int(wav_t0.max()) if len(wav_t0) else 0)
        if newest and self._clock() * 1000 - newest > self.settings.behind_lag_s * 1000:
            self._behind_until = time.monotonic() + self.settings.behind_hold_s

    async def _next_batch(self) -> _Batch | None:
        while True:
            if self._sealed:
                return self._sealed.popleft()
            cur = self._current
            if self._stopping:
                if not cur.empty:
                    self._seal()
                    continue
                return None
            now = time.monotonic()
            deadline = self._next_tick
            if not cur.empty:
                age_deadline = cur.created + self.settings.max_age_s
                if now >= age_deadline:
                    self._seal()
                    continue
                deadline = min(deadline, age_deadline)
            if now >= self._next_tick:
                return None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - now))
            except asyncio.TimeoutError:
                pass

    async def _retry(self, what: str, call: Callable[[], object]) -> object:
        backoff = Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)
        while True:
            try:
                return await call()  # type: ignore[misc]
            except SinkError as exc:
                self.metrics.write_errors.labels(str(exc.retriable).lower()).inc()
                if not exc.retriable:
                    raise
                delay = backoff.next_delay()
                if backoff.attempt == 1 or backoff.attempt % 10 == 0:
                    log.warning(
                        "Database unavailable; holding the batch and retrying.",
                        extra={"operation": what, "attempt": backoff.attempt, "retry_in_s": round(delay, 2), "error": str(exc)},
                    )
                await asyncio.sleep(delay)

    async def _process(self, batch: _Batch, tick_events: list[AlertEvent]) -> None:
        items, raws = batch.items, batch.raws
        known: dict[tuple[str, bytes], int] = {}
        if items:
            known = await self._retry("duplicate lookup", lambda: self.sink.known(batch.keys))  # type: ignore[assignment]
        if known:
            keep = [i for i, k in enumerate(batch.keys) if k not in known]
            items = [items[i] for i in keep]
            raws = [raws[i] for i in keep]
        self._count_seq_gaps(items)
        await self._restore_state(items)
        num, wav = to_columns(items, [r.received_at_ms for r in raws])
        if items:
            self._note_lag(num.t, wav.t0)
        nflags, wflags = run_checks(num, wav, self.profiles, self._state, self.settings.checks)
        events = self._engine.evaluate(num, nflags, wav) if len(num) or len(wav) else []
        events = tick_events + events
        wb = WriteBatch(items=items, raws=raws, num=num, num_flags=nflags, wav=wav, wav_flags=wflags,
                        rejected=batch.rejected, alerts=events, audit=batch.audit)
        # Up to `max_concurrent_writes` transactions run at once, so the database works on
        # one batch while the next is decoded and checked. Acks still go out in arrival
        # order (see _finish). A batch with alert events waits for the writes before it:
        # closing an episode must find the row that opened it.
        await self._write_slots.acquire()
        seq = self._next_seq
        self._next_seq += 1
        before = set(self._writes) if events else set()
        task = asyncio.create_task(self._write_then_finish(seq, batch, wb, known, before), name=f"write-{seq}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_then_finish(
        self, seq: int, batch: _Batch, wb: WriteBatch, known: dict[tuple[str, bytes], int], before: set[asyncio.Task[None]]
    ) -> None:
        try:
            if before:
                await asyncio.wait(before)
            try:
                ids = await self._retry("write", lambda: self.sink.write(wb))
            except SinkError as exc:
                if exc.data_error and len(wb.items) + len(wb.rejected) + len(wb.audit) > 0:
                    ids = await self._write_split(wb, exc)
                else:
                    ids = await self._hold(wb, exc)
        except BaseException as exc:
            self._write_failed = exc
            self._wakeup.set()
            raise
        finally:
            self._write_slots.release()
        self._finish(seq, batch, wb, known, ids)  # type: ignore[arg-type]

    def _finish(
        self, seq: int, batch: _Batch, wb: WriteBatch, known: dict[tuple[str, bytes], int], ids: list[int | None]
    ) -> None:
        """Record a committed batch; ack every committed batch whose predecessors are acked."""
        self._committed[seq] = (batch, wb, known, ids)
        while self._acked_seq in self._committed:
            self._after_commit(*self._committed.pop(self._acked_seq))
            self._acked_seq += 1

    async def _hold(self, wb: WriteBatch, exc: SinkError) -> list[int | None]:
        """A permanent error that is not about the data (permissions, read-only standby, schema):
        nothing in the batch is at fault, so keep it and retry until an operator fixes the cause."""
        backoff = Backoff(self.settings.retry_max_s, self.settings.retry_max_s * 3)
        while True:
            log.error(
                "Database refuses the write; holding the batch until the cause is fixed.",
                extra={"error": str(exc), "sqlstate": exc.sqlstate, "envelopes": len(wb.items)},
            )
            await asyncio.sleep(backoff.next_delay())
            try:
                return await self._retry("write", lambda: self.sink.write(wb))  # type: ignore[return-value]
            except SinkError as again:
                if again.data_error:
                    return await self._write_split(wb, again)
                exc = again

    async def _write_split(self, wb: WriteBatch, exc: SinkError) -> list[int | None]:
        """A permanent error: isolate the envelope(s) the database refuses, quarantine them, store the rest."""
        log.error("Batch refused by the database; isolating the envelopes at fault.", extra={"error": str(exc)})
        refused: list[Rejected] = []
        ids: list[int | None] = [None] * len(wb.items)

        async def attempt(idx: list[int]) -> None:
            part = subset(wb, idx)
            try:
                got = await self._retry("write", lambda: self.sink.write(part))
            except SinkError as err:
                if len(idx) == 1:
                    raw = wb.raws[idx[0]]
                    refused.append(Rejected(raw, f"storage: {err}", wb.items[idx[0]].envelope.device_id))
                    return
                half = len(idx) // 2
                await attempt(idx[:half])
                await attempt(idx[half:])
                return
            for i, v in zip(idx, got):  # type: ignore[arg-type]
                ids[i] = v

        await attempt(list(range(len(wb.items))))
        rest = WriteBatch(rejected=wb.rejected + refused, alerts=wb.alerts, alert_ingest_ids=ids, audit=wb.audit)
        try:
            await self._retry("write", lambda: self.sink.write(rest))
        except SinkError as err:
            # the rejects or alerts themselves are refused: keep the quarantine rows, which matter most
            log.error("Alerts of the batch refused by the database; dropping them.", extra={"error": str(err),
                      "alerts": len(rest.alerts)})
            rest.alerts = []
            try:
                await self._retry("write", lambda: self.sink.write(rest))
            except SinkError as again:
                if not rest.audit:
                    raise
                for ev in rest.audit:  # the log keeps the evidence the table refused
                    log.error("Audit event refused by the database; logged here instead.",
                              extra={"error": str(again), "action": ev.action, "actor": ev.actor, "target": ev.target,
                                     "at": ev.at_ms, "correlation_id": ev.correlation_id})
                rest.audit = []
                await self._retry("write", lambda: self.sink.write(rest))
        wb.rejected = rest.rejected
        return ids

    async def _restore_state(self, items: list[Decoded]) -> None:
        """The first time a device is seen since start, restore its check and alert state
        from storage, so that a restart does not forget what was stored before it."""
        profiles_of: dict[str, dict[str, Profile]] = {}  # device -> its profiles in the batch, first first
        for d in items:
            dev = d.envelope.device_id
            if dev not in self._restored:
                profiles_of.setdefault(dev, {}).setdefault(d.profile.name, d.profile)
        if not profiles_of:
            return
        devices = sorted(profiles_of)
        profile_of = {dev: next(iter(profiles_of[dev])) for dev in devices}
        pairs: dict[tuple[str, str], str] = {}  # (device, metric) of the device's profiles -> kind
        for dev in devices:
            for prof in profiles_of[dev].values():
                for metric, spec in prof.metrics.items():
                    pairs.setdefault((dev, metric), spec.kind)
        numeric = [k for k, kind in pairs.items() if kind == "numeric"]
        waveform = [k for k, kind in pairs.items() if kind == "waveform"]
        try:
            hist: History = await self._retry(  # type: ignore[assignment]
                "history", lambda: self.sink.history(devices, numeric, waveform))
        except SinkError as exc:
            log.error("Stored state lookup refused; these devices start without history.",
                      extra={"error": str(exc), "devices": len(devices)})
            hist = History()
        self._restored.update(devices)
        self._state.seed(hist.numeric, hist.numeric_ref, hist.waveform)
        opened = [
            AlertEvent("open", e.device_id, e.rule, e.priority, e.metric, e.opened_at, e.trigger_value, None,
                       profile_of.get(e.device_id))
            for e in hist.open_alerts
        ]
        for e in self._engine.restore(opened, hist.latest):
            # the rule is not in the profile the device reports now (renamed, profile changed)
            log.warning("Active alert episode not restored: unknown rule for the device's profile.",
                        extra={"device_id": e.device_id, "rule": e.rule, "profile": e.profile, "at": e.at})
        if opened:
            log.info("Active alert episodes restored from storage.", extra={"episodes": len(opened)})

    def _count_seq_gaps(self, items: list[Decoded]) -> None:
        last = self._last_seq
        gaps = 0
        for d in items:
            seq = d.envelope.seq
            if seq is None:
                continue
            prev = last.get(d.envelope.device_id)
            if prev is not None and seq > prev + 1:
                gaps += seq - prev - 1
            if prev is None or seq > prev:
                last[d.envelope.device_id] = seq
        if gaps:
            self.metrics.seq_gaps.inc(gaps)

    def _after_commit(
        self, batch: _Batch, wb: WriteBatch, known: dict[tuple[str, bytes], int], ids: list[int | None]
    ) -> None:
        for raw in batch.order:
            if raw.ack is not None:
                raw.ack()
        if batch.keep_ids:
            batch.ids_by_key = {key: known.get(key) for key in batch.keys}
            batch.ids_by_key.update((self._key(d), i) for d, i in zip(wb.items, ids) if i is not None)
        if batch.outcomes:
            self._report_outcomes(batch, wb, known, ids)
        m = self.metrics
        n_known = len(known)
        for k in batch.keys:
            self._pending_keys.pop(k, None)
        self._in_flight -= len(batch.order)
        self._pending_rows -= batch.rows
        self._pending_bytes -= batch.held
        self.committed_batches += 1
        m.batches.inc()
        m.batch_rows.observe(len(wb.num) + len(wb.wav))
        m.readings.inc(len(wb.num))
        m.samples.inc(int(wb.wav.offsets[-1]))
        src = batch.order[0].source if batch.order else "mqtt"
        stored = len(wb.items)
        if stored:
            m.envelopes.labels(src, "stored").inc(stored)
        if n_known:
            m.envelopes.labels(src, "duplicate").inc(n_known)
        if wb.rejected:
            m.envelopes.labels(src, "rejected").inc(len(wb.rejected))
        if wb.audit:
            for action, n in Counter(e.action for e in wb.audit).items():
                m.audit.labels(action).inc(n)
        if len(wb.num_flags) or len(wb.wav_flags):
            self._count_flags(np.concatenate([wb.num_flags, wb.wav_flags]))
        now_ms = self._clock() * 1000
        if wb.raws:
            lat = (now_ms - np.fromiter((r.received_at_ms for r in wb.raws), dtype=np.float64, count=len(wb.raws))) / 1000
            for v in np.percentile(lat, (50, 99)):  # two observations per batch keep the histogram cheap
                m.commit_latency.observe(max(0.0, float(v)))
        if wb.alerts:
            for ev in wb.alerts:
                m.alerts.labels(ev.event, ev.priority).inc()
            if len(wb.alerts) <= _LOG_ALERTS_MAX:
                for ev in wb.alerts:
                    log.info(
                        "Alert %s.", "opened" if ev.event == "open" else "closed",
                        extra={"device_id": ev.device_id, "rule": ev.rule, "priority": ev.priority, "at": ev.at, "value": ev.value},
                    )
            else:  # a storm (for example a backlog replayed after an outage): one line, the table has them all
                opened = sum(ev.event == "open" for ev in wb.alerts)
                log.warning(
                    "Many alert events in one batch; see the alerts table.",
                    extra={"opened": opened, "closed": len(wb.alerts) - opened,
                           "devices": len({ev.device_id for ev in wb.alerts})},
                )
            for publish in self._alert_publishers:
                try:
                    publish(wb.alerts)
                except Exception as exc:  # noqa: BLE001 - publishing is best effort after commit
                    log.warning("Alert publication failed.", extra={"error": repr(exc)})
        for listen in self._commit_listeners:
            try:
                listen(wb, ids)
            except Exception as exc:  # noqa: BLE001 - a reader of committed data must not break the writer
                log.warning("Commit listener failed.", extra={"error": repr(exc)})

    @staticmethod
    def _key(d: Decoded) -> tuple[str, bytes]:
        return (d.envelope.device_id, d.sha256)

    def _report_outcomes(
        self, batch: _Batch, wb: WriteBatch, known: dict[tuple[str, bytes], int], ids: list[int | None]
    ) -> None:
        """Tell each payload that asked (``on_outcome``) what became of it."""
        outcome: dict[int, Outcome] = {}
        for raw, d in zip(batch.raws, batch.items):
            key = self._key(d)
            if key in known:
                outcome[id(raw)] = Outcome("duplicate", known[key])
        for raw, i in zip(wb.raws, ids):
            # None: stored meanwhile by another writer (another gateway process)
            outcome[id(raw)] = Outcome("stored", i) if i is not None else Outcome("duplicate")
        for raw, key, holder in batch.dups:
            outcome[id(raw)] = Outcome("duplicate", holder.ids_by_key.get(key))
        for r in wb.rejected:
            outcome[id(r.raw)] = Outcome("rejected", reason=r.reason)
        for raw in batch.order:
            if raw.on_outcome is not None:
                try:
                    raw.on_outcome(outcome.get(id(raw), Outcome("duplicate")))
                except Exception as exc:  # noqa: BLE001 - a transport's callback must not break the writer
                    log.warning("Outcome callback failed.", extra={"origin": raw.topic_or_path, "error": repr(exc)})

    def _count_flags(self, flags: np.ndarray) -> None:
        nz = flags[flags != 0]
        if not len(nz):
            return
        for bit, name in enumerate(FLAG_NAMES):
            n = int(np.count_nonzero(nz & (1 << bit)))
            if n:
                self.metrics.flagged.labels(name).inc(n)
