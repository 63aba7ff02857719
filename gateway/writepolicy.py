"""What the writer does when a write fails: retry, hold, or bisect to the envelope at fault.

- A retriable error (connection, serialization, resources): retry with capped, jittered
  backoff, holding the batch (and its acks) until the database takes it.
- A permanent error not about the data (permissions, read-only standby, schema): nothing in
  the batch is at fault, so hold it and retry slowly until an operator fixes the cause.
- A data error: bisect the batch (``subset``) until the envelope(s) the database refuses are
  isolated; quarantine those with the reason, store the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

from gateway.errors import SinkError
from gateway.metrics import Metrics
from gateway.model import NumericColumns, WaveformColumns
from gateway.retry import Backoff
from gateway.sinks import Rejected, Sink, WriteBatch

__all__ = ["WritePolicy", "subset"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class WritePolicy:
    """Writes ``WriteBatch``es to a sink under the failure policy of the module doc."""

    def __init__(self, sink: Sink, metrics: Metrics, *, retry_initial_s: float, retry_max_s: float) -> None:
        self.sink = sink
        self.metrics = metrics
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        # the latest failed commit, until a commit succeeds (``/readyz`` names it: e.g. SQLSTATE
        # 53100, disk full), and when the current run of failures began (monotonic seconds)
        self.write_error: SinkError | None = None
        self.failing_since = 0.0

    async def retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` until it does not raise a retriable ``SinkError``."""
        backoff = Backoff(self.retry_initial_s, self.retry_max_s)
        while True:
            try:
                return await call()
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

    async def lookup(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``retry`` for a read the batch cannot go without (which envelopes are stored): a
        permanent refusal (pg_hba reject, a revoked login) holds the batch like a refused write
        instead of ending the writer, and is retried slowly until an operator fixes the cause."""
        backoff = Backoff(self.retry_max_s, self.retry_max_s * 3)
        while True:
            try:
                return await self.retry(what, call)
            except SinkError as exc:
                log.error("Database refuses a lookup; holding the batch until the cause is fixed.",
                          extra={"operation": what, "error": str(exc), "sqlstate": exc.sqlstate})
                await asyncio.sleep(backoff.next_delay())

    def failing(self) -> tuple[SinkError, float] | None:
        """The latest failed commit and how long commits have failed (s); None once one succeeds."""
        return None if self.write_error is None else (self.write_error, time.monotonic() - self.failing_since)

    async def _commit(self, wb: WriteBatch) -> list[int | None]:
        """One ``sink.write``, remembering whether the database currently takes commits."""
        try:
            ids = await self.sink.write(wb)
        except SinkError as exc:
            if self.write_error is None:
                self.failing_since = time.monotonic()
            self.write_error = exc
            raise
        self.write_error = None
        return ids

    async def write(self, wb: WriteBatch) -> list[int | None]:
        """Commit ``wb``; return the ingest id per envelope. Refused envelopes end in ``wb.rejected``."""
        try:
            return await self.retry("write", lambda: self._commit(wb))
        except SinkError as exc:
            if exc.data_error and len(wb.items) + len(wb.rejected) + len(wb.audit) > 0:
                return await self._split(wb, exc)
            return await self._hold(wb, exc)

    async def _hold(self, wb: WriteBatch, exc: SinkError) -> list[int | None]:
        backoff = Backoff(self.retry_max_s, self.retry_max_s * 3)
        while True:
            log.error(
                "Database refuses the write; holding the batch until the cause is fixed.",
                extra={"error": str(exc), "sqlstate": exc.sqlstate, "envelopes": len(wb.items)},
            )
            await asyncio.sleep(backoff.next_delay())
            try:
                return await self.retry("write", lambda: self._commit(wb))
            except SinkError as again:
                if again.data_error:
                    return await self._split(wb, again)
                exc = again

    async def _split(self, wb: WriteBatch, exc: SinkError) -> list[int | None]:
        """Isolate the envelope(s) the database refuses, quarantine them, store the rest."""
        log.error("Batch refused by the database; isolating the envelopes at fault.", extra={"error": str(exc)})
        refused: list[Rejected] = []
        ids: list[int | None] = [None] * len(wb.items)

        async def attempt(idx: list[int]) -> None:
            part = subset(wb, idx)
            try:
                got = await self.retry("write", lambda: self._commit(part))
            except SinkError as err:
                if len(idx) == 1:
                    raw = wb.raws[idx[0]]
                    refused.append(Rejected(raw, f"storage: {err}", wb.items[idx[0]].envelope.device_id))
                    return
                half = len(idx) // 2
                await attempt(idx[:half])
                await attempt(idx[half:])
                return
            for i, v in zip(idx, got):
                ids[i] = v

        await attempt(list(range(len(wb.items))))
        rest = WriteBatch(rejected=wb.rejected + refused, alerts=wb.alerts, alert_ingest_ids=ids, audit=wb.audit)
        try:
            await self.retry("write", lambda: self._commit(rest))
        except SinkError as err:
            # the rejects or alerts themselves are refused: keep the quarantine rows, which matter most
            log.error("Alerts of the batch refused by the database; dropping them.", extra={"error": str(err),
                      "alerts": len(rest.alerts)})
            rest.alerts = []
            try:
                await self.retry("write", lambda: self._commit(rest))
            except SinkError as again:
                if not rest.audit:
                    raise
                for ev in rest.audit:  # the log keeps the evidence the table refused
                    log.error("Audit event refused by the database; logged here instead.",
                              extra={"error": str(again), "action": ev.action, "actor": ev.actor, "target": ev.target,
                                     "at": ev.at_ms, "correlation_id": ev.correlation_id})
                rest.audit = []
                await self.retry("write", lambda: self._commit(rest))
        wb.rejected = rest.rejected
        return ids


def subset(wb: WriteBatch, envelopes: Sequence[int]) -> WriteBatch:
    """The envelopes ``envelopes`` of ``wb`` with their rows, renumbered; no rejects, no alerts."""
    idx = np.asarray(envelopes, dtype=np.int64)
    remap = np.full(len(wb.items), -1, dtype=np.int64)
    remap[idx] = np.arange(len(idx))
    n_sel = np.flatnonzero(remap[wb.num.env] >= 0) if len(wb.num) else np.empty(0, dtype=np.int64)
    num = wb.num
    new_num = NumericColumns(
        device=num.device[n_sel], metric=num.metric[n_sel], profile=num.profile[n_sel], t=num.t[n_sel],
        value=num.value[n_sel], received_at=num.received_at[n_sel], env=remap[num.env[n_sel]].astype(np.int32),
    )
    wav = wb.wav
    w_sel = np.flatnonzero(remap[wav.env] >= 0) if len(wav) else np.empty(0, dtype=np.int64)
    counts = np.diff(wav.offsets)[w_sel]
    offsets = np.zeros(len(w_sel) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pieces = [wav.samples[wav.offsets[i]:wav.offsets[i + 1]] for i in w_sel]
    new_wav = WaveformColumns(
        device=wav.device[w_sel], metric=wav.metric[w_sel], profile=wav.profile[w_sel], t0=wav.t0[w_sel],
        hz=wav.hz[w_sel], received_at=wav.received_at[w_sel], env=remap[wav.env[w_sel]].astype(np.int32),
        offsets=offsets, samples=np.concatenate(pieces) if pieces else np.empty(0, dtype=np.float64),
    )
    return WriteBatch(
        items=[wb.items[i] for i in envelopes], raws=[wb.raws[i] for i in envelopes],
        num=new_num, num_flags=wb.num_flags[n_sel], wav=new_wav, wav_flags=wb.wav_flags[w_sel],
    )
