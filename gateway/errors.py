"""Exception hierarchy: misuse (config, profiles), rejected data, dependency failure."""

from __future__ import annotations

__all__ = ["GatewayError", "ConfigError", "ProfileError", "RejectError", "IdentityError", "RegistryError", "SinkError"]


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The gateway configuration is invalid; start-up stops with this message."""


class ProfileError(GatewayError):
    """A device profile is invalid; the message names the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")


class RejectError(GatewayError):
    """An envelope breaks a rule of the contract and is rejected whole.

    ``reason`` is ``field.path: message`` (or a bare message when no single field is at fault).
    ``device_id`` is set when it could be read from the payload or the topic.
    """

    def __init__(self, reason: str, device_id: str | None = None) -> None:
        self.reason = reason
        self.device_id = device_id
        super().__init__(reason)


class IdentityError(RejectError):
    """A reject about who sent the envelope, not about its content: it is audited too.

    ``action`` is the audit action (``identity.mismatch``, ``device.unregistered``,
    ``device.revoked``, ``auth.failure``, ``authz.denied``); ``target`` the device the
    envelope claimed to be, when it is not ``device_id`` (the authenticated one).
    """

    def __init__(self, reason: str, device_id: str | None = None, *, action: str, target: str | None = None) -> None:
        super().__init__(reason, device_id)
        self.action = action
        self.target = target if target is not None else device_id


class RegistryError(GatewayError):
    """The device registry cannot be loaded (database unreachable, tables missing)."""


class SinkError(GatewayError):
    """A write to storage failed; ``retriable`` says whether the same write may succeed later."""

    def __init__(self, message: str, *, retriable: bool, sqlstate: str | None = None) -> None:
        self.retriable = retriable
        self.sqlstate = sqlstate
        super().__init__(message)

    @property
    def data_error(self) -> bool:
        """The database refused the data itself (SQLSTATE class 22 or 23), not the operation."""
        return (self.sqlstate or "")[:2] in ("22", "23")
