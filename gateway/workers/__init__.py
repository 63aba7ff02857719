"""Several gateway processes on one machine: ``vitalgate run --workers N``.

The supervisor (``supervisor.py``) starts N worker processes. Each subscribes the
telemetry topic as a member of one MQTT 5 shared subscription (``$share/<group>/...``),
so the broker spreads messages over them round-robin, not by device. Per-device check
and alert state lives in exactly one process: worker ``i`` owns device ``d`` iff
``owner_of(d, N) == i`` (CRC-32 of the id, the same in every process). A worker that
receives a payload of a device it does not own forwards it over a unix socket to the
owner (``router.py`` decides, ``forward.py`` sends and holds), which takes it into its
own pipeline (``owner.py``) and reports the commit back; only then is the payload
acknowledged to the transport.
"""

from __future__ import annotations

import os
import zlib

import msgspec

from gateway.config import GatewayConfig

__all__ = ["owner_of", "for_worker", "worker_index", "ENV_INDEX", "ENV_DIR"]

ENV_INDEX = "VITALGATE_WORKER_INDEX"  # set by the supervisor for each worker: 0..N-1
ENV_DIR = "VITALGATE_WORKER_DIR"  # runtime directory holding the workers' sockets


def owner_of(device_id: str, count: int) -> int:
    """The worker owning ``device_id`` among ``count``: stable across processes and restarts."""
    return zlib.crc32(device_id.encode()) % count


def worker_index() -> int | None:
    """This process's worker index when a supervisor started it, else None."""
    value = os.environ.get(ENV_INDEX)
    return int(value) if value not in (None, "") else None


def for_worker(cfg: GatewayConfig, index: int) -> GatewayConfig:
    """The configuration of worker ``index``: its own gateway id (provenance), MQTT client id
    (a persistent session each) and metrics port (``metrics_port + index`` when served)."""
    client_id = cfg.mqtt_client_id
    return msgspec.structs.replace(
        cfg,
        gateway_id=f"{cfg.gateway_id[:60]}-w{index}",
        metrics_port=cfg.metrics_port + index if cfg.metrics_port else 0,
        mqtt=msgspec.structs.replace(cfg.mqtt, client_id=f"{client_id}-w{index}"),
    )
