"""Backoff keeps the promise of its docstring; is_retriable sorts failures by SQLSTATE."""

from __future__ import annotations

import random

import asyncpg
import pytest

from gateway.retry import Backoff, is_retriable


class _Bounds(random.Random):
    """Records the interval each draw is taken from and answers one end of it."""

    def __init__(self, end: str) -> None:
        super().__init__(0)
        self.end = end
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a if self.end == "low" else b


def test_full_jitter_draws_from_zero_to_the_cap():
    rng = _Bounds("low")
    b = Backoff(0.1, 10.0, rng=rng)
    delays = [b.next_delay() for _ in range(4)]
    assert delays == [0.0, 0.0, 0.0, 0.0]  # full jitter: the window starts at 0
    assert rng.calls == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.4), (0.0, 0.8)]


def test_delays_grow_exponentially_then_stay_at_the_cap():
    b = Backoff(0.5, 3.0, rng=_Bounds("high"))
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    for _ in range(200):  # far past 2**30: no overflow, still capped
        assert b.next_delay() == 3.0


def test_cap_applies_when_the_initial_delay_exceeds_it():
    b = Backoff(20.0, 5.0, rng=_Bounds("high"))
    assert b.next_delay() == 5.0


def test_real_draws_stay_in_the_window_and_spread_over_it():
    b = Backoff(1.0, 1.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(2000)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    # With full jitter a quarter of the draws fall below cap/4 (none did with [cap/4, cap]).
    below = sum(d < 0.25 for d in delays) / len(delays)
    assert 0.2 < below < 0.3


def test_reset_starts_again_from_the_initial_delay():
    b = Backoff(0.1, 10.0, rng=_Bounds("high"))
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.attempt == 0
    assert b.next_delay() == 0.1


def _pg(sqlstate: str) -> asyncpg.PostgresError:
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)  # type: ignore[attr-defined]
    return cls("x")


@pytest.mark.parametrize(
    ("sqlstate", "retriable"),
    [
        ("08006", True),  # connection failure
        ("53300", True),  # too many connections
        ("57P01", True),  # admin shutdown
        ("57014", True),  # query canceled (our command timeout)
        ("58030", True),  # I/O error
        ("40001", True),  # serialization failure
        ("40P01", True),  # deadlock
        ("55P03", True),  # lock not available
        ("23505", False),  # unique violation: the same rows fail again
        ("22P02", False),  # invalid text representation
        ("42501", False),  # insufficient privilege
        ("25006", True),  # read-only transaction: a standby, or a primary being demoted (failover)
    ],
)
def test_sqlstate_classes(sqlstate: str, retriable: bool):
    assert is_retriable(_pg(sqlstate)) is retriable


def test_transport_failures_are_retriable_and_encoding_failures_are_not():
    assert is_retriable(ConnectionResetError())
    assert is_retriable(TimeoutError())
    assert is_retriable(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))
    # every host of a multi-host URL answered, none read-write: a failover under way
    assert is_retriable(asyncpg.exceptions.TargetServerAttributeNotMatched("no read-write host"))
    # a connection killed during a COPY, then asked to roll back
    assert is_retriable(asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"))
    assert not is_retriable(asyncpg.exceptions.DataError("invalid input for query argument $1"))
    assert not is_retriable(ValueError("not a database failure"))


def test_client_side_protocol_errors_are_retried():
    # what an idle pooled connection raises after it read the server's FATAL before its end of stream
    assert is_retriable(asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"))
    assert is_retriable(asyncpg.InterfaceError("connection is closed"))
    assert not is_retriable(asyncpg.DataError("invalid input for query argument $1"))  # the same data fails again
