"""The commit fence of cluster mode on alerts the clock raised (``gateway.cluster.fence``).

The fence's one query is answered by a stand-in connection returning ``partition_owners``
rows: what is tested is which alerts the fence keeps for a given owner table, not SQL.
"""

from __future__ import annotations

import asyncio

from gateway.cluster.fence import Fence
from gateway.model import AlertEvent
from gateway.sinks import WriteBatch

ME = "gw-a/1"
PARTITION_OF = {"d1": "vg-n8-p1", "d2": "vg-n8-p2"}


class Rows:
    """``conn.fetch`` answering with the owner table ``owners`` (consumer -> (owner, epoch))."""

    def __init__(self, owners: dict[str, tuple[str, int]]) -> None:
        self.owners = owners

    async def fetch(self, _sql: str, consumers: list[str]) -> list[dict[str, object]]:
        return [{"consumer": c, "owner": self.owners[c][0], "epoch": self.owners[c][1]} for c in consumers
                if c in self.owners]


def silent(device: str, at: int = 1000) -> AlertEvent:
    return AlertEvent("open", device, "probe_silent", "medium", None, at, None, None, "pulse_oximeter")


def fence(held: dict[str, int], stale: list[set[str]], deposed: list[set[str]]) -> Fence:
    return Fence("postgresql://unused", ME, consumer_of_device=PARTITION_OF.get, held_epoch=held.get,
                 deposed=deposed.append, stale=stale.append)


def commit(f: Fence, owners: dict[str, tuple[str, int]], alerts: list[AlertEvent]) -> list[AlertEvent]:
    wb = WriteBatch(alerts=list(alerts))
    asyncio.run(f(Rows(owners), wb))  # type: ignore[arg-type]
    return wb.alerts


def test_a_clock_alert_commits_under_the_epoch_it_was_raised_in() -> None:
    stale: list[set[str]] = []
    deposed: list[set[str]] = []
    f = fence({"vg-n8-p1": 4}, stale, deposed)
    ev = silent("d1")
    f.stamp(ev, "vg-n8-p1", 4)
    assert commit(f, {"vg-n8-p1": (ME, 4)}, [ev]) == [ev]
    assert stale == [] and deposed == []


def test_a_clock_alert_raised_before_the_partition_was_lost_and_taken_back_is_left_out() -> None:
    stale: list[set[str]] = []
    deposed: list[set[str]] = []
    f = fence({"vg-n8-p1": 6}, stale, deposed)  # lost at epoch 5, taken back: 6
    ev = silent("d1")
    f.stamp(ev, "vg-n8-p1", 4)
    assert commit(f, {"vg-n8-p1": (ME, 6)}, [ev]) == []
    assert stale == [{"d1"}]  # the engine counts it open: its state is dropped
    assert deposed == []  # the partition itself is ours


def test_a_clock_alert_of_a_partition_now_owned_elsewhere_is_left_out_and_deposes() -> None:
    stale: list[set[str]] = []
    deposed: list[set[str]] = []
    f = fence({"vg-n8-p1": 4}, stale, deposed)
    ev = silent("d1")
    f.stamp(ev, "vg-n8-p1", 4)
    assert commit(f, {"vg-n8-p1": ("gw-b/2", 5)}, [ev]) == []
    assert deposed == [{"vg-n8-p1"}]


def test_an_unstamped_clock_alert_of_a_partitioned_device_is_left_out_one_of_no_partition_kept() -> None:
    stale: list[set[str]] = []
    f = fence({"vg-n8-p1": 4}, stale, [])
    https_only = silent("h9")  # posted over HTTPS: no partition
    assert commit(f, {"vg-n8-p1": (ME, 4)}, [silent("d1"), https_only]) == [https_only]
    assert stale == [{"d1"}]
