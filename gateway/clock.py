"""Where the pipeline's time comes from: one injected ``Clock`` instead of ``time.*`` calls.

``monotonic()`` paces the writer (batch age, tick period, the "behind" hold); ``wall()`` is
the epoch time the silent-device tick and the commit latency are measured against. Tests
pass a clock they move by hand, so they drive time instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "SYSTEM_CLOCK"]


class Clock(Protocol):
    """Seconds: ``monotonic()`` for intervals, ``wall()`` since the epoch."""

    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The process clocks (``time.monotonic`` and ``time.time``)."""

    __slots__ = ()

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)


SYSTEM_CLOCK = SystemClock()
