"""Who may write: the registration check on each envelope, and the audit trail of refusals.

With ``require_registration``, an envelope of a device missing from the registry, or revoked
in it, is refused with ``IdentityError`` (so is one whose ``device_id`` differs from its
topic's; ``decode`` checks that). Without it, a registered device still gets its registered
profile, and others ``default_profile``. The registry is an in-memory cache: one dict lookup
per envelope. Every ``IdentityError`` becomes an ``AuditEvent`` written with its batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from gateway.errors import IdentityError
from gateway.model import AuditEvent, RawMessage
from gateway.registry import Registry

log = logging.getLogger(__name__)

__all__ = ["Identity", "denied_event"]

ProfileResolver = str | None | Callable[[str], str | None]


class Identity:
    """The profile resolver ``decode`` calls per envelope (it raises for refused devices)."""

    def __init__(self, registry: Registry | None, *, require_registration: bool, default_profile: str | None) -> None:
        if require_registration and registry is None:
            raise ValueError("require_registration needs a registry")
        self.registry = registry
        self.default_profile = default_profile
        self.resolve: ProfileResolver = (
            self._registered_profile if require_registration
            else self._profile_or_default if registry is not None
            else default_profile
        )

    def _registered_profile(self, device_id: str) -> str | None:
        dev = self.registry.device(device_id)  # type: ignore[union-attr]
        if dev is None:
            raise IdentityError(f"device_id: {device_id!r} is not registered", device_id, action="device.unregistered")
        if dev.status != "active":
            raise IdentityError(f"device_id: {device_id!r} is revoked", device_id, action="device.revoked")
        return dev.profile

    def _profile_or_default(self, device_id: str) -> str | None:
        registered = self.registry.profile_of(device_id)  # type: ignore[union-attr]
        return registered if registered is not None else self.default_profile


def denied_event(raw: RawMessage, exc: IdentityError) -> AuditEvent:
    """The ``audit_log`` record of a payload refused for who sent it."""
    return AuditEvent(
        at_ms=raw.received_at_ms,
        actor=f"{raw.source}:{raw.principal or 'anonymous'}",
        action=exc.action,
        target=exc.target,
        outcome="denied",
        source_addr=raw.remote_addr,
        correlation_id=hashlib.sha256(raw.payload).hexdigest(),  # = rejected.payload_sha256
        detail={"reason": exc.reason, "source": raw.source, "topic_or_path": raw.topic_or_path},
    )


def log_unwritten(event: AuditEvent) -> None:
    """Keep in the log an audit event that came after the writer finished (shutdown)."""
    log.warning("Audit event after the writer finished; logged here only.",
                extra={"action": event.action, "actor": event.actor, "target": event.target, "outcome": event.outcome,
                       "source_addr": event.source_addr, "at": event.at_ms, "correlation_id": event.correlation_id})
