"""The read side of the HTTPS API: devices, latest values, readings, waveforms, alerts,
associations and the live stream, for dashboards and clinical systems.

Importing this package registers its operations in the HTTPS source's operation table
(``gateway.sources.http.api.OPERATIONS``), so they are served and described in
``/openapi.json`` like the ingestion routes. The composition root (``app.py``) imports
it and hands the source a ``ReadSide`` (``Context.read``). Modules: ``types`` (wire
types), ``params`` (query parameters and limits), ``reads`` and ``associations`` (the
handlers), ``stream`` (Server-Sent Events).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.profiles import Profile
from gateway.retry import is_retriable
from gateway.query.store import ReadStore
from gateway.sources.http.api import ApiError
from gateway.sources.http.context import CONTEXT, CORRELATION, PRINCIPAL

if TYPE_CHECKING:
    from gateway.query.hub import Hub
    from gateway.query.peers import StreamPeers

__all__ = ["ReadSide", "read_side", "audit_read", "db"]

T = TypeVar("T")

DEFAULT_SILENT_S = 30.0


@dataclass(eq=False)
class ReadSide:
    """What the read handlers share: the read pool, the profiles and the live hub."""

    store: ReadStore
    profiles: Mapping[str, Profile]
    hub: Hub | None = None
    peers: StreamPeers | None = None  # the other workers' hubs (--workers N)
    origin: int = 0  # this worker's index
    origins: int = 1  # workers

    @classmethod
    async def open(cls, cfg: GatewayConfig, profiles: Mapping[str, Profile], pipeline: Any) -> ReadSide:
        """Connect the read pool; start the live hub fed by ``pipeline``'s commits."""
        from gateway.query.hub import Hub
        from gateway.query.peers import StreamPeers
        from gateway.workers import ENV_DIR, worker_index

        store = await ReadStore.connect(cfg.database.url, gateway_id=cfg.gateway_id,
                                        timeout_s=cfg.database.connect_timeout_s)
        hub = Hub()
        await hub.start(store.pool)
        pipeline.add_commit_listener(hub.on_commit)
        side = cls(store=store, profiles=profiles, hub=hub)
        if cfg.workers > 1:
            side.origin, side.origins = worker_index() or 0, cfg.workers
            side.peers = StreamPeers(hub, index=side.origin, count=cfg.workers, runtime_dir=os.environ[ENV_DIR])
            await side.peers.start()
        return side

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()
        if self.hub is not None:
            await self.hub.close()
        await self.store.close()

    def numeric_metrics(self, profile: str | None) -> list[str]:
        """The numeric metrics of ``profile``; of every profile when it is unknown."""
        profs = [self.profiles[profile]] if profile in self.profiles else list(self.profiles.values())
        return sorted({m for p in profs for m, spec in p.metrics.items() if spec.kind == "numeric"})

    def silent_after_ms(self, profile: str | None) -> int:
        prof = self.profiles.get(profile) if profile else None
        after = [r.after_s for r in prof.alerts if r.when == "silent" and r.after_s] if prof else []
        return int(1000 * (min(after) if after else DEFAULT_SILENT_S))


def read_side(request: web.Request) -> ReadSide:
    read = request.app[CONTEXT].read
    if not isinstance(read, ReadSide):
        raise ApiError(503, "gateway: the read API is not available on this instance")
    return read


async def audit_read(request: web.Request, action: str, subject: tuple[str, str], frm: int, to: int,
                     devices: list[str], **detail: Any) -> None:
    """Write who read which patient's or device's data, and over which window, before answering.

    A read that cannot be audited is not answered (503)."""
    kind, value = subject
    principal = request[PRINCIPAL]
    body = {"route": request.path, kind: value, "from": frm, "to": to, **detail}
    if kind == "patient":
        body["patients"] = [value]
    await db(read_side(request).store.audit_read(
        actor=principal.actor, action=action, target=f"patient:{value}" if kind == "patient" else value,
        source_addr=request.remote, correlation_id=request[CORRELATION], detail=body,
        devices=devices if kind != "patient" else [], from_ms=frm, to_ms=to))


async def db(call: Awaitable[T]) -> T:
    """Await a database read; an unavailable database is a 503 naming it, not a 500."""
    try:
        return await call
    except asyncpg.PostgresError as exc:
        if not is_retriable(exc):
            raise  # a fault of this code, not of the database: 500, logged with the correlation id
        raise ApiError(503, f"database: unavailable for reads ({type(exc).__name__}); retry later",
                       headers={"Retry-After": "1"}) from None
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError,
            asyncpg.exceptions.TargetServerAttributeNotMatched) as exc:  # no read-write host during a failover
        raise ApiError(503, f"database: unavailable for reads ({type(exc).__name__}); retry later",
                       headers={"Retry-After": "1"}) from None


from . import associations, reads, stream  # noqa: E402,F401 - importing registers their operations
