"""Backoff with full jitter, and the one classifier of retriable failures."""

from __future__ import annotations

import asyncio
import random

import asyncpg

__all__ = ["Backoff", "DATABASE_ERRORS", "WRONG_SERVER_CODES", "is_retriable"]

# What a database call may raise; ``is_retriable`` tells which of them are worth a retry.
# asyncpg derives InternalClientError from neither of the others. It says nothing about the
# data: the connection is unusable. Seen when every host of a multi-host URL answered and none
# is read-write (TargetServerAttributeNotMatched, a failover under way); when a connection
# killed in the middle of a COPY is asked to roll back; and when the server's FATAL
# "terminating connection" reached an idle pooled connection before its end-of-stream did, so
# the pool lent out a connection already gone ("cannot switch to state 12; another operation
# (2) is in progress").
DATABASE_ERRORS = (
    OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError,
    asyncpg.exceptions.InternalClientError,
)


class Backoff:
    """Capped exponential backoff with full jitter.

    Delay ``n`` (counting from 0) is drawn uniformly from ``[0, min(max_s, initial_s * 2**n)]``:
    full jitter spreads the retries of many clients that failed together over the whole
    window instead of bunching them at its end. No delay ever exceeds ``max_s``.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def cap(self) -> float:
        """The upper bound of the next delay."""
        # 2**30 keeps the product finite; max_s caps long before that for any sane initial_s.
        return min(self.max_s, self.initial_s * (2 ** min(self.attempt, 30)))

    def next_delay(self) -> float:
        cap = self.cap()
        self.attempt += 1
        return self._rng.uniform(0.0, cap)

    def reset(self) -> None:
        self.attempt = 0


# SQLSTATE classes worth retrying: 08 connection exception, 53 insufficient resources,
# 57 operator intervention (admin shutdown, crash shutdown, cannot connect now, and 57014
# query canceled, which is our own command timeout), 58 system error (I/O error); plus the
# codes 40001 serialization failure, 40P01 deadlock, 55P03 lock not available, and
# 25006 read-only transaction: the connection reached a server that is (still or again)
# a standby or was set read-only; once the sink has dropped that connection, the next
# one goes to whichever host is read-write now (a multi-host URL with
# target_session_attrs=read-write), so it is a failover in progress, not a fault of data.
_RETRIABLE_CLASSES = {"08", "53", "57", "58"}
_RETRIABLE_CODES = {"40001", "40P01", "55P03", "25006"}
# Codes after which the connection that raised them must not be reused.
WRONG_SERVER_CODES = frozenset({"25006"})


def is_retriable(exc: BaseException) -> bool:
    """Whether the same database write may succeed later."""
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and isinstance(exc, ValueError):
        return False  # asyncpg could not encode an argument: the same data fails again
    if isinstance(exc, (OSError, TimeoutError, ConnectionError, asyncpg.exceptions.InterfaceError)):
        return True
    if isinstance(exc, (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InternalClientError)):
        return True  # the connection is unusable, not the data: a new one may take the same write
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return code[:2] in _RETRIABLE_CLASSES or code in _RETRIABLE_CODES
    return False
