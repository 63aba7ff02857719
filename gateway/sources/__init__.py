"""Sources: transports that hand payloads to the pipeline.

A source calls ``submit(RawMessage)`` for each payload and acknowledges it to the
device only through ``RawMessage.ack``, which the pipeline calls after commit.
Sources that answer per request (HTTPS) use the richer ``Intake`` surface instead:
validate first, answer 4xx without taking the payload, take it with ``accept()`` and
answer once ``RawMessage.on_outcome`` reports the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gateway.model import AuditEvent, RawMessage

if TYPE_CHECKING:
    from gateway.errors import RejectError

__all__ = ["Submit", "Source", "Intake", "Validated"]

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


class Source(Protocol):
    """Lifecycle: ``run()`` until ``stop_intake()``; then the pipeline drains; then ``close()``."""

    async def run(self) -> None:
        """Take payloads (reconnecting as needed) until ``close()``."""

    def stop_intake(self) -> None:
        """Stop handing new payloads to the pipeline; unacknowledged ones stay with the transport."""

    async def close(self) -> None:
        """Send outstanding acknowledgements and disconnect."""
