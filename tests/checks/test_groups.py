"""The grouping helpers against plain loops, including the rank fallback of segmented_cummax."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks.groups import group_first, last_marked, mark_paths, segmented_cummax, sort_groups, stable_order


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.integers(0, 50), st.integers(0, 2**62)), min_size=1, max_size=40),
    groups=st.lists(st.integers(0, 4), min_size=40, max_size=40),
)
def test_segmented_cummax_equals_a_loop(values: list[int], groups: list[int]) -> None:
    keys = np.array(sorted(groups[: len(values)]), dtype=np.int64)
    first = group_first(keys)
    got = segmented_cummax(np.array(values, dtype=np.int64), first)
    want, run = [], None
    for v, f in zip(values, first):
        run = v if f else max(run, v)  # type: ignore[type-var]
        want.append(run)
    assert got.tolist() == want


def test_sort_groups_keeps_arrival_order_inside_a_key_and_skips_distinct_keys() -> None:
    scratch = np.zeros(10, dtype=np.int64)
    order, first = sort_groups(np.array([3, 1, 3, 2, 1], dtype=np.int64), scratch)
    assert order is not None and order.tolist() == [1, 4, 3, 0, 2] and first.tolist() == [True, False, True, True, False]
    order, first = sort_groups(np.array([5, 2, 7], dtype=np.int64), scratch)
    assert order is None and first.all()


def test_last_marked() -> None:
    assert last_marked(np.array([False, True, False, False, True, False])).tolist() == [-1, 1, 1, 1, 4, 4]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 60))
def test_mark_paths_marks_exactly_the_chains(data: st.DataObject, n: int) -> None:
    link = np.array([data.draw(st.integers(i + 1, n)) for i in range(n)] + [n], dtype=np.int64)  # forward links, n = end
    starts = np.array(sorted(set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3)))), dtype=np.int64)
    on = np.zeros(n, dtype=bool)
    mark_paths([link], starts, on)
    want = set()
    for s in starts.tolist():
        while s != n:
            want.add(s)
            s = int(link[s])
    assert set(np.flatnonzero(on).tolist()) == want


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.one_of(st.integers(0, 70), st.integers(0, 2**17), st.integers(0, 2**40)), max_size=60))
def test_stable_order_equals_a_stable_argsort(keys: list[int]) -> None:
    a = np.array(keys, dtype=np.int64)
    assert stable_order(a).tolist() == np.argsort(a, kind="stable").tolist()
