"""The tick of the silent-device checks, and the detection that the gateway itself is behind.

Every ``tick_s`` the alert rules' clock advances to the wall time, which opens ``silent``
episodes for devices that stopped sending. That tick waits while the gateway is behind: its
payload budget was full (``backed_up``), or the newest reading of a batch lagged the wall
clock by more than ``behind_lag_s``, within the last ``behind_hold_s``; or the source says
its view of the devices is incomplete (``held_back``: in cluster mode, a partition not read
up to now). ``scope`` may narrow a tick's events (cluster mode: to the devices of the
partitions this process holds, stamped with their epoch for the commit's fence).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from gateway.clock import Clock
from gateway.evaluate import Evaluator
from gateway.model import AlertEvent

__all__ = ["Ticker"]

log = logging.getLogger(__name__)


class Ticker:
    """When the next tick is due, and whether it runs or waits."""

    def __init__(self, evaluator: Evaluator, clock: Clock, *, tick_s: float, behind_lag_s: float,
                 behind_hold_s: float) -> None:
        self.evaluator = evaluator
        self.clock = clock
        self.tick_s = tick_s
        self.behind_lag_s = behind_lag_s
        self.behind_hold_s = behind_hold_s
        self.next_tick = clock.monotonic() + tick_s
        self.deferred = 0  # ticks that waited because the gateway was behind
        self.held_back: Callable[[], bool] = lambda: False
        self.scope: Callable[[list[AlertEvent]], list[AlertEvent]] = lambda events: events
        self._behind_until = 0.0  # monotonic time until which ticks wait
        self._deferring = False

    def scope_to(self, held_back: Callable[[], bool], scope: Callable[[list[AlertEvent]], list[AlertEvent]]) -> None:
        """Let the source hold the ticks back and narrow their events (cluster mode: ``gateway.sources.nats``)."""
        self.held_back, self.scope = held_back, scope

    @property
    def silent_after_s(self) -> float:
        """The longest ``after_s`` of the profiles' ``silent`` rules (0 without any)."""
        return max((r.after_s or 0.0 for p in self.evaluator.profiles.values() for r in p.alerts if r.when == "silent"),
                   default=0.0)

    def start(self) -> None:
        self.next_tick = self.clock.monotonic() + self.tick_s

    def due(self, *, backed_up: bool, held_bytes: int) -> list[AlertEvent]:
        """The tick's alert events when one is due and the gateway is not behind, else none."""
        now = self.clock.monotonic()
        if now < self.next_tick:
            return []
        self.next_tick = now + self.tick_s
        if backed_up or self.held_back():
            self._behind_until = now + self.behind_hold_s
        if now < self._behind_until:
            # While a backlog drains, the devices' messages wait at the broker: they are not
            # silent, the gateway is behind. Ticking now would open and close a ``silent``
            # episode per device and second. Once caught up the tick runs, and a device that
            # really went quiet opens with the same ``at`` (its latest reading + after_s).
            self.deferred += 1
            if not self._deferring:
                self._deferring = True
                log.warning("Intake is behind; silent-device checks wait until it has caught up.",
                            extra={"held_mib": held_bytes >> 20})
            return []
        if self._deferring:
            self._deferring = False
            log.info("Intake caught up; silent-device checks resume.")
        events = self.evaluator.tick(int(self.clock.wall() * 1000))
        return self.scope(events) if events else events

    def note_lag(self, num_t: np.ndarray, wav_t0: np.ndarray) -> None:
        """Remember that the gateway is behind when even the newest reading of a batch is old."""
        newest = max(int(num_t.max()) if len(num_t) else 0, int(wav_t0.max()) if len(wav_t0) else 0)
        if newest and self.clock.wall() * 1000 - newest > self.behind_lag_s * 1000:
            self._behind_until = self.clock.monotonic() + self.behind_hold_s
