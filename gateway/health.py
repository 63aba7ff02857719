"""Liveness (``/healthz``) and readiness (``/readyz``) of one gateway process.

Both answer on the metrics port, without TLS, so a probe needs no credentials. The port
is served by a thread (``gateway.metrics``), not by the event loop: a loop that is stuck
(a blocking call, a runaway batch) could not answer for itself, and ``/healthz`` must say
so rather than time out. The thread therefore measures the loop from outside: it asks
the loop to run one callback and waits for it at most ``max_loop_lag_s``.

Readiness facts that live on the loop (a ``SELECT 1``, the sources' connection state,
the writer's last error) are gathered by a coroutine run on the loop with a deadline; a
loop that does not answer in time fails every check with that reason. The ``SELECT 1``
is cached for ``database_cache_s`` and shared by concurrent probes, so probing does not
load the database.

Body: ``{"status": "ok" | "fail" | "ready" | "not_ready", "checks": [{"name", "ok",
"detail"}]}``; 200 when every check passes, 503 otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import msgspec

from gateway.config import HealthConfig
from gateway.errors import SinkError
from gateway.sources import SourceHealth

__all__ = ["Check", "Health", "READINESS_CHECKS"]

READINESS_CHECKS = ("database", "broker", "registry", "writer", "intake")


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str


class _Report(msgspec.Struct):
    status: str
    checks: list[Check]


class Database(Protocol):
    async def ping(self, timeout_s: float) -> None:
        """``SELECT 1`` on a pool connection within ``timeout_s``; ``SinkError`` saying why not."""


class Source(Protocol):
    def health(self) -> SourceHealth: ...


class Writer(Protocol):
    @property
    def write_error(self) -> tuple[SinkError, float] | None: ...


class Intake(Protocol):
    @property
    def backed_up(self) -> bool: ...

    @property
    def pending_bytes(self) -> int: ...


class Registry(Protocol):
    reloads: int

    @property
    def size(self) -> int: ...


@dataclass
class Facts:
    """What readiness reads; the gateway fills it in as start-up builds each part."""

    database: Database | None = None
    sources: Mapping[str, Source] | None = None
    registry: Registry | None = None
    registry_required: bool = False
    writer: Writer | None = None
    intake: Intake | None = None
    max_pending_bytes: int = 0
    stopping: bool = False  # shutdown began: intake is stopped for good


_ENCODER = msgspec.json.Encoder()


def _answer(ok: bool, good: str, bad: str, checks: list[Check]) -> tuple[int, bytes]:
    return (200 if ok else 503), _ENCODER.encode(_Report(good if ok else bad, checks))


class Health:
    """Answers ``/healthz`` and ``/readyz`` from the server thread (see the module docstring)."""

    def __init__(self, cfg: HealthConfig, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.facts = Facts()
        self._loop = loop
        self._clock = clock
        self._db_check: Check | None = None
        self._db_at = 0.0
        self._db_probe: asyncio.Future[Check] | None = None

    # ------------------------------------------------------------ server thread
    def routes(self) -> dict[str, Callable[[], tuple[int, bytes]]]:
        return {"/healthz": self.healthz, "/readyz": self.readyz}

    def healthz(self) -> tuple[int, bytes]:
        check = self._loop_check()
        return _answer(check.ok, "ok", "fail", [check])

    def readyz(self) -> tuple[int, bytes]:
        budget = self.cfg.database_timeout_s + self.cfg.max_loop_lag_s
        try:
            fut = asyncio.run_coroutine_threadsafe(self.readiness(), self._loop)
        except RuntimeError:  # the loop is closed: the process is exiting
            checks = [Check(name, False, "event loop closed") for name in READINESS_CHECKS]
        else:
            try:
                checks = fut.result(timeout=budget)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                why = f"event loop did not answer within {budget * 1000:.0f} ms"
                checks = [Check(name, False, why) for name in READINESS_CHECKS]
        return _answer(all(c.ok for c in checks), "ready", "not_ready", checks)

    def _loop_check(self) -> Check:
        bound = self.cfg.max_loop_lag_s
        ran = threading.Event()
        t0 = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(ran.set)
        except RuntimeError:
            return Check("event_loop", False, "event loop closed")
        if not ran.wait(bound):
            return Check("event_loop", False, f"no answer within {bound * 1000:.0f} ms")
        return Check("event_loop", True, f"lag {(time.monotonic() - t0) * 1000:.0f} ms")

    # ------------------------------------------------------------ event loop
    async def readiness(self) -> list[Check]:
        """Every readiness check, in ``READINESS_CHECKS`` order."""
        f = self.facts
        return [await self._database(), self._broker(f), self._registry(f), self._writer(f), self._intake(f)]

    async def _database(self) -> Check:
        if self._db_check is not None and self._clock() - self._db_at < self.cfg.database_cache_s:
            return self._db_check
        if self._db_probe is None:  # one probe at a time; concurrent probes share it
            self._db_probe = asyncio.ensure_future(self._probe_database())
        return await asyncio.shield(self._db_probe)

    async def _probe_database(self) -> Check:
        db = self.facts.database
        t0 = self._clock()
        try:
            if db is None:
                check = Check("database", False, "not connected yet")
            else:
                await db.ping(self.cfg.database_timeout_s)
                check = Check("database", True, f"SELECT 1 in {(self._clock() - t0) * 1000:.0f} ms")
        except SinkError as exc:
            check = Check("database", False, str(exc))
        finally:
            self._db_probe = None
        self._db_check, self._db_at = check, self._clock()
        return check

    @staticmethod
    def _broker(f: Facts) -> Check:
        if f.sources is None:
            return Check("broker", False, "sources not started yet")
        states = [s.health() for s in f.sources.values()]
        return Check("broker", all(s.connected for s in states), "; ".join(s.detail for s in states))

    @staticmethod
    def _registry(f: Facts) -> Check:
        if f.registry is None:
            if f.registry_required:
                return Check("registry", False, "not loaded yet")
            return Check("registry", True, "not used (registration not required)")
        if f.registry.reloads < 1:
            return Check("registry", False, "not loaded yet")
        return Check("registry", True, f"loaded, {f.registry.size} devices")

    @staticmethod
    def _writer(f: Facts) -> Check:
        if f.writer is None or f.intake is None:
            return Check("writer", False, "not started yet")
        held = f.intake.pending_bytes / 1048576
        budget = f.max_pending_bytes / 1048576
        failing = f.writer.write_error
        if failing is not None:
            exc, for_s = failing
            code = f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else ""
            return Check("writer", False, f"commits failing for {for_s:.0f} s, retrying{code}: {exc}")
        if f.intake.backed_up:
            return Check("writer", False, f"backed up: {held:.1f} MiB of payloads held, budget {budget:.1f} MiB")
        return Check("writer", True, f"{held:.1f} MiB of payloads held, budget {budget:.1f} MiB")

    def _intake(self, f: Facts) -> Check:
        if f.stopping:
            return Check("intake", False, "shutting down: intake stopped")
        if f.sources is None:
            return Check("intake", False, "sources not started yet")
        bound = self.cfg.max_paused_s
        paused = {name: s.health().paused_s for name, s in f.sources.items()}
        longest = max(paused.values(), default=0.0)
        if longest > bound:
            names = ", ".join(n for n, p in paused.items() if p > bound)
            return Check("intake", False, f"{names} paused for {longest:.0f} s, longer than {bound:g} s")
        if longest > 0:
            return Check("intake", True, f"paused for {longest:.0f} s (bound {bound:g} s)")
        return Check("intake", True, "reading")
