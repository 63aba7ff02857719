"""Backoff with full jitter, and the one classifier of retriable failures."""

from __future__ import annotations

import random

import asyncpg

__all__ = ["Backoff", "is_retriable"]


class Backoff:
    """Capped exponential backoff with full jitter: delay in [0, min(max_s, initial_s * 2**n)]."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.max_s, self.initial_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return self._rng.uniform(cap / 4, cap)

    def reset(self) -> None:
        self.attempt = 0


# SQLSTATE classes worth retrying: connection exceptions, insufficient resources,
# operator intervention (admin shutdown, crash shutdown, cannot connect now), plus
# serialization failure and deadlock.
_RETRIABLE_CLASSES = {"08", "53", "57", "58"}
_RETRIABLE_CODES = {"40001", "40P01", "55P03"}


def is_retriable(exc: BaseException) -> bool:
    """Whether the same database write may succeed later."""
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and isinstance(exc, ValueError):
        return False  # asyncpg could not encode an argument: the same data fails again
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, asyncpg.exceptions.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        if code == "57014":  # query_canceled: our own timeout, try again
            return True
        return code[:2] in _RETRIABLE_CLASSES or code in _RETRIABLE_CODES
    return False
