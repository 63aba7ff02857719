"""Fencing: a deposed owner commits nothing of the partition it lost.

A partition's owner is recorded in ``partition_owners`` (consumer name, owner, epoch).
A gateway that gets a partition's pin *claims* it: when another owner held it, the epoch
goes up. Every message carries the epoch its partition had when it was pulled
(``Delivery.epoch``). The commit transaction of every batch first locks the rows of the
partitions it touches (``FOR SHARE``) and keeps only what was pulled under the current
epoch by this owner; the rest (envelopes, their rejects and alert events) is left out, not
acknowledged, and redelivered to the new owner. Alerts the clock opens (``silent``) have no
message: they are ``stamp``ed with the partition and epoch held when the tick raised them,
and are kept only when that epoch is still the current one, so a tick computed from state
of a partition since lost (or lost and taken back) commits nothing. A claim waits for the
transactions holding the lock, so a takeover never interleaves with its predecessor's last
commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import asyncpg

from gateway.errors import SinkError
from gateway.model import AlertEvent
from gateway.retry import DATABASE_ERRORS, is_retriable
from gateway.sinks import WriteBatch
from gateway.writepolicy import subset

__all__ = ["Fence", "Delivered", "DDL"]

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS partition_owners (
    consumer text PRIMARY KEY,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
)
"""

_CLAIM = """
INSERT INTO partition_owners AS o (consumer, owner, epoch) VALUES ($1, $2, 1)
ON CONFLICT (consumer) DO UPDATE SET owner = EXCLUDED.owner, epoch = o.epoch + 1, since = now()
    WHERE o.owner <> EXCLUDED.owner
RETURNING epoch
"""

_CHECK = "SELECT consumer, owner, epoch FROM partition_owners WHERE consumer = ANY($1::text[]) FOR SHARE"


class Delivered(Protocol):
    """What the fence reads from ``RawMessage.ack``: the message's partition and epoch."""

    consumer: str
    epoch: int


class Fence:
    """Claims partitions and filters each batch in its commit transaction (``TimescaleSink.fence``).

    Args:
        dsn: The database (one connection for claims).
        owner: This process's owner name (gateway id plus a boot token: a restart is a new owner).
        consumer_of_device: Partition consumer of a device seen by this process (None: unknown).
        held_epoch: The epoch this process holds for a consumer (None: not held).
        deposed: Called with the consumers found taken over, before the commit.
        left_out: Called with the number of envelopes left out of a commit.
        stale: Called with the devices whose clock alerts were left out (their state is stale).
    """

    _MAX_STAMPS = 100_000  # clock alerts awaiting their commit; older ones go first

    def __init__(self, dsn: str, owner: str, *, consumer_of_device: Callable[[str], str | None],
                 held_epoch: Callable[[str], int | None], deposed: Callable[[set[str]], None],
                 left_out: Callable[[int], None] = lambda _n: None,
                 stale: Callable[[set[str]], None] = lambda _d: None) -> None:
        self.dsn = dsn
        self.owner = owner
        self._consumer_of = consumer_of_device
        self._held = held_epoch
        self._deposed = deposed
        self._left_out = left_out
        self._stale = stale
        self._conn: asyncpg.Connection | None = None
        self._claiming = asyncio.Lock()  # one connection: claims of several partitions take turns
        self._stamps: dict[AlertEvent, tuple[str, int]] = {}

    def stamp(self, event: AlertEvent, consumer: str, epoch: int) -> None:
        """Record the partition and epoch a clock-raised ``event`` was computed under."""
        if len(self._stamps) >= self._MAX_STAMPS:
            for old in list(self._stamps)[: self._MAX_STAMPS // 2]:
                del self._stamps[old]  # never committed (the write failed for good): left out
        self._stamps[event] = (consumer, epoch)

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.dsn, timeout=10)
        await self._conn.execute(DDL)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=5)
            self._conn = None

    async def claim(self, consumer: str) -> tuple[int, bool]:
        """Record this process as the consumer's owner: ``(epoch, taken over from another owner)``."""
        async with self._claiming:
            try:
                if self._conn is None or self._conn.is_closed():
                    await self.start()
                assert self._conn is not None
                epoch = await self._conn.fetchval(_CLAIM, consumer, self.owner)
                if epoch is not None:
                    return int(epoch), True
                got = await self._conn.fetchval("SELECT epoch FROM partition_owners WHERE consumer = $1", consumer)
                return int(got), False
            except DATABASE_ERRORS as exc:
                self._conn = None
                raise SinkError(f"partition claim failed: {exc}", retriable=is_retriable(exc)) from exc

    async def __call__(self, conn: asyncpg.Connection, wb: WriteBatch) -> None:
        """Lock the batch's partitions and leave out what this owner may no longer commit."""
        env_consumer = [_consumer(r.ack) for r in wb.raws]
        rej_consumer = [_consumer(r.raw.ack) for r in wb.rejected]
        # an alert caused by a reading follows its envelope; one raised by the clock carries its stamp
        clock = [self._stamps.get(ev) if ev.env is None else None for ev in wb.alerts]
        alert_consumer = [s[0] if s is not None else self._consumer_of(ev.device_id) for s, ev in zip(clock, wb.alerts)]
        touched = {c for c in (*env_consumer, *rej_consumer, *alert_consumer) if c is not None}
        if not touched:
            return
        rows = await conn.fetch(_CHECK, sorted(touched))
        current: Mapping[str, int] = {r["consumer"]: r["epoch"] for r in rows if r["owner"] == self.owner}
        lost = {c for c in touched if c not in current or self._held(c) != current[c]}

        def ok(consumer: str | None, epoch: int | None) -> bool:
            return consumer is None or (consumer not in lost and current.get(consumer) == epoch)

        def keep_alert(i: int) -> bool:
            if wb.alerts[i].env is not None:
                return alert_consumer[i] is None or alert_consumer[i] not in lost
            stamp = clock[i]
            return alert_consumer[i] is None if stamp is None else ok(stamp[0], stamp[1])

        keep = [i for i, r in enumerate(wb.raws) if ok(env_consumer[i], _epoch(r.ack))]
        alerts_kept = [keep_alert(i) for i in range(len(wb.alerts))]
        stale = {c for c in touched if c in current and c not in lost}  # held now, yet some deliveries older
        if (not lost and len(keep) == len(wb.raws) and all(alerts_kept)
                and all(ok(c, _epoch(r.raw.ack)) for c, r in zip(rej_consumer, wb.rejected))):
            return
        if lost:
            self._deposed(lost)
        dropped = {wb.alerts[i].device_id for i, k in enumerate(alerts_kept) if not k and wb.alerts[i].env is None}
        if dropped:
            self._stale(dropped)  # the engine counts them open: forget, restore from storage when next seen
        _leave_out(wb, keep, lambda i: ok(rej_consumer[i], _epoch(wb.rejected[i].raw.ack)), lambda i: alerts_kept[i])
        if len(keep) < len(env_consumer):
            self._left_out(len(env_consumer) - len(keep))
        log.warning("Commit fenced: what was pulled or raised under a partition's former epoch is left out.",
                    extra={"lost": ",".join(sorted(lost)), "stale": ",".join(sorted(stale)),
                           "envelopes_left_out": len(env_consumer) - len(keep), "clock_alerts_left_out": len(dropped)})


def _consumer(ack: object) -> str | None:
    return getattr(ack, "consumer", None)


def _epoch(ack: object) -> int | None:
    return getattr(ack, "epoch", None)


def _leave_out(wb: WriteBatch, keep: list[int], keep_reject: Callable[[int], bool], keep_alert: Callable[[int], bool]) -> None:
    """Reduce ``wb`` in place to envelopes ``keep`` (renumbered) and the rejects and alerts kept."""
    renumber = {old: new for new, old in enumerate(keep)}
    part = subset(wb, keep)
    alerts = []
    for i, ev in enumerate(wb.alerts):
        if not keep_alert(i) or (ev.env is not None and ev.env not in renumber):
            continue
        alerts.append(ev if ev.env is None else dataclasses.replace(ev, env=renumber[ev.env]))
    if wb.alert_ingest_ids is not None:
        wb.alert_ingest_ids = [wb.alert_ingest_ids[i] for i in keep]
    wb.items, wb.raws, wb.num, wb.num_flags = part.items, part.raws, part.num, part.num_flags
    wb.wav, wb.wav_flags = part.wav, part.wav_flags
    wb.rejected = [r for i, r in enumerate(wb.rejected) if keep_reject(i)]
    wb.alerts = alerts
