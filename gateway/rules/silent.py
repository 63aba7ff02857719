"""``silent`` technical alerts: no reading of any metric for ``after_s``.

A device's silent rules are armed by its first reading under a profile that has them. Every
reading of the device (numeric or waveform, whatever its flags) refreshes the device's
latest reading time, the greatest ``t`` seen, and closes its open silent alerts. The clock
(``tick``) opens an armed rule once it has passed ``latest + after_s``; the event's ``at`` is
that deadline, so it does not depend on when the clock happened to look.

State is dense: one row per device id, one column per silent rule of the engine.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SilentRules"]

_MIN = np.iinfo(np.int64).min


class SilentRules:
    """Per (device, silent rule) armed/open flags and per-device latest reading time."""

    def __init__(self, after_ms: list[int]) -> None:
        """Args: after_ms: ``round(after_s * 1000)`` of every silent rule, by column."""
        self.after_ms = np.array(after_ms, dtype=np.int64)
        n = len(after_ms)
        self.armed = np.zeros((0, n), dtype=bool)
        self.open = np.zeros((0, n), dtype=bool)
        self.latest = np.zeros(0, dtype=np.int64)
        self.n_open = 0

    def forget(self, device: np.ndarray) -> None:
        """Drop the state of ``device`` (ids below ``len(latest)``): as if never seen."""
        self.n_open -= int(self.open[device].sum())
        self.armed[device] = False
        self.open[device] = False
        self.latest[device] = _MIN

    def grow(self, n_devices: int) -> None:
        if n_devices <= len(self.latest):
            return
        cap = max(n_devices, 2 * len(self.latest), 64)
        for name, fill in (("armed", False), ("open", False)):
            old = getattr(self, name)
            new = np.full((cap, old.shape[1]), fill, dtype=bool)
            new[: len(old)] = old
            setattr(self, name, new)
        latest = np.full(cap, _MIN, dtype=np.int64)
        latest[: len(self.latest)] = self.latest
        self.latest = latest

    def arm(self, device: np.ndarray, columns: np.ndarray) -> None:
        """Arm ``columns`` (a bool mask over silent rules) for each of ``device`` (may repeat)."""
        np.logical_or.at(self.armed, device, columns)

    def refresh(self, device: np.ndarray, t: np.ndarray) -> None:
        """Readings at ``t`` from ``device``: the latest time becomes the greatest seen."""
        np.maximum.at(self.latest, device, t)

    def open_devices(self) -> np.ndarray:
        """Ids of devices with at least one open silent alert."""
        if self.n_open == 0:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(self.open.any(axis=1))

    def close(self, device: int) -> np.ndarray:
        """Close every open silent alert of ``device``; returns the closed columns."""
        cols = np.flatnonzero(self.open[device])
        self.open[device, cols] = False
        self.n_open -= len(cols)
        return cols

    def due(self, now_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open the armed rules whose deadline ``now_ms`` has passed.

        Returns (device ids, columns, deadlines) of the alerts just opened.
        """
        if not self.armed.size:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, empty
        deadline = self.latest[:, None] + self.after_ms[None, :]
        fire = self.armed & ~self.open & (now_ms > deadline)
        dev, col = np.nonzero(fire)
        self.open[dev, col] = True
        self.n_open += len(dev)
        return dev, col, deadline[dev, col]

    def next_deadline(self) -> int | None:
        """The earliest deadline of an armed rule that is not open, or None."""
        waiting = self.armed & ~self.open
        if not waiting.any():
            return None
        deadline = self.latest[:, None] + self.after_ms[None, :]
        return int(deadline[waiting].min())
