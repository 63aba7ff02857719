"""Gateway configuration: a TOML file plus ``VITALGATE_*`` environment overrides.

Every knob has a default; ``gateway.sample.toml`` lists them all. ``load()`` validates
the result with msgspec and raises ``ConfigError`` naming the key (and the environment
variable, when the value came from one). Loading does no network I/O.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Mapping

import msgspec
from msgspec import Meta, Struct

from gateway.errors import ConfigError
from gateway.config.sections import (
    AuthConfig,
    BatchConfig,
    ChecksConfig,
    DatabaseConfig,
    HealthConfig,
    Hl7Config,
    HttpConfig,
    LogConfig,
    MqttConfig,
    NatsConfig,
    Port,
    PosFloat,
    ProfilesConfig,
    RetentionConfig,
    RetryConfig,
    SourceSection,
)

__all__ = [
    "DatabaseConfig",
    "MqttConfig",
    "HttpConfig",
    "SourceSection",
    "NatsConfig",
    "AuthConfig",
    "BatchConfig",
    "RetryConfig",
    "ChecksConfig",
    "ProfilesConfig",
    "RetentionConfig",
    "LogConfig",
    "HealthConfig",
    "Hl7Config",
    "GatewayConfig",
    "load",
    "pending_budget",
    "ENV_PREFIX",
]

ENV_PREFIX = "VITALGATE_"


# Memory bound (max_memory_mib): what the process needs besides the payloads it holds
# (interpreter, numpy, modules, one batch's columns and COPY buffer), and what a held
# payload costs resident per byte of payload: a decoded ICU-bed envelope (10 numerics,
# ECG 250 Hz, pleth 125 Hz, resp 62.5 Hz; 3.6 KiB of JSON) holds 6.7 times its size
# (3.8 as MessagePack), measured with gateway.decode on this code.
_BASE_MIB = 160
_DECODED_FACTOR = 8


def pending_budget(max_memory_mib: int) -> int:
    """Payload bytes the pipeline may hold unacknowledged under ``max_memory_mib``."""
    return max(4 << 20, ((max_memory_mib - _BASE_MIB) << 20) // _DECODED_FACTOR)


class GatewayConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = ""
    max_payload_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 256 * 1024
    quarantine_payload_bytes: Annotated[int, Meta(ge=0)] = 64 * 1024
    shutdown_timeout_s: PosFloat = 30.0
    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 9464
    max_memory_mib: Annotated[int, Meta(ge=64)] = 512
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    database: DatabaseConfig = DatabaseConfig()
    mqtt: MqttConfig = MqttConfig()
    nats: NatsConfig = NatsConfig()  # source sections in the order of gateway.sources.SOURCES
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()
    batch: BatchConfig = BatchConfig()
    retry: RetryConfig = RetryConfig()
    checks: ChecksConfig = ChecksConfig()
    profiles: ProfilesConfig = ProfilesConfig()
    retention: RetentionConfig = RetentionConfig()
    log: LogConfig = LogConfig()
    health: HealthConfig = HealthConfig()
    hl7: Hl7Config = Hl7Config()

    def __post_init__(self) -> None:
        sources = self.source_sections()
        if not any(section.enabled for section in sources.values()):
            names = " and ".join(f"{name}.enabled" for name in sources)
            raise ValueError(f"{names} are all false: nothing to ingest")
        if self.nats.enabled and self.mqtt.enabled:  # cluster mode: devices reach the gateway through NATS
            raise ValueError("nats.enabled and mqtt.enabled: in cluster mode set mqtt.enabled = false")
        if self.nats.enabled and self.workers > 1:
            raise ValueError("nats.enabled with workers > 1: run more gateway processes instead (each one a member)")
        if (self.mqtt.tls_cert is None) != (self.mqtt.tls_key is None):
            raise ValueError("mqtt.tls_cert and mqtt.tls_key go together")
        if (self.http.tls_cert is None) != (self.http.tls_key is None):
            raise ValueError("http.tls_cert and http.tls_key go together")
        if self.http.enabled and self.http.tls_cert is None and not self.http.allow_plaintext:
            raise ValueError("http.enabled needs http.tls_cert and http.tls_key (or http.allow_plaintext = true)")
        if self.http.tls_client_ca is not None and self.http.tls_cert is None:
            raise ValueError("http.tls_client_ca (mutual TLS) needs http.tls_cert and http.tls_key")

    def source_sections(self) -> dict[str, SourceSection]:
        """Every source's section by name, in declaration order."""
        return {name: value for name in self.__struct_fields__
                if isinstance(value := getattr(self, name), SourceSection)}

    @property
    def max_pending_bytes(self) -> int:
        """Payload bytes held unacknowledged before sources pause intake (``pending_budget``)."""
        return pending_budget(self.max_memory_mib)

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id_for(self.gateway_id)


_SECTIONS = {
    name: typ
    for name, typ in GatewayConfig.__annotations__.items()
    if isinstance(typ, str) and typ.endswith("Config") and typ != "GatewayConfig"
}
_TOP_KEYS = set(GatewayConfig.__struct_fields__) - set(_SECTIONS)


_NOT_SETTINGS = {"config", "worker_index", "worker_dir"}  # VITALGATE_CONFIG; set by the --workers supervisor


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``VITALGATE_MQTT_URL`` -> ``{"mqtt": {"url": ...}}``; ``VITALGATE_GATEWAY_ID`` -> top-level key."""
    out: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key in _NOT_SETTINGS:
            continue
        if key in _TOP_KEYS:
            out[key] = value
            origin[(key,)] = var
            continue
        section, _, sub = key.partition("_")
        if section in _SECTIONS and sub:
            out.setdefault(section, {})[sub] = value
            origin[(section, sub)] = var
            continue
        raise ConfigError(f"{var}: unknown setting (no key {key.replace('_', '.', 1)!r})")
    return out, origin


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


_AT = re.compile(r"\s*-\s*at\s*`\$\.?([^`]*)`\s*$")


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read ``path`` (optional) and apply environment overrides; validate everything."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    if path:
        try:
            data = msgspec.toml.decode(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    env, origin = _env_overrides(environ)
    data = _merge(data, env)
    try:
        # Environment values are strings: convert leniently ("10" -> 10, "true" -> True).
        cfg = msgspec.convert(data, GatewayConfig, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT.search(text)
        key = m.group(1) if m else ""
        message = text[: m.start()] if m else text
        var = origin.get(tuple(key.split("."))) if key else None
        where = f"{var} ({key})" if var else (key or "configuration")
        src = f"{path}: " if path and not var else ""
        raise ConfigError(f"{src}{where}: {message}") from None
    except ValueError as exc:
        raise ConfigError(f"configuration: {exc}") from None
    if not cfg.gateway_id:
        cfg = msgspec.structs.replace(cfg, gateway_id=re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64])
    return cfg
