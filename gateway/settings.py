"""What a ``Pipeline`` is configured with, built from the gateway configuration.

The defaults of every operator knob live in ``gateway.config`` and nowhere else:
``PipelineSettings.from_config(cfg)`` copies them, and the fields that mirror configuration
default to ``GatewayConfig()``'s values (for tests and embedders that set a few).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.checks import CheckSettings
from gateway.config import GatewayConfig

__all__ = ["PipelineSettings"]

_D = GatewayConfig()  # the defaults of every operator knob live in gateway.config, nowhere else


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """What the pipeline is configured with; ``from_config`` builds it from a ``GatewayConfig``.

    The fields that mirror configuration default to ``GatewayConfig()``'s values; ``tick_s``,
    ``behind_*`` and ``max_concurrent_writes`` are not operator knobs.
    """

    max_rows: int = _D.batch.max_rows
    max_bytes: int = _D.batch.max_bytes
    max_age_s: float = _D.batch.max_age_s
    max_payload_bytes: int = _D.max_payload_bytes
    default_profile: str | None = _D.profiles.default
    require_registration: bool = _D.auth.require_registration  # refuse devices missing from (or revoked in) the registry
    retry_initial_s: float = _D.retry.initial_s
    retry_max_s: float = _D.retry.max_s
    max_pending_bytes: int = _D.max_pending_bytes  # payload bytes held unacknowledged before ``backed_up``
    checks: CheckSettings = field(default_factory=lambda: _check_settings(_D))
    tick_s: float = 1.0
    # ``silent`` ticks wait while the gateway itself is behind (see gateway.ticker)
    behind_lag_s: float = 10.0
    behind_hold_s: float = 5.0
    # Up to this many transactions run at once, so the database works on one batch while the
    # next is decoded and checked. Acks still go out in arrival order (gateway.acks). A batch
    # with alert events waits for the writes before it: closing an episode must find the row
    # that opened it.
    max_concurrent_writes: int = 2

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> PipelineSettings:
        return cls(
            max_rows=cfg.batch.max_rows, max_bytes=cfg.batch.max_bytes, max_age_s=cfg.batch.max_age_s,
            max_payload_bytes=cfg.max_payload_bytes, default_profile=cfg.profiles.default,
            require_registration=cfg.auth.require_registration, retry_initial_s=cfg.retry.initial_s,
            retry_max_s=cfg.retry.max_s, max_pending_bytes=cfg.max_pending_bytes, checks=_check_settings(cfg),
        )


def _check_settings(cfg: GatewayConfig) -> CheckSettings:
    return CheckSettings(max_clock_skew_s=cfg.checks.max_clock_skew_s, max_staleness_s=cfg.checks.max_staleness_s)
