"""Sinks: where accepted envelopes, their readings, alerts and rejects are stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway.decode import Decoded
from gateway.model import AlertEvent, NumericColumns, RawMessage, WaveformColumns

__all__ = ["Rejected", "WriteBatch", "Sink"]


@dataclass(slots=True)
class Rejected:
    """A payload refused with a reason, bound for the quarantine table."""

    raw: RawMessage
    reason: str
    device_id: str | None


@dataclass(slots=True)
class WriteBatch:
    """What one transaction stores: new envelopes with their checked columns, rejects, alert events.

    ``items[i]`` and ``raws[i]`` describe envelope ``i``; ``num.env`` / ``wav.env`` index into them.
    """

    items: list[Decoded] = field(default_factory=list)
    raws: list[RawMessage] = field(default_factory=list)
    num: NumericColumns = field(default_factory=NumericColumns.empty)
    num_flags: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    wav: WaveformColumns = field(default_factory=WaveformColumns.empty)
    wav_flags: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    rejected: list[Rejected] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)
    # ingest ids of the envelopes alerts refer to, when they were stored by an earlier write
    alert_ingest_ids: list[int | None] | None = None


class Sink(Protocol):
    """Durable storage. ``write`` is all-or-nothing: one transaction per batch."""

    async def start(self) -> None:
        """Connect (and migrate); raise ``SinkError`` when storage cannot be reached."""

    async def known(self, keys: list[tuple[str, bytes]]) -> set[tuple[str, bytes]]:
        """The (device_id, payload_sha256) pairs among ``keys`` that are already stored."""

    async def write(self, batch: WriteBatch) -> list[int | None]:
        """Commit the batch; return the ingest id per envelope (``None``: stored before)."""

    async def close(self) -> None:
        """Close connections; returns once in-flight writes are finished or abandoned."""
