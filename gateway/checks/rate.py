"""SPIKE: ``|v - ref.v| / (t - ref.t) > max_rate``, vectorized despite its feedback loop.

``ref`` is the latest earlier reading without OUT_OF_RANGE, SPIKE or NOT_FINITE, so whether
a reading is a SPIKE depends on earlier SPIKE flags. The loop is broken like this.

Only readings that are neither OUT_OF_RANGE nor NOT_FINITE ("candidates") can ever become
``ref``. Call candidate ``m`` *compatible* with ``k`` when it is not a SPIKE measured
against ``k``. If ``k`` is the current ``ref``, every candidate after it is a SPIKE until
the first compatible one, ``next(k)``, which becomes the new ``ref``. So the candidates
that become ``ref`` are exactly the chain ``s, next(s), next(next(s)), ...`` from the
group's start ``s`` (the carried ``ref``, or the first candidate when there is none), and
every other candidate is a SPIKE.

0. Each candidate is first compared with the one before it (or the carried ``ref``). In a
   group where all of these pairs are compatible, ``next(k)`` is simply the following
   candidate: the chain is every candidate and nothing below is needed. Only groups with
   an incompatible pair go on.
1. ``next`` is found for all their candidates within ``WINDOW`` positions with one
   (candidates x WINDOW) comparison, then within ``WIDE`` for those still open.
2. The chain is marked with pointer doubling (``groups.mark_paths``): O(log length) rounds.
3. A chain can only stop early at a candidate whose ``next`` lies beyond ``WIDE`` (more
   than ``WIDE`` SPIKEs in a row). Only those candidates - at most one per group per
   round - are searched further, in doubling windows, and marking resumes from their
   ``next``. Rounds are bounded by the number of such long SPIKE runs in one group, not by
   the number of readings; only streams that are nearly all SPIKEs come close to that.

Finally the readings that are not candidates are compared against the last chain member
before them, with the exact expression above.
"""

from __future__ import annotations

import numpy as np

from gateway.checks.groups import group_first, last_marked, mark_paths, shift

__all__ = ["spikes", "compatible", "WINDOW", "WIDE"]

WINDOW = 4  # first search window, for every candidate
WIDE = 32  # second one, for the candidates still without a link
_I64 = np.int64


def compatible(kt: np.ndarray, kv: np.ndarray, mt: np.ndarray, mv: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Not a SPIKE: reading (mt, mv) measured against reference (kt, kv); ``mt > kt``.

    Callers may pass padding pairs outside a group (masked afterwards), hence the errstate.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        return ~(np.abs(mv - kv) / ((mt - kt) / 1000.0) > rate)


class _Nodes:
    """Candidates of all groups, each group preceded by its carried ``ref`` when it has one."""

    def __init__(self, t, v, rate, gid, pos) -> None:  # type: ignore[no-untyped-def]
        self.t, self.v, self.rate, self.gid, self.pos = t, v, rate, gid, pos
        self.n = len(t)

    def links_from(self, k: np.ndarray, off: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Search ``k + off .. k + off + width - 1`` for the first compatible node.

        Returns (found, none, where): ``found`` rows have their link in ``where``; ``none``
        rows reached the end of their group without one; the others need a wider search.
        """
        cand = k[:, None] + off[:, None] + np.arange(width, dtype=_I64)[None, :]
        inside = cand < self.n
        c = np.minimum(cand, self.n - 1)
        valid = inside & (self.gid[c] == self.gid[k][:, None])
        ok = valid & compatible(self.t[k][:, None], self.v[k][:, None], self.t[c], self.v[c], self.rate[c])
        found = ok.any(axis=1)
        where = cand[np.arange(len(k)), np.argmax(ok, axis=1)]
        none = ~found & ~valid.all(axis=1)
        return found, none, where


def spikes(
    t: np.ndarray, v: np.ndarray, rate: np.ndarray, first: np.ndarray, candidate: np.ndarray,
    has_ref: np.ndarray, ref_t: np.ndarray, ref_v: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """SPIKE mask and, per reading, the index of the latest ``ref`` at or before it.

    Args:
        t, v: readings that are not OUT_OF_ORDER, sorted by (key, arrival); ``t`` increases
            strictly inside a group.
        rate: ``max_rate`` per reading (``inf`` when the metric has none).
        first: group-start mask.
        candidate: neither OUT_OF_RANGE nor NOT_FINITE.
        has_ref, ref_t, ref_v: the ``ref`` carried in the state for each reading's key.

    Returns:
        ``spike`` (bool per reading) and ``ref_at`` (int per reading: index of the last
        reading at or before it, in its group, that became ``ref``; -1 when none did, in
        which case the carried ``ref`` still holds).
    """
    # Each candidate against the node before it (previous candidate, else the carried ref).
    # In a group where all of these are compatible, the chain is every candidate (next(k) is
    # k + 1 throughout): only groups with an incompatible pair need the chain machinery.
    if candidate.all():
        cpos, cfirst = None, first
        ct, cv, crate, c_has, c_rt, c_rv = t, v, rate, has_ref, ref_t, ref_v
    else:
        cpos = np.flatnonzero(candidate)
        cfirst = group_first((np.cumsum(first, dtype=_I64) - 1)[cpos])
        ct, cv, crate, c_has, c_rt, c_rv = t[cpos], v[cpos], rate[cpos], has_ref[cpos], ref_t[cpos], ref_v[cpos]
    before_t = np.where(cfirst, c_rt, shift(ct, 0))
    before_v = np.where(cfirst, c_rv, shift(cv, 0.0))
    broken = (~cfirst | c_has) & ~compatible(before_t, before_v, ct, cv, crate)
    became_ref = candidate.copy()
    if broken.any():
        gid = np.cumsum(first, dtype=_I64) - 1
        cand_pos = np.arange(len(t), dtype=_I64) if cpos is None else cpos
        cg = gid[cand_pos]
        hard_group = np.zeros(int(gid[-1]) + 1, dtype=bool)
        hard_group[cg[broken]] = True
        hard = cand_pos[hard_group[cg]]
        became_ref[hard] = False
        became_ref[_chain_of(t, v, rate, first, gid, hard, hard_group, has_ref, ref_t, ref_v)] = True
    ref_at = last_marked(became_ref)
    ref_at[ref_at < last_marked(first)] = -1
    # A candidate is a SPIKE exactly when it is not on the chain; any other reading is
    # measured against the last ref before it.
    spike = candidate & ~became_ref
    if cpos is not None:
        other = np.flatnonzero(~candidate)
        before = np.where(first[other], -1, ref_at[other - 1])
        own = before >= 0
        rt = np.where(own, t[before], ref_t[other])
        rv = np.where(own, v[before], ref_v[other])
        spike[other] = (own | has_ref[other]) & ~compatible(rt, rv, t[other], v[other], rate[other])
    return spike, ref_at


def _chain_of(
    t: np.ndarray, v: np.ndarray, rate: np.ndarray, first: np.ndarray, gid: np.ndarray, cpos: np.ndarray,
    in_group: np.ndarray, has_ref: np.ndarray, ref_t: np.ndarray, ref_v: np.ndarray,
) -> np.ndarray:
    """Positions of the candidates ``cpos`` (of the groups ``in_group``) that become ``ref``."""
    starts = np.flatnonzero(first & has_ref & in_group[gid])
    # Interleave: the carried ref of a group goes right before the group's first candidate.
    size = len(cpos) + len(starts)
    virtual = np.searchsorted(cpos, starts) + np.arange(len(starts), dtype=_I64)
    real = np.ones(size, dtype=bool)
    real[virtual] = False

    def nodes_of(from_candidates: np.ndarray, from_state: np.ndarray | float) -> np.ndarray:
        out = np.empty(size, dtype=from_candidates.dtype)
        out[real] = from_candidates
        out[virtual] = from_state
        return out

    nodes = _Nodes(
        nodes_of(t[cpos], ref_t[starts]),
        nodes_of(v[cpos], ref_v[starts]),
        nodes_of(rate[cpos], np.inf),
        nodes_of(gid[cpos], gid[starts]),
        nodes_of(cpos, -1),
    )
    on = _chain(nodes)
    return nodes.pos[on & (nodes.pos >= 0)]


def _chain(nodes: _Nodes) -> np.ndarray:
    """Mask of the nodes on each group's chain ``s, next(s), ...``."""
    n = nodes.n
    link = np.full(n + 1, n, dtype=_I64)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # Links within WINDOW for every node, then within WIDE for the few still open.
    open_ = np.arange(n, dtype=_I64)
    for off, width in ((1, WINDOW), (WINDOW + 1, WIDE - WINDOW)):
        found, none, where = nodes.links_from(open_, np.full(len(open_), off, dtype=_I64), width)
        link[open_[found]] = where[found]
        open_ = open_[~found & ~none]
        if not len(open_):
            break
    unresolved = np.zeros(n, dtype=bool)
    unresolved[open_] = True
    on = np.zeros(n, dtype=bool)
    jumps = [link]
    starts = np.flatnonzero(group_first(nodes.gid))
    while True:
        mark_paths(jumps, starts, on)
        stuck = np.flatnonzero(on & unresolved)
        if not len(stuck):
            return on
        starts = _extend(nodes, stuck, link)
        unresolved[stuck] = False


def _extend(nodes: _Nodes, stuck: np.ndarray, link: np.ndarray) -> np.ndarray:
    """Resolve ``next`` of chain ends beyond the first window; returns the new chain starts."""
    found_at: list[np.ndarray] = []
    off = np.full(len(stuck), WIDE + 1, dtype=_I64)
    width = WIDE
    k = stuck
    while len(k):
        found, none, where = nodes.links_from(k, off, width)
        link[k[found]] = where[found]
        found_at.append(where[found])
        more = ~found & ~none
        k, off = k[more], off[more] + width
        width *= 2
    return np.concatenate(found_at) if found_at else np.empty(0, dtype=_I64)
