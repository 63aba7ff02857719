"""Wire structs (what devices send) and the internal column batches the checks work on.

The wire structs mirror PROTOCOL section 1 and are decoded once, at the edge, by
``gateway.decode``. Everything after decoding works on numpy columns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Callable, Literal

import numpy as np
from msgspec import Meta, Struct

__all__ = [
    "DEVICE_ID_PATTERN",
    "SOURCE_NAME_PATTERN",
    "Flag",
    "FLAG_NAMES",
    "ARTIFACT_FLAGS",
    "Numeric",
    "Waveform",
    "Envelope",
    "RawMessage",
    "LOCAL",
    "Outcome",
    "NumericColumns",
    "WaveformColumns",
    "AlertEvent",
    "AuditEvent",
]

DEVICE_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

# Epoch milliseconds from 1970 to the end of year 9999: the range PostgreSQL and RFC 3339 share.
_MAX_MS = 253_402_300_799_999

EpochMs = Annotated[int, Meta(ge=0, le=_MAX_MS)]
Timestamp = EpochMs | Annotated[datetime, Meta(tz=True)]
DeviceId = Annotated[str, Meta(pattern=DEVICE_ID_PATTERN)]


class Flag(enum.IntFlag):
    """Quality flags stored in ``flags`` columns (PROTOCOL section 3).

    The one definition of the bits: SQL masks, metric labels, replay summaries and the
    PROTOCOL table are derived from it or tested against it. A new flag takes the next
    bit, so that ``FLAG_NAMES[i]`` is always bit ``1 << i``.
    """

    OUT_OF_RANGE = 1
    SPIKE = 2
    FLATLINE = 4
    GAP = 8
    CLOCK_FUTURE = 16
    CLOCK_STALE = 32
    OUT_OF_ORDER = 64
    NOT_FINITE = 128


FLAG_NAMES: tuple[str, ...] = tuple(f.name for f in Flag)  # type: ignore[misc]  # FLAG_NAMES[i] is bit 1 << i
# Readings carrying any of these are artifacts: they never feed physiological alert rules.
ARTIFACT_FLAGS = int(Flag.OUT_OF_RANGE | Flag.SPIKE | Flag.NOT_FINITE)


class Numeric(Struct, frozen=True, gc=False):
    """One timestamped set of numeric values: metric name -> number."""

    t: Timestamp
    values: dict[str, float]


class Waveform(Struct, frozen=True, gc=False):
    """One fixed-rate block of samples of one waveform metric; sample i is at t0 + i/hz.

    ``samples`` is an array of numbers (version 1) or, in the compact form of version 1.1,
    binary: little-endian float32 (``format = "f32le"``) or int16 (``"i16le"``, value =
    ``offset + scale * raw``). ``gateway.decode`` checks which fields go together.
    """

    metric: str
    t0: Timestamp
    hz: Annotated[float, Meta(gt=0)]
    samples: list[float] | bytes
    format: Literal["f32le", "i16le"] | None = None
    scale: float | None = None
    offset: float | None = None


class Envelope(Struct, frozen=True, gc=False):
    """The telemetry envelope, version 1. Unknown fields are ignored (forward compatible)."""

    v: int
    device_id: DeviceId
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    profile: str | None = None
    firmware: Annotated[str, Meta(max_length=128)] | None = None
    sent_at: Timestamp | None = None
    numerics: list[Numeric] = []
    waveforms: list[Waveform] = []


# The transport a payload came by: a name in ``gateway.sources.SOURCES`` ("mqtt"; "https" for
# the ``http`` section), or "replay". Stored in ``ingests.source``, which checks its form only,
# so that adding a source needs no migration.
Source = str
SOURCE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
LOCAL = {"local": True}  # dataclass field metadata: a field that stays in the process (see ``RawMessage``)


@dataclass(slots=True, frozen=True)
class Outcome:
    """What became of one payload, known once it is committed.

    ``stored``: new rows under ``ingest_id``; ``duplicate``: stored before (``ingest_id`` of
    the earlier copy when known); ``rejected``: quarantined with ``reason``.
    """

    status: Literal["stored", "duplicate", "rejected"]
    ingest_id: int | None = None
    reason: str | None = None


@dataclass(slots=True)
class RawMessage:
    """A payload as it arrived, before decoding.

    ``ack`` is called once the payload's outcome (rows or quarantine entry) is committed;
    a payload never acked stays with the transport, which redelivers it later.
    ``on_outcome``, when set, is called right after ``ack`` with the ``Outcome`` (the
    HTTPS source answers with it); sources that need only the ack leave it ``None``, which
    keeps the commit path free of per-payload bookkeeping.
    ``remote_addr`` is the peer's address where the transport knows it (audit trail).

    Every field is data that travels with the payload (``--workers`` forwards it to the
    worker owning its device) except those marked ``LOCAL``: the callables, which stay with
    the process that received the payload.
    """

    payload: bytes
    source: Source
    principal: str | None
    topic_or_path: str
    received_at_ms: int
    content_type: str | None = None
    topic_device_id: str | None = None
    ack: Callable[[], None] | None = field(default=None, metadata=LOCAL)
    on_outcome: Callable[[Outcome], None] | None = field(default=None, metadata=LOCAL)
    remote_addr: str | None = None


@dataclass(slots=True)
class NumericColumns:
    """Numeric readings of a batch, one entry per reading, in arrival order.

    ``device``, ``metric`` and ``profile`` are object arrays of ``str``; ``t`` and
    ``received_at`` are epoch milliseconds; ``env`` is the index of the envelope in the
    batch the reading came from.
    """

    device: np.ndarray
    metric: np.ndarray
    profile: np.ndarray
    t: np.ndarray
    value: np.ndarray
    received_at: np.ndarray
    env: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    @classmethod
    def empty(cls) -> NumericColumns:
        obj = np.empty(0, dtype=object)
        i64 = np.empty(0, dtype=np.int64)
        return cls(obj, obj, obj, i64, np.empty(0, dtype=np.float64), i64, np.empty(0, dtype=np.int32))


@dataclass(slots=True)
class WaveformColumns:
    """Waveform blocks of a batch, one entry per block, in arrival order.

    Samples of all blocks are concatenated in ``samples``; block ``i`` owns
    ``samples[offsets[i]:offsets[i + 1]]`` (``offsets`` has one more entry than blocks).
    """

    device: np.ndarray
    metric: np.ndarray
    profile: np.ndarray
    t0: np.ndarray
    hz: np.ndarray
    received_at: np.ndarray
    env: np.ndarray
    offsets: np.ndarray
    samples: np.ndarray

    def __len__(self) -> int:
        return len(self.t0)

    @classmethod
    def empty(cls) -> WaveformColumns:
        obj = np.empty(0, dtype=object)
        i64 = np.empty(0, dtype=np.int64)
        return cls(
            obj, obj, obj, i64, np.empty(0, dtype=np.float64), i64,
            np.empty(0, dtype=np.int32), np.zeros(1, dtype=np.int64), np.empty(0, dtype=np.float64),
        )


@dataclass(slots=True, frozen=True)
class AlertEvent:
    """An alert episode opening or closing (PROTOCOL sections 2 and 4).

    ``at`` is epoch milliseconds; ``env`` is the batch index of the envelope whose reading
    opened or closed it (``None`` for events raised by the clock, such as ``silent``).
    """

    event: Literal["open", "close"]
    device_id: str
    rule: str
    priority: str
    metric: str | None
    at: int
    value: float | None
    env: int | None = None
    profile: str | None = field(default=None, compare=False)


@dataclass(slots=True, frozen=True)
class AuditEvent:
    """One security decision or registry change, bound for the append-only ``audit_log``.

    ``at_ms`` is epoch milliseconds; ``actor`` who acted (``mqtt:po-1``, ``https:<token id>``,
    ``cli:<unix user>``); ``action`` what was decided (``device.revoked``, ``auth.failure``,
    ...); ``target`` what it was about (usually a device id); ``outcome`` ``denied`` or
    ``success``; ``correlation_id`` ties it to other records (the rejected payload's SHA-256
    in hex, a request id); ``detail`` is stored as JSON.
    """

    at_ms: int
    actor: str
    action: str
    target: str | None
    outcome: str
    source_addr: str | None = None
    correlation_id: str | None = None
    detail: dict[str, object] | None = None
