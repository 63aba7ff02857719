"""Vectorized building blocks for per-key sequential rules.

Readings are sorted by (key, arrival) with a stable argsort; each key is then a contiguous
group. What a per-reading loop would carry from one reading to the next is rebuilt from
whole-array operations: group boundaries, forward fill of the last marked index with
``np.maximum.accumulate``, segmented running maxima, and pointer doubling along
"next" links. None of them loops over readings in Python.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sort_groups", "stable_order", "group_first", "shift", "last_marked", "segmented_cummax", "mark_paths", "group_last"]

_I64 = np.int64


def sort_groups(keys: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Order that makes every key's readings contiguous, in arrival order, and group starts.

    Returns ``None`` for the order when every key occurs once: then each reading is its own
    group and arrival order already qualifies, so no sort (and no reordering) is needed.

    Args:
        keys: non-negative int64 keys (slots), in arrival order.
        scratch: an int64 array longer than the largest key, free to overwrite.
    """
    n = len(keys)
    position = np.arange(n, dtype=_I64)
    scratch[keys] = position  # with repeated keys the last write wins
    if np.array_equal(scratch[keys], position):
        return None, np.ones(n, dtype=bool)
    order = stable_order(keys)
    return order, group_first(keys[order])


def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative int64 keys, faster when they fit
    32 bits: numpy sorts 16-bit keys with a stable radix sort, so sort by the low 16 bits,
    then (stably) by the high 16 bits.
    """
    top = int(keys.max()) if len(keys) else 0
    if top >= 2**32:
        return np.argsort(keys, kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if top >= 2**16:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def group_first(sorted_keys: np.ndarray) -> np.ndarray:
    """True where a new group starts in a sorted key array."""
    first = np.empty(len(sorted_keys), dtype=bool)
    if len(sorted_keys):
        first[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return first


def group_last(first: np.ndarray) -> np.ndarray:
    """True at the last element of every group, given the group-start mask."""
    last = np.empty(len(first), dtype=bool)
    if len(first):
        last[-1] = True
        last[:-1] = first[1:]
    return last


def shift(a: np.ndarray, fill: object) -> np.ndarray:
    """``a`` moved one place later: ``out[0] = fill``, ``out[i] = a[i - 1]``."""
    out = np.empty_like(a)
    if len(a):
        out[0] = fill
        out[1:] = a[:-1]
    return out


def last_marked(mark: np.ndarray) -> np.ndarray:
    """For every i, the greatest j <= i with ``mark[j]``, or -1 (forward fill of an index)."""
    idx = np.where(mark, np.arange(len(mark), dtype=_I64), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


def segmented_cummax(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running maximum of int64 ``values`` that restarts at every group start."""
    n = len(values)
    if n == 0:
        return values.copy()
    gid = np.cumsum(first, dtype=_I64) - 1
    lo = int(values.min())
    span = int(values.max()) - lo + 1
    if span * (int(gid[-1]) + 1) < 2**62:
        # Lift every group above all earlier ones, so a plain running max cannot leak across.
        lift = gid * span
        return np.maximum.accumulate(values - lo + lift) - lift + lo
    # Values too spread for lifting: run the same trick on ranks, which span only n.
    order = np.argsort(values, kind="stable")
    rank = np.empty(n, dtype=_I64)
    rank[order] = np.arange(n, dtype=_I64)
    lift = gid * n
    return values[order][np.maximum.accumulate(rank + lift) - lift]


def mark_paths(jumps: list[np.ndarray], starts: np.ndarray, on: np.ndarray) -> None:
    """Set ``on`` for every node reachable from ``starts`` along next links, in O(log) rounds.

    ``jumps[0]`` is the next-link table over nodes ``0..N-1`` plus a sentinel ``N`` that
    links to itself (links only point forward). ``jumps[j]`` is the table of ``2**j`` steps;
    further tables are appended as needed and may be reused by later calls as long as the
    links of nodes after the new starts are unchanged.

    Path doubling: if ``seen`` holds steps ``0 .. 2**j - 1`` of every path, then applying
    the ``2**j``-step table to it gives steps ``2**j .. 2**(j+1) - 1``.
    """
    sentinel = len(on)
    seen = starts[starts != sentinel]
    on[seen] = True
    j = 0
    while len(seen):
        if j == len(jumps):
            jumps.append(jumps[j - 1][jumps[j - 1]])
        new = jumps[j][seen]
        new = new[new != sentinel]
        if not len(new):
            return
        on[new] = True
        seen = np.concatenate([seen, new])
        j += 1
