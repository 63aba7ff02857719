"""Wire types of the read API (times are epoch milliseconds), shared by handlers and OpenAPI."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from gateway.model import DEVICE_ID_PATTERN

__all__ = [
    "OpenAlert", "Latest", "DeviceStatus", "DevicesResponse", "LatestReading", "LatestResponse", "Reading",
    "ReadingsResponse", "Bucket", "Block", "WaveformsResponse", "AlertEpisode",
    "AlertsResponse", "Association", "AssociationsResponse", "NewAssociation", "EndAssociation",
    "PATIENT_PATTERN", "METRIC_PATTERN", "MAX_MS",
]

PATIENT_PATTERN = "^[^\\u0000-\\u001f]{1,128}$"
METRIC_PATTERN = "^[A-Za-z0-9_.-]{1,64}$"
MAX_MS = 253_402_300_799_999
EpochMs = Annotated[int, Meta(ge=0, le=MAX_MS)]


class OpenAlert(msgspec.Struct, kw_only=True):
    rule: str
    priority: Literal["high", "medium", "low"]
    metric: str | None
    opened_at: int
    value: float | None


class Latest(msgspec.Struct, kw_only=True):
    t: int
    value: float
    flags: int


class DeviceStatus(msgspec.Struct, kw_only=True):
    """One bed tile of a central station: status, association, open alerts, latest numerics."""

    device_id: str
    profile: str | None
    status: Literal["active", "revoked", "unregistered"]
    last_seen: int | None  # latest numeric reading time
    stale: bool  # no reading for longer than the profile's `silent` after_s (30 s without one)
    patient_ref: str | None
    location: str | None
    open_alerts: list[OpenAlert]
    latest: dict[str, Latest]


class DevicesResponse(msgspec.Struct, kw_only=True):
    devices: list[DeviceStatus]
    next_cursor: str | None


class LatestReading(msgspec.Struct, kw_only=True):
    device_id: str
    metric: str
    t: int
    value: float
    flags: int


class LatestResponse(msgspec.Struct, kw_only=True):
    latest: list[LatestReading]


class Reading(msgspec.Struct, kw_only=True):
    device_id: str
    metric: str
    t: int
    value: float
    flags: int


class Bucket(msgspec.Struct, gc=False):
    """Positional, in the read's column order, and untracked by the garbage collector (no
    references to other objects): a 30-day answer in minutes builds 43,200 of them."""

    device_id: str
    metric: str
    t: int  # bucket start
    min: float
    max: float
    avg: float
    count: int


class ReadingsResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``readings`` without ``bucket``; ``buckets`` with it."""

    next_cursor: str | None
    readings: list[Reading] | None = None
    buckets: list[Bucket] | None = None


class Block(msgspec.Struct, kw_only=True):
    device_id: str
    metric: str
    t0: int
    hz: float
    samples: list[float]
    flags: int


class WaveformsResponse(msgspec.Struct, kw_only=True):
    blocks: list[Block]
    next_cursor: str | None


class AlertEpisode(msgspec.Struct, kw_only=True):
    id: int
    device_id: str
    rule: str
    priority: Literal["high", "medium", "low"]
    metric: str | None
    opened_at: int
    cleared_at: int | None
    value: float | None  # the reading that opened it


class AlertsResponse(msgspec.Struct, kw_only=True):
    alerts: list[AlertEpisode]
    next_cursor: str | None


class Association(msgspec.Struct, kw_only=True):
    id: int
    device_id: str
    patient_ref: str
    location: str | None
    started_at: int
    ended_at: int | None  # null while open


class AssociationsResponse(msgspec.Struct, kw_only=True):
    associations: list[Association]


class NewAssociation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/associations``: open an association (``at`` defaults to now)."""

    device_id: Annotated[str, Meta(pattern=DEVICE_ID_PATTERN)]
    patient_ref: Annotated[str, Meta(pattern=PATIENT_PATTERN)]
    location: Annotated[str, Meta(pattern=PATIENT_PATTERN)] | None = None
    at: EpochMs | None = None


class EndAssociation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/associations/{device_id}/end``: end the open association (``at`` defaults to now)."""

    at: EpochMs | None = None
