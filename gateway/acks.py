"""Ordered acknowledgement: after commit, in arrival order, with what became of each payload.

Up to two transactions run at once, so batches may commit out of order; a committed batch
waits here until every batch taken before it is acknowledged (MQTT 3.1.1 section 4.6 wants
PUBACKs in the order the PUBLISH packets arrived). Acknowledging a batch acks every payload of
it (stored, duplicate and rejected alike), tells the payloads that asked their ``Outcome``,
releases what the batcher held for it, counts it in the metrics and publishes its alert
events.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from gateway.batching import Batch
from gateway.clock import Clock
from gateway.evaluate import Key, flag_counts, key_of
from gateway.metrics import Metrics
from gateway.model import FLAG_NAMES, AlertEvent, Outcome
from gateway.sinks import WriteBatch

__all__ = ["AlertPublisher", "CommitListener", "Acknowledger"]

log = logging.getLogger(__name__)
_LOG_ALERTS_MAX = 20  # alert events logged one by one per batch; beyond, one summary line

AlertPublisher = Callable[[Sequence[AlertEvent]], None]
# Called with the committed batch (new envelopes' numeric and waveform columns with their flags,
# the alert events) and the ingest id per envelope (None: stored before, not in the database
# twice), after every commit, in commit order, from the writer: it must be O(batch), never block.
CommitListener = Callable[[WriteBatch, Sequence[int | None]], None]
_Committed = tuple[Batch, WriteBatch, dict[Key, int], list[int | None]]


class Acknowledger:
    """Numbers batches as they are written and acknowledges them in that order once committed."""

    def __init__(self, metrics: Metrics, clock: Clock, release: Callable[[Batch], None]) -> None:
        self.metrics = metrics
        self.clock = clock
        self._release = release
        self.publishers: list[AlertPublisher] = []
        self.listeners: list[CommitListener] = []
        self.committed_batches = 0
        self._next_seq = 0
        self._acked_seq = 0
        self._committed: dict[int, _Committed] = {}
        self._last_seq: dict[str, int] = {}  # per device, the highest envelope seq stored

    def reserve(self) -> int:
        """The number of the next batch written: its place in the acknowledgement order."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def committed(self, seq: int, batch: Batch, wb: WriteBatch, known: dict[Key, int], ids: list[int | None]) -> None:
        """Record a committed batch; acknowledge every committed batch whose predecessors are."""
        self._committed[seq] = (batch, wb, known, ids)
        while self._acked_seq in self._committed:
            self._acknowledge(*self._committed.pop(self._acked_seq))
            self._acked_seq += 1

    def _acknowledge(self, batch: Batch, wb: WriteBatch, known: dict[Key, int], ids: list[int | None]) -> None:
        for raw in batch.order:
            if raw.ack is not None:
                raw.ack()
        if batch.keep_ids:
            batch.ids_by_key = {key: known.get(key) for key in batch.keys}
            batch.ids_by_key.update((key_of(d), i) for d, i in zip(wb.items, ids) if i is not None)
        if batch.outcomes:
            _report_outcomes(batch, wb, known, ids)
        self._release(batch)
        self.committed_batches += 1
        self._count(batch, wb, len(known))
        if wb.alerts:
            self._alerts(wb.alerts)
        for listen in self.listeners:
            try:
                listen(wb, ids)
            except Exception as exc:  # noqa: BLE001 - a reader of committed data must not break the writer
                log.warning("Commit listener failed.", extra={"error": repr(exc)})

    def _count(self, batch: Batch, wb: WriteBatch, n_known: int) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_rows.observe(len(wb.num) + len(wb.wav))
        m.readings.inc(len(wb.num))
        m.samples.inc(int(wb.wav.offsets[-1]))
        src = batch.order[0].source if batch.order else "mqtt"
        if wb.items:
            m.envelopes.labels(src, "stored").inc(len(wb.items))
            self._count_seq_gaps(wb)
        if n_known:
            m.envelopes.labels(src, "duplicate").inc(n_known)
        if wb.rejected:
            m.envelopes.labels(src, "rejected").inc(len(wb.rejected))
        if wb.audit:
            for action, n in Counter(e.action for e in wb.audit).items():
                m.audit.labels(action).inc(n)
        if len(wb.num_flags) or len(wb.wav_flags):
            for name, n in zip(FLAG_NAMES, flag_counts(wb.num_flags, wb.wav_flags)):
                if n:
                    m.flagged.labels(name).inc(n)
        if wb.raws:
            now_ms = self.clock.wall() * 1000
            lat = (now_ms - np.fromiter((r.received_at_ms for r in wb.raws), dtype=np.float64, count=len(wb.raws))) / 1000
            for v in np.percentile(lat, (50, 99)):  # two observations per batch keep the histogram cheap
                m.commit_latency.observe(max(0.0, float(v)))

    def _count_seq_gaps(self, wb: WriteBatch) -> None:
        last = self._last_seq
        gaps = 0
        for d in wb.items:
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

    def _alerts(self, alerts: list[AlertEvent]) -> None:
        for ev in alerts:
            self.metrics.alerts.labels(ev.event, ev.priority).inc()
        if len(alerts) <= _LOG_ALERTS_MAX:
            for ev in alerts:
                log.info(
                    "Alert %s.", "opened" if ev.event == "open" else "closed",
                    extra={"device_id": ev.device_id, "rule": ev.rule, "priority": ev.priority, "at": ev.at, "value": ev.value},
                )
        else:  # a storm (for example a backlog replayed after an outage): one line, the table has them all
            opened = sum(ev.event == "open" for ev in alerts)
            log.warning(
                "Many alert events in one batch; see the alerts table.",
                extra={"opened": opened, "closed": len(alerts) - opened, "devices": len({ev.device_id for ev in alerts})},
            )
        for publish in self.publishers:
            try:
                publish(alerts)
            except Exception as exc:  # noqa: BLE001 - publishing is best effort after commit
                log.warning("Alert publication failed.", extra={"error": repr(exc)})


def _report_outcomes(batch: Batch, wb: WriteBatch, known: dict[Key, int], ids: list[int | None]) -> None:
    """Tell each payload that asked (``on_outcome``) what became of it."""
    outcome: dict[int, Outcome] = {}
    for raw, d in zip(batch.raws, batch.items):
        key = key_of(d)
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
