"""``below`` / ``above`` rules with a ``for_s`` delay and a ``clear`` level, vectorized.

Per (device, rule), taking the readings that feed the rule in arrival order:

- a reading *meets* the rule when ``v < threshold`` (``v > threshold``);
- it *can open* when it meets it and ``t - run_start.t >= for_s``, ``run_start`` being the
  first reading of the current unbroken run of meeting readings;
- it *clears* when ``v >= clear`` (``v <= clear``).

Because ``clear`` lies on the far side of ``threshold``, no reading both meets and clears,
and a clearing reading always ends a run. So runs are just the maximal stretches of meeting
readings (plus the run carried in the state), independent of whether the alert is open, and
``run_start`` is a forward fill over them. The alert then alternates: closed, it opens at the
first reading that can open; open, it closes at the first that clears. Keep only readings
that can open ("O") or clear ("C"): an event happens exactly where the label differs from the
previous kept label (the first one compared with the carried open/closed state). That is one
comparison with a shifted array, not a loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.profiles import AlertRule

__all__ = ["ThresholdRules", "group_first", "last_marked"]

_I64 = np.int64


def group_first(sorted_keys: np.ndarray) -> np.ndarray:
    """True where a new group starts in a sorted key array."""
    first = np.ones(len(sorted_keys), dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return first


def last_marked(mark: np.ndarray) -> np.ndarray:
    """For every i, the greatest j <= i with ``mark[j]``, or -1 (forward fill of an index)."""
    idx = np.where(mark, np.arange(len(mark), dtype=_I64), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


@dataclass(frozen=True)
class Transitions:
    """Events found in a batch: positions into the pairs given to ``evaluate``."""

    pair: np.ndarray  # index into the evaluated pairs
    opens: np.ndarray  # True: open event, False: close event


class ThresholdRules:
    """State and evaluation of all threshold rules; slots are ``device_id * n_rules + rule``."""

    def __init__(self, rules: list[AlertRule | None]) -> None:
        """Args: rules: the global rule table; ``None`` marks rules of other kinds."""
        self.n_rules = max(len(rules), 1)
        th = [r if r is not None and r.when != "silent" else None for r in rules]
        self.below = np.array([r is not None and r.when == "below" for r in th], dtype=bool)
        self.threshold = np.array([r.threshold if r is not None else np.nan for r in th], dtype=np.float64)
        self.clear = np.array([r.clear if r is not None else np.nan for r in th], dtype=np.float64)
        self.for_ms = np.array([r.for_s * 1000.0 if r is not None else np.inf for r in th], dtype=np.float64)
        self.open = np.zeros(0, dtype=bool)
        self.run = np.zeros(0, dtype=bool)  # the last reading fed to the slot met the rule
        self.run_t = np.zeros(0, dtype=_I64)  # start of that run
        self.busy = np.zeros(0, dtype=bool)  # per device: some rule open or running

    def forget(self, device: np.ndarray) -> None:
        """Drop the state of ``device`` (ids below ``len(busy)``): as if never seen."""
        slots = (device[:, None] * self.n_rules + np.arange(self.n_rules)).ravel()
        self.open[slots] = False
        self.run[slots] = False
        self.run_t[slots] = 0
        self.busy[device] = False

    def reset_open(self, device: np.ndarray) -> None:
        """Mark every rule of ``device`` closed, keeping the runs (``busy`` follows them)."""
        slots = (device[:, None] * self.n_rules + np.arange(self.n_rules)).ravel()
        self.open[slots] = False
        self.busy[device] = self.run[slots].reshape(-1, self.n_rules).any(axis=1)

    def grow(self, n_devices: int) -> None:
        if n_devices <= len(self.busy):
            return
        cap = max(n_devices, 2 * len(self.busy), 64)
        for name, size in (("open", cap * self.n_rules), ("run", cap * self.n_rules), ("run_t", cap * self.n_rules), ("busy", cap)):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def evaluate(self, device: np.ndarray, rule: np.ndarray, t: np.ndarray, v: np.ndarray) -> Transitions:
        """Advance the rules over (reading, rule) pairs given in arrival order.

        Args:
            device, rule: device id and rule index of every pair.
            t, v: time and value of each pair's reading (artifacts already removed).
        """
        slot = device * self.n_rules + rule
        order = np.argsort(slot, kind="stable")
        s, r, ts, vs = slot[order], rule[order], t[order], v[order]
        first = group_first(s)
        below = self.below[r]
        thr, clr = self.threshold[r], self.clear[r]
        meets = np.where(below, vs < thr, vs > thr)
        clears = np.where(below, vs >= clr, vs <= clr)

        prev_meets = np.empty_like(meets)
        prev_meets[1:] = meets[:-1]
        prev_meets[first] = False
        run_start = meets & ~prev_meets
        base = np.where(first & self.run[s], self.run_t[s], ts)
        run_t = base[last_marked(run_start | first)]
        can_open = meets & ((ts - run_t) >= self.for_ms[r])

        kept = np.flatnonzero(can_open | clears)
        label = can_open[kept]
        ks = s[kept]
        kfirst = group_first(ks)
        before = np.empty_like(label)
        before[1:] = label[:-1]
        before[kfirst] = self.open[ks[kfirst]]
        change = label != before

        last = np.ones(len(s), dtype=bool)
        last[:-1] = first[1:]
        self.run[s[last]] = meets[last]
        self.run_t[s[last]] = run_t[last]
        klast = np.ones(len(ks), dtype=bool)
        klast[:-1] = kfirst[1:]
        self.open[ks[klast]] = label[klast]
        touched = np.unique(device)
        per_device = (self.open | self.run).reshape(-1, self.n_rules)
        self.busy[touched] = per_device[touched].any(axis=1)
        return Transitions(order[kept[change]], label[change])
