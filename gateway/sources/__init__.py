"""Sources: transports that hand payloads to the pipeline, and the table of them.

A source calls ``submit(RawMessage)`` for each payload and acknowledges it to the
device only through ``RawMessage.ack``, which the pipeline calls after commit.
Sources that answer per request (HTTPS) use the richer ``Intake`` surface instead:
validate first, answer 4xx without taking the payload, take it with ``accept()`` and
answer once ``RawMessage.on_outcome`` reports the commit.

``SOURCES`` is the one list of sources: config section name -> how to build one from
that section and a ``SourceContext``. The gateway builds, starts, runs, stops and closes
every enabled source by walking it; adding a source is its module, its config section
and a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.metrics import Metrics
from gateway.model import AuditEvent, RawMessage

if TYPE_CHECKING:
    from gateway.errors import RejectError
    from gateway.registry import Registry

__all__ = ["Submit", "Source", "SourceHealth", "Intake", "Validated", "SourceContext", "SourceKind", "SOURCES"]

Submit = Callable[[RawMessage], None]


class Validated(Protocol):
    """What ``Intake.validate()`` returns: the decoded envelope (``gateway.decode.Decoded``)."""

    @property
    def device_id(self) -> str: ...


class Intake(Protocol):
    """The pipeline as a per-request source sees it (``gateway.pipeline.Pipeline`` or a router
    in front of several). Every method is synchronous and cheap; none blocks on I/O.

    ``accept()`` and ``quarantine()`` raise ``RuntimeError`` once the pipeline stops taking
    payloads (shutdown). A payload taken by either is committed (its rows or its
    ``rejected`` entry) before ``RawMessage.ack``/``on_outcome`` are called.
    """

    def submit(self, raw: RawMessage) -> None:
        """Take a payload to decode and validate later (a reject is quarantined, not raised)."""
        ...

    def validate(self, raw: RawMessage) -> Validated:
        """Decode and validate without taking the payload; raise ``RejectError`` naming the field."""
        ...

    def accept(self, raw: RawMessage, decoded: Validated) -> None:
        """Take a payload that ``validate()`` accepted."""
        ...

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        """Take a payload the source refused (identity, authorization): stored in ``rejected``."""
        ...

    def audit(self, event: AuditEvent) -> None:
        """Record a security decision in the append-only audit log (written with the next batch)."""
        ...

    @property
    def backed_up(self) -> bool:
        """The writer holds more than it should: answer 503 instead of taking more."""
        ...

    @property
    def in_flight(self) -> int:
        """Payloads taken and not yet committed."""
        ...

    @property
    def pending_bytes(self) -> int:
        """Payload bytes taken and not yet committed."""
        ...


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """What a source tells ``/readyz`` (``gateway.health``).

    Args:
        connected: Taking payloads from its peers: connected to the broker, listening.
        detail: Where it is connected or listening, or why it is not (the last error).
        paused_s: How long socket reads have been paused at the memory bound (0 while reading).
    """

    connected: bool
    detail: str
    paused_s: float = 0.0


class Source(Protocol):
    """Lifecycle: ``start()``, ``run()`` until ``stop_intake()``; then the pipeline drains; then ``close()``."""

    async def start(self) -> None:
        """Take what must fail start-up when it fails (a listening port, a certificate); no waiting on peers."""

    async def run(self) -> None:
        """Take payloads (reconnecting as needed) until ``close()``."""

    def stop_intake(self) -> None:
        """Stop handing new payloads to the pipeline; unacknowledged ones stay with the transport."""

    async def close(self) -> None:
        """Send outstanding acknowledgements and disconnect."""

    def health(self) -> SourceHealth:
        """Whether it takes payloads now, and why not; cheap, called by readiness probes."""


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source is built with besides its config section.

    Args:
        intake: Where payloads go (the pipeline, or the worker router in front of it).
        metrics: The process's metrics.
        registry: Devices and API keys; None unless registration is required or a source needs it.
        gateway_id: This process's gateway id (``<id>-w<i>`` for worker ``i``).
        workers: Worker processes of the gateway (1 without ``--workers``): sources share
            their subscription or port between workers when it is more than 1.
        held_fraction: Payload bytes held as a fraction of the budget (reads resume below 0.75).
        max_memory_bytes: Resident memory bound of the process.
    """

    intake: Intake
    metrics: Metrics
    registry: Registry | None
    gateway_id: str
    workers: int
    held_fraction: Callable[[], float]
    max_memory_bytes: int


@dataclass(frozen=True, slots=True)
class SourceKind:
    """How to build one source from its config section (which has ``enabled``)."""

    build: Callable[[Any, SourceContext], Source]
    needs_registry: bool = False


# After the protocols above, which the source modules import from this package.
from gateway.sources import http, mqtt, nats  # noqa: E402

SOURCES: dict[str, SourceKind] = {
    "mqtt": SourceKind(mqtt.build),
    "nats": SourceKind(nats.build),
    "http": SourceKind(http.build, needs_registry=True),
}
