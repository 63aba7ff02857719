"""The gateway's HL7 feed task: fill the numerics, send the outbox, settle every row.

Exactly one process of all gateways sends: the one holding the session advisory lock
``LOCK_KEY`` on its database connection; the others try again every ``standby_s`` (and
take over within that time when the sender dies, as its lock goes with its connection).

The sender takes due rows in id order (``outbox.fetch_due``), renders each with its
device's profile, and exchanges it over one MLLP connection. The outcome is settled in the
row: AA/CA sent; AE/CE and AR/CR retried after a backoff or parked with the receiver's
reason, per ``on_error`` / ``on_reject``; a row that cannot be rendered is parked. A
retried row holds back the later rows of its patient (order per patient), not the others.
A lost connection or a missing ACK settles nothing: the message goes again, with the same
MSH-10, after a capped, jittered backoff. Outcomes are written once per batch, so a crash
between an ACK and that write resends messages the receiver has already seen: those
repeats are identical, MSH-10 included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import asyncpg

from gateway.config import GatewayConfig, Hl7Config
from gateway.hl7 import outbox
from gateway.hl7.messages import Header, control_id
from gateway.hl7.mllp import MllpConnection, MllpError
from gateway.hl7.render import OutboxRow, RenderError, render
from gateway.metrics import Metrics
from gateway.profiles import Profile
from gateway.retry import Backoff

__all__ = ["LOCK_KEY", "Feed", "run_feed"]

log = logging.getLogger(__name__)

LOCK_KEY = 0x76676866  # "vghf": the sending process's session lock
_REJECTS = frozenset({"AR", "CR"})
_PENDING_EVERY_S = 2.0


def header_of(cfg: Hl7Config) -> Header:
    return Header(sending_application=cfg.sending_application, sending_facility=cfg.sending_facility,
                  receiving_application=cfg.receiving_application, receiving_facility=cfg.receiving_facility,
                  processing_id=cfg.processing_id, patient_id_authority=cfg.patient_id_authority)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class Feed:
    """The sending loop on a connection that holds ``LOCK_KEY``."""

    def __init__(self, conn: asyncpg.Connection, cfg: Hl7Config, profiles: Mapping[str, Profile],
                 metrics: Metrics) -> None:
        self.conn = conn
        self.cfg = cfg
        self.header = header_of(cfg)
        self.profiles = profiles
        self.metrics = metrics
        self.backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        self.link: MllpConnection | None = None

    async def fill_numerics(self) -> int:
        now_ms = await self.conn.fetchval("SELECT (extract(epoch FROM now()) * 1000)::bigint")
        cfg = self.cfg
        n = await outbox.enqueue_numerics(self.conn, now_ms=now_ms, cadence_ms=cfg.cadence_s * 1000,
                                          delay_ms=int(cfg.delay_s * 1000), mode=cfg.numerics,
                                          catch_up=cfg.catch_up_periods)
        self.metrics.hl7_enqueued.inc(n)
        return n

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        next_fill = next_count = 0.0
        try:
            while not stop.is_set():
                if cfg.numerics != "off" and loop.time() >= next_fill:
                    await self.fill_numerics()
                    next_fill = loop.time() + min(cfg.cadence_s, 5.0)
                if loop.time() >= next_count:
                    self.metrics.hl7_pending.set(
                        await self.conn.fetchval("SELECT count(*) FROM hl7_outbox WHERE status = 'pending'"))
                    next_count = loop.time() + _PENDING_EVERY_S
                rows = await outbox.fetch_due(self.conn, cfg.batch)
                if not rows:
                    await _wait(stop, cfg.poll_s)
                    continue
                if not await self.send(rows, stop):
                    await _wait(stop, self.backoff.next_delay())
        finally:
            await self._drop_link()

    async def _drop_link(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            self.metrics.hl7_connected.set(0)
            await link.close()

    async def send(self, rows: list, stop: asyncio.Event) -> bool:
        """Send ``rows`` in order and settle them; False when the connection failed (back off)."""
        cfg, m = self.cfg, self.metrics
        if self.link is None:
            try:
                self.link = await MllpConnection.open(cfg)
            except MllpError as exc:
                m.hl7_errors.labels(exc.stage).inc()
                log.warning("HL7 receiver not reachable; retrying.", extra={"error": str(exc)})
                return False
            m.hl7_connected.set(1)
            log.info("HL7 receiver connected.", extra={"address": f"{cfg.host}:{cfg.port}"})
        outcomes: list[tuple[int, str, str | None, str | None, float]] = []
        held: set[str] = set()  # patients with a row waiting for its retry: their later rows wait too
        try:
            for row_id, kind, patient, location, created_ms, body, attempts in rows:
                if stop.is_set():
                    break
                if patient in held:
                    continue
                row = OutboxRow(id=row_id, kind=kind, patient_ref=patient, location=location, created_ms=created_ms,
                                body=body)
                try:
                    message = render(row, self.profiles, self.header)
                except (RenderError, KeyError, TypeError, ValueError) as exc:
                    outcomes.append((row_id, "parked", None, f"not rendered: {exc!r}", 0.0))
                    m.hl7_messages.labels(kind, "parked").inc()
                    log.error("HL7 message parked: it cannot be rendered.", extra={"outbox_id": row_id, "error": repr(exc)})
                    continue
                t0 = time.perf_counter()
                ack = await self.link.exchange(message, control_id(row_id), cfg.ack_timeout_s)
                m.hl7_ack_latency.observe(time.perf_counter() - t0)
                m.hl7_acks.labels(ack.code).inc()
                self.backoff.reset()
                if ack.accepted:
                    outcomes.append((row_id, "sent", ack.code, None, 0.0))
                    m.hl7_messages.labels(kind, "accepted").inc()
                    continue
                reason = ack.reason or f"{ack.code} without a reason"
                policy = cfg.on_reject if ack.code in _REJECTS else cfg.on_error
                if policy == "park":
                    outcomes.append((row_id, "parked", ack.code, reason, 0.0))
                    m.hl7_messages.labels(kind, "parked").inc()
                    log.warning("HL7 message parked by the receiver.", extra={
                        "outbox_id": row_id, "control_id": control_id(row_id), "ack": ack.code, "reason": reason})
                else:
                    delay = min(cfg.retry_max_s, cfg.retry_initial_s * 2 ** min(attempts, 30))
                    outcomes.append((row_id, "pending", ack.code, reason, delay))
                    held.add(patient)
                    m.hl7_messages.labels(kind, "retried").inc()
                    log.warning("HL7 message refused; retrying.", extra={
                        "outbox_id": row_id, "ack": ack.code, "reason": reason, "retry_in_s": delay})
            return True
        except MllpError as exc:
            m.hl7_errors.labels(exc.stage).inc()
            log.warning("HL7 exchange failed; reconnecting.", extra={"error": str(exc)})
            await self._drop_link()
            return False
        finally:
            await outbox.settle(self.conn, outcomes)


async def run_feed(config: GatewayConfig, profiles: Mapping[str, Profile], metrics: Metrics,
                   stop: asyncio.Event) -> None:
    """Until ``stop``: take the sender's lock when free and run the feed; never raises."""
    cfg = config.hl7
    backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
    while not stop.is_set():
        delay = cfg.standby_s
        try:
            conn = await asyncpg.connect(config.database.url, timeout=config.database.connect_timeout_s,
                                         server_settings={"application_name": f"vitalgate-hl7:{config.gateway_id}"})
            try:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                    metrics.hl7_active.set(1)
                    log.info("HL7 feed sending.", extra={"receiver": f"{cfg.host}:{cfg.port}"})
                    await Feed(conn, cfg, profiles, metrics).run(stop)
                    backoff.reset()
            finally:
                metrics.hl7_active.set(0)
                await conn.close(timeout=5.0)  # releases the lock
        except Exception as exc:  # noqa: BLE001 - the feed must never stop ingestion; its state is in the outbox
            delay = backoff.next_delay()
            log.error("HL7 feed failed; restarting.", extra={"error": repr(exc), "retry_in_s": round(delay, 2)})
        await _wait(stop, delay)
