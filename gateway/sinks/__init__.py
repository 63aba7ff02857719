"""Sinks: where accepted envelopes, their readings, alerts and rejects are stored.

``Sink`` is the write side; ``StateStore`` the reads the pipeline needs back (dedupe against
what is stored, state restore after a restart). ``TimescaleSink`` is both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gateway.decode import Decoded
from gateway.model import AlertEvent, AuditEvent, NumericColumns, RawMessage, WaveformColumns

__all__ = ["Rejected", "WriteBatch", "OpenEpisode", "History", "Sink", "StateStore"]


@dataclass(slots=True)
class Rejected:
    """A payload refused with a reason, bound for the quarantine table."""

    raw: RawMessage
    reason: str
    device_id: str | None


@dataclass(slots=True)
class WriteBatch:
    """What one transaction stores: new envelopes with their checked columns, rejects, alert
    events and audit events (a batch may hold audit events only).

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
    audit: list[AuditEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OpenEpisode:
    """An alert episode stored as still active (``cleared_at IS NULL``)."""

    device_id: str
    rule: str
    metric: str | None
    priority: str
    opened_at: int  # epoch ms
    trigger_value: float | None


@dataclass(slots=True)
class History:
    """What storage knows about some devices, to restore the in-memory state after a restart.

    Times are epoch ms. ``numeric``: per (device, metric) the latest reading whatever its
    flags, ``(device, metric, t, value)``; ``numeric_ref``: the latest one without
    OUT_OF_RANGE, SPIKE or NOT_FINITE; ``waveform``: per (device, metric) the latest block,
    ``(device, metric, t0, duration_ms)``; ``latest``: per device the latest reading time of
    any kind; ``open_alerts``: the episodes still active; ``recent``: the readings without
    OUT_OF_RANGE, SPIKE or NOT_FINITE of each numeric pair within ``runs_ms`` of its latest
    reading, ``(device, metric, t, value)`` in the order they were stored (the threshold
    rules' runs in progress are rebuilt from them).
    """

    numeric: list[tuple[str, str, int, float]] = field(default_factory=list)
    numeric_ref: list[tuple[str, str, int, float]] = field(default_factory=list)
    waveform: list[tuple[str, str, int, float]] = field(default_factory=list)
    latest: dict[str, int] = field(default_factory=dict)
    open_alerts: list[OpenEpisode] = field(default_factory=list)
    recent: list[tuple[str, str, int, float]] = field(default_factory=list)


class Sink(Protocol):
    """The write side of durable storage. ``write`` is all-or-nothing: one transaction per batch."""

    async def start(self) -> None:
        """Connect (and migrate); raise ``SinkError`` when storage cannot be reached."""

    async def write(self, batch: WriteBatch) -> list[int | None]:
        """Commit the batch; return the ingest id per envelope (``None``: stored before)."""

    async def close(self) -> None:
        """Close connections; returns once in-flight writes are finished or abandoned."""


class StateStore(Protocol):
    """What the pipeline reads back from storage: which envelopes are stored (dedupe) and the
    state to restore after a restart. A sink that keeps no such state pairs with another store."""

    async def known(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], int]:
        """The (device_id, payload_sha256) pairs among ``keys`` that are already stored, with their ingest ids."""

    async def history(
        self, devices: list[str], numeric: Sequence[tuple[str, str]] = (), waveform: Sequence[tuple[str, str]] = (),
        *, runs_ms: int = 0,
    ) -> History:
        """What is stored about ``devices`` (see ``History``): their open alert episodes, the
        latest rows of the (device, metric) pairs ``numeric`` and ``waveform``, and with
        ``runs_ms`` the recent readings of the ``numeric`` pairs."""

    async def recent(self, horizon_s: float) -> dict[str, tuple[str, int]]:
        """Per device with a stored reading newer than ``horizon_s`` seconds: the profile of
        its latest stored envelope and its latest reading time (epoch ms)."""
