"""Repeated authentication failures from one address: a bounded number of audit rows per interval."""

from __future__ import annotations

import pytest

from gateway.model import AuditEvent
from gateway.sources.http.auth import AuditThrottle
from tests.harness import await_for

pytestmark = pytest.mark.asyncio


def failure(i: int, addr: str = "203.0.113.7", reason: str = "unknown or revoked device token") -> AuditEvent:
    return AuditEvent(at_ms=1_000 + i, actor="https:anonymous", action="auth.failure", target=None, outcome="denied",
                      source_addr=addr, correlation_id=f"req-{i}", detail={"reason": reason})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_first_failures_written_then_one_row_with_the_count_per_interval():
    rows: list[AuditEvent] = []
    clock = Clock()
    throttle = AuditThrottle(rows.append, interval_s=60.0, each=3, clock=clock)
    for i in range(1000):
        throttle.record(failure(i, reason="no credentials" if i % 2 else "unknown or revoked device token"))
    assert [r.correlation_id for r in rows] == ["req-0", "req-1", "req-2"]  # at once, unchanged
    clock.now = 61.0  # the next interval: its first failure closes the previous one
    throttle.record(failure(1000))
    assert len(rows) == 5
    summary = rows[3]
    assert summary.action == "auth.failure" and summary.source_addr == "203.0.113.7"
    assert summary.correlation_id == "req-999" and summary.at_ms == 1_999
    assert summary.detail == {"repeated": 997, "interval_s": 60.0, "first_at": 1_003, "last_at": 1_999,
                              "reasons": {"no credentials": 499, "unknown or revoked device token": 498}}
    assert rows[4].correlation_id == "req-1000"


async def test_the_summary_is_written_when_the_interval_ends_without_another_failure():
    rows: list[AuditEvent] = []
    throttle = AuditThrottle(rows.append, interval_s=0.2, each=1)
    for i in range(5):
        throttle.record(failure(i))
    assert len(rows) == 1
    await await_for(lambda: len(rows) == 2, timeout=5, message="the interval's summary row")
    assert rows[1].detail["repeated"] == 4  # type: ignore[index]
    assert len(throttle) == 0


async def test_addresses_are_counted_apart_and_memory_is_bounded():
    rows: list[AuditEvent] = []
    throttle = AuditThrottle(rows.append, interval_s=60.0, each=1, max_addresses=100)
    for i in range(10_000):
        addr = f"198.51.100.{i % 250}"
        throttle.record(failure(i, addr=addr))
        assert len(throttle) <= 100
    throttle.flush()
    # every failure is in a row, alone or counted in a summary
    assert sum(1 if r.detail is None or "repeated" not in r.detail else r.detail["repeated"] for r in rows) == 10_000
    assert len(throttle) == 0
