"""Offline replay of a recording (PROTOCOL section 4): ``vitalgate replay``.

A recording holds one JSON envelope per line, optionally with ``"received_at"`` (epoch ms)
beside the envelope's fields. Every line goes through the live code path - the same
``decode`` and the same ``Evaluator`` (dedupe -> checks -> alert rules) as the pipeline -
with no database and no broker, and the result is printed as NDJSON: alert events and
rejected lines in file order, then a summary.

A repeated envelope (same ``device_id`` and the same line bytes, as live keys a payload on
its SHA-256) is evaluated once, as live stores it once: the repeat adds no alert, no flags
and no count in the summary.

The gateway clock is the latest receipt time seen so far (a line without ``received_at`` is
received at its latest reading time). The engine's clock ticks after every line. Lines are
processed in chunks for speed; a chunk is only used when no tick inside it could open a
``silent`` alert, otherwise its lines go one by one, so the output is the same as with
line-by-line processing, and deterministic.

``Replay`` is the reusable core: feed it lines, read the output objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from gateway.checks import CheckSettings
from gateway.decode import Decoded, decode
from gateway.errors import RejectError
from gateway.evaluate import Evaluator, Key, flag_counts
from gateway.model import FLAG_NAMES, AlertEvent
from gateway.pipeline import PipelineSettings
from gateway.profiles import Profile

__all__ = ["Replay", "alert_record"]

CHUNK = 512


class _Receipt(msgspec.Struct):
    received_at: int | None = None


_RECEIPT = msgspec.json.Decoder(_Receipt)


def alert_record(e: AlertEvent) -> dict[str, Any]:
    """The NDJSON object of an alert event, keys in PROTOCOL order."""
    return {
        "type": "alert", "event": e.event, "device_id": e.device_id, "rule": e.rule,
        "priority": e.priority, "metric": e.metric, "at": e.at, "value": e.value,
    }


@dataclass
class _Line:
    number: int
    decoded: Decoded
    received_at: int


@dataclass
class _Totals:
    envelopes: int = 0
    readings: int = 0
    waveform_samples: int = 0
    rejected: int = 0
    flags: list[int] = field(default_factory=lambda: [0] * len(FLAG_NAMES))


class Replay:
    """The replay of one recording: the evaluator's state, the envelopes seen, the clock, totals."""

    def __init__(self, profiles: Mapping[str, Profile], default_profile: str | None = None, settings: CheckSettings | None = None) -> None:
        """Create a replay.

        Args:
            profiles: the device profiles by name.
            default_profile: profile of envelopes that name none (there is no registry offline).
            settings: clock-check settings (the gateway defaults when omitted).
        """
        self.profiles = profiles
        self.default_profile = default_profile
        self.settings = settings or PipelineSettings().checks
        self.evaluator = Evaluator(profiles, self.settings)
        self.engine = self.evaluator.engine
        self.clock: int | None = None
        self.totals = _Totals()
        self._seen: set[Key] = set()  # envelopes evaluated: a repeat of one is a redelivery
        self._silent_floor = min(
            (round(r.after_s * 1000) for p in profiles.values() for r in p.alerts if r.when == "silent"),  # type: ignore[operator]
            default=None,
        )

    def feed(self, lines: Iterable[bytes], chunk: int = CHUNK) -> Iterator[dict[str, Any]]:
        """Process lines (numbered from 1, blank ones skipped); yield alert and rejected records."""
        pending: list[_Line] = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                item = self._decode(number, raw)
            except RejectError as exc:
                yield from self._flush(pending)
                pending = []
                self.totals.rejected += 1
                yield {"type": "rejected", "line": number, "reason": exc.reason}
                continue
            pending.append(item)
            if len(pending) >= chunk:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def summary(self) -> dict[str, Any]:
        """The closing summary record."""
        t = self.totals
        return {
            "type": "summary", "envelopes": t.envelopes, "readings": t.readings,
            "waveform_samples": t.waveform_samples, "rejected": t.rejected,
            "flags": dict(zip(FLAG_NAMES, t.flags)), "alerts_open": len(self.engine.active()),
        }

    def _decode(self, number: int, raw: bytes) -> _Line:
        # the line without its ending is the payload live would receive and hash
        payload = raw.rstrip(b"\r\n")
        d = decode(payload, content_type="application/json", profiles=self.profiles, default_profile=self.default_profile)
        try:
            received = _RECEIPT.decode(payload).received_at
        except msgspec.ValidationError:
            raise RejectError("received_at: expected integer epoch milliseconds", d.device_id) from None
        return _Line(number, d, d.latest_t if received is None else received)

    def _flush(self, lines: Sequence[_Line]) -> Iterator[dict[str, Any]]:
        if not lines:
            return
        clocks = np.maximum.accumulate([self.clock if self.clock is not None else lines[0].received_at] + [x.received_at for x in lines])[1:]
        if len(lines) == 1 or self._quiet(lines, clocks):
            yield from self._process(lines, int(clocks[-1]))
        else:
            for x, c in zip(lines, clocks.tolist()):
                yield from self._process([x], c)

    def _quiet(self, lines: Sequence[_Line], clocks: np.ndarray) -> bool:
        """True when no tick after lines[0..-2] could open a silent alert (see module doc).

        Deadlines of armed rules only move later with new readings, and a device armed by a
        line of the chunk gets a deadline of at least the chunk's earliest reading time plus
        the smallest ``after_s``: if the clock stays at or below both, nothing can fire.
        """
        if self._silent_floor is None:
            return True
        earliest = min(min([*x.decoded.num_t, *x.decoded.wav_t0]) for x in lines)
        bound = earliest + self._silent_floor
        due = self.engine.next_deadline()
        if due is not None:
            bound = min(bound, due)
        return int(clocks[-2]) <= bound

    def _process(self, lines: Sequence[_Line], clock: int) -> Iterator[dict[str, Any]]:
        ev = self.evaluator.evaluate([x.decoded for x in lines], [x.received_at for x in lines], self._seen)
        self._seen.update(ev.keys)
        events = ev.events
        self.clock = clock
        events += self.evaluator.tick(clock)
        t = self.totals
        t.envelopes += len(ev.items)
        t.readings += len(ev.num)
        t.waveform_samples += len(ev.wav.samples)
        for i, n in enumerate(flag_counts(ev.num_flags, ev.wav_flags)):
            t.flags[i] += n
        for e in events:
            yield alert_record(e)
