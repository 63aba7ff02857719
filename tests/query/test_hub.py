"""The live hub without a database: numbering, watching, replay after (seq, k), gaps, slow subscribers."""

from __future__ import annotations

import numpy as np
import orjson

from gateway.model import NumericColumns
from gateway.query.cursor import decode_cursor, encode_cursor, page
from gateway.query.hub import Hub
from gateway.sinks import WriteBatch


class _Env:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id


class _Item:
    def __init__(self, device_id: str) -> None:
        self.envelope = _Env(device_id)


def batch(*devices: str, t: int = 1000) -> WriteBatch:
    """One envelope per device, two readings each."""
    n = len(devices)
    dev = np.repeat(np.array(devices, dtype=object), 2)
    num = NumericColumns(dev, np.tile(np.array(["spo2", "pulse_rate"], dtype=object), n),
                         np.full(2 * n, "pulse_oximeter", dtype=object), np.full(2 * n, t, dtype=np.int64),
                         np.arange(2 * n, dtype=np.float64), np.full(2 * n, t, dtype=np.int64),
                         np.repeat(np.arange(n, dtype=np.int32), 2))
    return WriteBatch(items=[_Item(d) for d in devices], num=num, num_flags=np.zeros(2 * n, dtype=np.int32))


def test_only_watched_devices_become_events_and_resume_skips_what_was_delivered():
    hub = Hub()
    got: list = []
    feed, start = hub.add_feed(("device", "a"), lambda s, ev: got.append((s, ev)) or True, None)
    hub.on_commit(batch("a", "b", "c", t=1), [1, 2, 3])
    hub.on_commit(batch("b", t=2), [4])  # nothing for "a"
    hub.on_commit(batch("a", "a", t=3), [5, 6])
    assert [s for s, _ in got] == [start + 1, start + 3]
    assert [orjson.loads(ev[0][1])["readings"][0]["t"] for _, ev in got] == [1, 3]
    hub.remove_feed(feed)
    hub.on_commit(batch("a", t=4), [7])
    again: list = []
    hub.add_feed(("device", "a"), lambda s, ev: again.append((s, ev)) or True, (start + 3, 0))
    assert [orjson.loads(ev[0][1])["readings"][0]["t"] for _, ev in again] == [4]
    # a duplicate stored by another writer (id None) is not an event
    hub.on_commit(batch("a", t=5), [None])
    assert len(again) == 1


def test_a_position_older_than_the_window_is_a_gap_and_a_refusing_subscriber_is_dropped():
    hub = Hub(max_bytes=1)  # keeps nothing
    hub.on_commit(batch("a"), [1])
    got: list = []
    hub.add_feed(("device", "a"), lambda s, ev: got.append(ev) or True, (hub.seq - 1, 0))
    assert got == [None]
    calls: list = []
    hub.add_feed(("device", "a"), lambda s, ev: calls.append(s) and False, None)
    hub.on_commit(batch("a"), [2])
    hub.on_commit(batch("a"), [3])
    assert len(calls) == 1 and hub.feeds == 1


def test_cursor_round_trip_and_page_cut_with_repeated_keys():
    rows = [(1, "a"), (1, "a"), (1, "a"), (2, "a")]
    p = page(rows[:3], None, 0, 2, lambda r: list(r))
    assert p.rows == rows[:2] and p.next_key == [1, "a"] and p.skip == 2
    key, skip = decode_cursor("readings", encode_cursor("readings", p.next_key, p.skip), (int, str))
    nxt = page(rows, key, skip, 2, lambda r: list(r))
    assert nxt.rows == rows[2:] and nxt.next_key is None
