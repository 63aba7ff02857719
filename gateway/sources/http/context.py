"""What every handler of one HTTPS source shares (held in the aiohttp application)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import HttpConfig
from gateway.metrics import Metrics
from gateway.model import AuditEvent
from gateway.sources import Intake

from .api import ApiError
from .auth import AuditThrottle, Principal, RateLimiter, Registry, audit_event, authenticate, retry_after

__all__ = ["Context", "CONTEXT", "CORRELATION", "PRINCIPAL"]

log = logging.getLogger("gateway.sources.http")

CORRELATION = web.RequestKey("correlation_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)


@dataclass(eq=False)
class Context:
    cfg: HttpConfig
    intake: Intake
    registry: Registry
    metrics: Metrics
    gateway_id: str
    limiter: RateLimiter
    openapi: bytes = b"{}"  # the served document (openapi.document)
    started: float = field(default_factory=time.monotonic)
    accepting: bool = True
    waiting: set[asyncio.Future[object]] = field(default_factory=set)  # outcomes requests wait for
    read: object | None = None  # the read side (gateway.api.ReadSide) when the query API is served
    throttle: AuditThrottle | None = None  # repeated authentication failures per address (made on first use)

    def audit(self, request: web.Request, actor: str, action: str, target: str | None,
              detail: dict[str, object] | None = None, *, throttled: bool = False) -> None:
        """Record a refusal in the audit log; a failure to record is logged, never hidden.
        ``throttled``: an authentication failure, counted per address (``AuditThrottle``)."""
        event = audit_event(actor, action, target, remote=request.remote, correlation_id=request[CORRELATION],
                            detail=detail)
        if throttled:
            if self.throttle is None:
                self.throttle = AuditThrottle(self._record)
            self.throttle.record(event)
        else:
            self._record(event)
        log.warning("Request refused.", extra={"action": action, "actor": actor, "target": target,
                                               "remote": request.remote, "correlation_id": request[CORRELATION]})

    def _record(self, event: AuditEvent) -> None:
        try:
            self.intake.audit(event)
        except Exception as exc:  # noqa: BLE001 - the answer still goes out; the log keeps the evidence
            log.error("Audit event not recorded.", extra={"action": event.action, "actor": event.actor,
                                                          "target": event.target, "error": repr(exc)})

    async def authenticate(self, request: web.Request) -> Principal:
        return await authenticate(request, self.registry, lambda actor, action, target, detail: self.audit(
            request, actor, action, target, detail, throttled=True))

    def check_rate(self, principal: Principal) -> None:
        wait = self.limiter.take(principal.limit_key)
        if wait > 0:
            raise ApiError(429, f"rate limit: more than {self.cfg.rate_limit_per_s:g} requests/s "
                                f"(burst {self.cfg.rate_limit_burst}) for this caller",
                           headers={"Retry-After": retry_after(wait)})

    def check_intake(self) -> None:
        if not self.accepting:
            raise ApiError(503, "gateway: shutting down; retry on another instance or later",
                           headers={"Retry-After": str(self.cfg.retry_after_s), "Connection": "close"})
        if self.intake.backed_up:
            raise ApiError(503, "gateway: the database writer is backed up; retry later",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})


CONTEXT = web.AppKey("context", Context)
