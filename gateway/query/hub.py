"""Committed data as live events: the fan-out of one worker process, with a replay window.

The pipeline calls ``Hub.on_commit(batch, ids)`` after every commit, in commit order
(``Pipeline.add_commit_listener``). The hub numbers commits (``seq``) and keeps the last
ones (at most ``window_s`` seconds and ``max_bytes`` of columns: references to the
batch's own numpy arrays, no copy) so a client that reconnects with ``Last-Event-ID``
gets what it missed. Only devices someone watches are turned into events: a dict lookup
per envelope decides, so with no watcher a commit costs one append.

A *feed* is one subscriber's interest at this hub: a filter (device, patient or location
prefix, resolved to devices through the open associations, refreshed every
``refresh_s`` and when a feed is added) and a ``deliver(seq, events)`` callable that
must not block; it returns False when its subscriber is gone (a slow client whose buffer
overflowed), and the feed is dropped. ``deliver(seq, None)`` reports a gap: commits the
subscriber asked for have left the window.

Commit numbers start at the wall-clock start time in microseconds, so they grow across
restarts: a ``Last-Event-ID`` of an earlier process is older than the window, never
mistaken for a recent one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import numpy as np
import orjson

from gateway.model import AlertEvent

__all__ = ["Hub", "Feed", "Event", "Filter"]

log = logging.getLogger(__name__)

Event = tuple[str, bytes]  # (event name, JSON data)
Filter = tuple[str, str]  # ("device" | "patient" | "location", value)
Deliver = Callable[[int, "list[Event] | None"], bool]

_OPEN = """
SELECT device_id, patient_ref, location FROM associations WHERE tstzrange(started_at, ended_at, '[)') @> now()
"""


@dataclass(slots=True)
class _Commit:
    seq: int
    at: float
    devices: list[str]  # per envelope of the batch
    num: tuple[np.ndarray, ...]  # env, metric, t, value, flags (rows of new envelopes only)
    wav: tuple[np.ndarray, ...]  # env, metric, t0, hz, flags, offsets, samples
    alerts: list[AlertEvent]
    nbytes: int


@dataclass(eq=False)
class Feed:
    filter: Filter
    deliver: Deliver
    devices: set[str] = field(default_factory=set)
    skip: tuple[int, int] | None = None  # (seq, k): the first k events of commit seq were delivered


def _rows(env: np.ndarray, n_env: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouped by envelope, and each envelope's ``[start, end)`` in it."""
    order = np.argsort(env, kind="stable")
    bounds = np.searchsorted(env[order], np.arange(n_env + 1))
    return order, bounds


class Hub:
    """Live events of this process's commits (see the module docstring)."""

    def __init__(self, *, window_s: float = 60.0, max_bytes: int = 32 << 20, refresh_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_bytes = max_bytes
        self.refresh_s = refresh_s
        self._clock = clock
        self.seq = int(time.time() * 1_000_000)
        self._lost = self.seq  # commits up to this one are not in the window (before start, or evicted)
        self._ring: deque[_Commit] = deque()
        self._bytes = 0
        self._feeds: set[Feed] = set()
        self._watch: dict[str, set[Feed]] = {}
        self._assoc: dict[str, tuple[str, str | None]] = {}  # device -> (patient, location), open now
        self._pool: asyncpg.Pool | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ associations
    async def start(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop(), name="stream-associations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        """Reload the open associations; re-resolve every feed's devices when they changed."""
        if self._pool is None:
            return
        rows = await self._pool.fetch(_OPEN)
        assoc = {r[0]: (r[1], r[2]) for r in rows}
        if assoc != self._assoc:
            self._assoc = assoc
            for feed in self._feeds:
                feed.devices = self.devices_of(feed.filter)
            self._reindex()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("Stream filters not refreshed; keeping the last associations.", extra={"error": str(exc)})

    def devices_of(self, flt: Filter) -> set[str]:
        kind, value = flt
        if kind == "device":
            return {value}
        if kind == "patient":
            return {d for d, (p, _) in self._assoc.items() if p == value}
        return {d for d, (_, loc) in self._assoc.items() if loc is not None and loc.startswith(value)}

    def _reindex(self) -> None:
        watch: dict[str, set[Feed]] = {}
        for feed in self._feeds:
            for d in feed.devices:
                watch.setdefault(d, set()).add(feed)
        self._watch = watch

    # ------------------------------------------------------------------ feeds
    def add_feed(self, flt: Filter, deliver: Deliver, after: tuple[int, int] | None) -> tuple[Feed, int]:
        """Register a feed; replay the window after ``after`` = (seq, k) when given (a gap first
        when part of it is gone). Returns the feed and the current commit number."""
        feed = Feed(flt, deliver, self.devices_of(flt))
        if after is not None:
            seq, k = after
            if seq < self._lost and not deliver(self.seq, None):  # part of what it asks for left the window
                return feed, self.seq
            for c in list(self._ring):
                if c.seq < seq or (c.seq == seq and k == 0):
                    continue
                events = self._events(c, {d: {id(feed)} for d in feed.devices}).get(id(feed), [])
                if c.seq == seq:
                    events = events[k:]
                if events and not deliver(c.seq, events):
                    return feed, self.seq
        self._feeds.add(feed)
        for d in feed.devices:
            self._watch.setdefault(d, set()).add(feed)
        return feed, self.seq

    def remove_feed(self, feed: Feed) -> None:
        if feed in self._feeds:
            self._feeds.discard(feed)
            for d in feed.devices:
                s = self._watch.get(d)
                if s is not None:
                    s.discard(feed)
                    if not s:
                        del self._watch[d]

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    # ------------------------------------------------------------------ commits
    def on_commit(self, batch: object, ids: Sequence[int | None]) -> None:
        """The commit listener: number the commit, keep it in the window, deliver to watchers."""
        self.seq += 1
        c = self._keep(batch, ids)
        if c is None:
            return
        self._ring.append(c)
        self._bytes += c.nbytes
        now = c.at
        while self._ring and (self._bytes > self.max_bytes or now - self._ring[0].at > self.window_s):
            old = self._ring.popleft()
            self._bytes -= old.nbytes
            self._lost = old.seq
        if self._watch:
            for feed, events in self._dispatch(c):
                if not feed.deliver(c.seq, events):
                    self.remove_feed(feed)

    def _keep(self, wb: object, ids: Sequence[int | None]) -> _Commit | None:
        items = wb.items  # type: ignore[attr-defined]
        alerts = list(wb.alerts)  # type: ignore[attr-defined]
        if not items and not alerts:
            return None
        num, wav = wb.num, wb.wav  # type: ignore[attr-defined]
        nf, wf = wb.num_flags, wb.wav_flags  # type: ignore[attr-defined]
        ncols = (num.env, num.metric, num.t, num.value, nf)
        wcols = (wav.env, wav.metric, wav.t0, wav.hz, wf, wav.offsets, wav.samples)
        if any(i is None for i in ids):  # stored before by another writer: not new, no event
            stored = np.array([i is not None for i in ids] + [False], dtype=bool)
            nk = stored[num.env] if len(num) else np.zeros(0, dtype=bool)
            ncols = tuple(col[nk] for col in ncols)
            wk = np.flatnonzero(stored[wav.env]) if len(wav) else np.zeros(0, dtype=np.int64)
            counts = np.diff(wav.offsets)[wk]
            offsets = np.zeros(len(wk) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            samples = (np.concatenate([wav.samples[wav.offsets[i]:wav.offsets[i + 1]] for i in wk])
                       if len(wk) else np.zeros(0))
            wcols = (wav.env[wk], wav.metric[wk], wav.t0[wk], wav.hz[wk], wf[wk], offsets, samples)
        devices = [d.envelope.device_id for d in items]
        nbytes = 40 * len(ncols[0]) + 8 * len(wcols[6]) + 48 * len(wcols[0]) + 200 * len(alerts) + 64 * len(devices)
        return _Commit(self.seq, self._clock(), devices, ncols, wcols, alerts, nbytes)

    def _dispatch(self, c: _Commit) -> list[tuple[Feed, list[Event]]]:
        watch = self._watch
        wanted: dict[str, set[Feed]] = {}
        for d in c.devices:
            feeds = watch.get(d)
            if feeds:
                wanted[d] = feeds
        for ev in c.alerts:
            feeds = watch.get(ev.device_id)
            if feeds:
                wanted[ev.device_id] = feeds
        if not wanted:
            return []
        feeds_by_id = {id(f): f for fs in wanted.values() for f in fs}
        per = self._events(c, {d: {id(f) for f in fs} for d, fs in wanted.items()})
        return [(feeds_by_id[k], v) for k, v in per.items()]

    @staticmethod
    def _events(c: _Commit, wanted: dict[str, set[int]]) -> dict[int, list[Event]]:
        """Events of commit ``c`` for the wanted devices, per feed id, in a fixed order:
        per device (first appearance) its readings, then its waveform blocks; then alerts."""
        out: dict[int, list[Event]] = {}

        def give(device: str, event: Event) -> None:
            for f in wanted[device]:
                out.setdefault(f, []).append(event)

        envs_of: dict[str, list[int]] = {}
        for i, d in enumerate(c.devices):
            if d in wanted:
                envs_of.setdefault(d, []).append(i)
        if envs_of:
            n_env = len(c.devices)
            nenv, nmet, nt, nval, nfl = c.num
            norder, nb = _rows(nenv, n_env) if len(nenv) else (None, None)
            wenv, wmet, wt0, whz, wfl, woff, wsam = c.wav
            worder, wb = _rows(wenv, n_env) if len(wenv) else (None, None)
            for d, envs in envs_of.items():
                if norder is not None:
                    rows = np.concatenate([norder[nb[i]:nb[i + 1]] for i in envs])
                    if len(rows):
                        readings = [{"metric": m, "t": t, "value": v, "flags": f} for m, t, v, f in zip(
                            nmet[rows].tolist(), nt[rows].tolist(), nval[rows].tolist(), nfl[rows].tolist())]
                        give(d, ("reading", orjson.dumps({"device_id": d, "readings": readings})))
                if worder is not None:
                    for i in envs:
                        for b in worder[wb[i]:wb[i + 1]].tolist():
                            samples = wsam[woff[b]:woff[b + 1]]
                            give(d, ("waveform", orjson.dumps(
                                {"device_id": d, "metric": wmet[b], "t0": int(wt0[b]), "hz": float(whz[b]),
                                 "samples": samples, "flags": int(wfl[b])}, option=orjson.OPT_SERIALIZE_NUMPY)))
        for ev in c.alerts:
            if ev.device_id in wanted:
                give(ev.device_id, ("alert", orjson.dumps(
                    {"event": ev.event, "device_id": ev.device_id, "rule": ev.rule, "priority": ev.priority,
                     "metric": ev.metric, "at": ev.at, "value": ev.value})))
        return out
