"""Fleet simulator: N devices of the shipped profiles publishing telemetry over MQTT.

Devices are spread over several publisher **processes** (multiprocessing, spawn), each
with one MQTT connection, so that the load generator is not the bottleneck. Each process
generates its devices' signals with ``bench.signals`` (numpy, one window for all devices
of a profile at once) and publishes one envelope per device per window, QoS 1.

Two ways to run:

- **paced** (default): each device sends one envelope every ``--interval`` seconds, at its
  own offset within the interval; readings carry wall-clock times.
- **flat out** (``--rate 0``): as fast as the broker acknowledges, bounded by ``--window``
  unacknowledged messages per process. With ``--envelopes N`` all payloads are generated
  before the clock starts; the simulated time they span is compressed into however long
  publishing takes, so reading times are laid out with the newest 45 s ahead of the wall
  clock (under the gateway's default 60 s clock skew) and the oldest as far back as the
  span needs. Keep the span (envelopes per device x interval) under ~45 s, or the
  gateway will, correctly, see devices silent for longer than their ``silent`` rules
  allow and open those alerts. Without ``--envelopes`` readings start 12 h back.

Counters are kept per process in shared memory and summed by ``Fleet.stats()``: envelopes,
numeric readings and waveform samples *published* and *acknowledged by the broker*
(PUBACK), deliberately malformed payloads (``--malformed``), failed acks and MQTT 5
"no matching subscribers" acks (published but nobody was listening).

Run ``python -m bench.fleet --help``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson

from bench.common import NO_MATCHING_SUBSCRIBERS, open_link
from bench.signals import NO_ARTIFACTS, ArtifactRates, DeviceGroup, Window

__all__ = ["FleetConfig", "FleetStats", "Fleet", "device_id", "split_devices", "parse_mix", "build_envelope", "malformed", "main"]

# Device id prefixes of the known device types; others use their first two letters.
PREFIX = {
    "pulse_oximeter": "po",
    "patient_monitor": "pm",
    "nibp_cuff": "bp",
    "thermometer": "th",
    "cgm": "cg",
    "infusion_pump": "ip",
    "ventilator": "vt",
    "weight_scale": "ws",
}

CONTENT_TYPE = {"json": "application/json", "msgpack": "application/msgpack"}
FUTURE_MS = 45_000  # flat out with a total: how far ahead of the wall clock the newest readings are

# Shared counter slots, per process.
(PUB_ENV, PUB_READ, PUB_SAMP, PUB_BAD, PUB_BYTES, ACK_ENV, ACK_READ, ACK_SAMP, ACK_BAD, ACK_FAIL, NO_SUBS, STATE, PID,
 CPU_MS, LAG_MAX_US, LATE) = range(16)
NFIELDS = 16
LATE_S = 0.1  # paced: a send more than this after its due time counts as late
INIT, READY, RUNNING, DONE, FAILED = 0, 1, 2, 3, -1

# Deliberately malformed payloads, one kind after the other: (kind, what the gateway should say).
MALFORMED_KINDS = (
    ("wrong_type", "numerics[0].values.<metric>: expected number, got string"),
    ("unknown_metric", "numerics[0].values: unknown metric for the profile"),
    ("unknown_profile", "profile: unknown profile"),
    ("truncated", "not valid JSON / MessagePack"),
    ("bad_version", "v: must be 1"),
    ("device_mismatch", "device_id: does not match the topic"),
    ("no_readings", "at least one reading required"),
    ("bad_timestamp", "numerics[0].t: not a timestamp"),
)


def device_id(profile: str, number: int) -> str:
    return f"{PREFIX.get(profile, profile[:2])}-{number:06d}"


def parse_mix(text: str) -> dict[str, float]:
    """``"pulse_oximeter=0.6,patient_monitor=0.4"`` -> weights (normalised later)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        out[name.strip()] = float(weight) if weight else 1.0
        if out[name.strip()] < 0:
            raise ValueError(f"negative weight for {name!r}")
    if not out or sum(out.values()) <= 0:
        raise ValueError("the mix needs at least one profile with a positive weight")
    return out


def split_devices(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Devices per profile by largest remainder; every profile with weight > 0 gets >= 1 when n allows."""
    total = sum(mix.values())
    exact = {p: n * w / total for p, w in mix.items() if w > 0}
    counts = {p: int(math.floor(x)) for p, x in exact.items()}
    for p in sorted(exact, key=lambda p: exact[p] - counts[p], reverse=True)[: n - sum(counts.values())]:
        counts[p] += 1
    for p in counts:  # take one from the largest for profiles left empty
        if counts[p] == 0:
            big = max(counts, key=lambda q: counts[q])
            if counts[big] > 1:
                counts[big] -= 1
                counts[p] = 1
    return {p: c for p, c in counts.items() if c > 0}


@dataclass
class FleetConfig:
    """What to simulate and how to publish it (all picklable: it is sent to the workers)."""

    url: str = "mqtt://127.0.0.1:1883"
    profiles_dir: str = "device_profiles"
    devices: int = 100
    mix: dict[str, float] = field(default_factory=lambda: {"pulse_oximeter": 1.0})
    processes: int = 2
    interval_s: float = 1.0
    flat_out: bool = False
    seconds: float | None = None  # stop after this long (None: until envelopes are sent or stop())
    envelopes: int | None = None  # total good envelopes to send (None: unbounded)
    encoding: str = "mixed"  # json | msgpack | mixed (per device, alternating)
    mqtt_version: str = "5"  # 5 | 3.1.1
    client: str = "paho"  # paho | raw
    numerics_per_envelope: int = 1
    metrics: list[str] | None = None  # numeric metrics to send (those a profile has); None = all
    waveforms: bool = True
    artifacts: bool = True
    # Report each numeric metric once per its profile interval_s (False: every metric in every entry)
    respect_intervals: bool = True
    malformed: float = 0.0  # probability, per good envelope, of also sending a malformed one
    seed: int = 1
    window: int = 10_000  # max unacknowledged messages per process (flat out)
    client_id_prefix: str = ""
    start_ms: int | None = None  # epoch ms of the first window's start (default: see module doc)
    # Paced with ``seconds`` and ``start_ms``: generate every payload before the start, so that
    # while it runs a publisher only sends (no signal generation or encoding on the machine under test).
    pregenerate: bool = False
    ack_timeout_s: float = 60.0
    # Waveform samples as numbers (PROTOCOL 1), or the compact binary form of 1.1: "f32le" or "i16le"
    # (JSON devices send the bytes as base64)
    waveform_format: str = "numbers"

    def __post_init__(self) -> None:
        if self.devices < 1 or self.processes < 1:
            raise ValueError("devices and processes must be >= 1")
        if self.encoding not in ("json", "msgpack", "mixed"):
            raise ValueError("encoding must be json, msgpack or mixed")
        if self.mqtt_version not in ("5", "3.1.1"):
            raise ValueError("mqtt_version must be 5 or 3.1.1")
        if self.client not in ("paho", "raw"):
            raise ValueError("client must be paho or raw")
        if self.waveform_format not in WAVEFORM_FORMATS:
            raise ValueError(f"waveform_format must be one of {', '.join(WAVEFORM_FORMATS)}")
        if not 0 <= self.malformed <= 1:
            raise ValueError("malformed is a probability")
        if not 1 <= self.window <= 60_000:
            raise ValueError("window must be within 1..60000 (MQTT packet ids)")
        if self.pregenerate and (self.flat_out or self.seconds is None or self.start_ms is None):
            raise ValueError("pregenerate is for paced runs with seconds and start_ms")
        self.processes = min(self.processes, self.devices)


@dataclass
class FleetStats:
    """Totals over all publisher processes, ``elapsed_s`` since the start signal."""

    elapsed_s: float
    published: int
    published_readings: int
    published_samples: int
    published_malformed: int
    published_bytes: int
    acked: int
    acked_readings: int
    acked_samples: int
    acked_malformed: int
    ack_failures: int
    no_subscribers: int
    processes_done: int
    processes: int
    publisher_cpu_s: float = 0.0
    max_send_lag_ms: float = 0.0  # paced: the latest any envelope was sent after its due time
    late_sends: int = 0  # paced: envelopes sent more than LATE_S after their due time

    @property
    def rate(self) -> float:
        """Acknowledged envelopes per second since the start."""
        return self.acked / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def readings_rate(self) -> float:
        return self.acked_readings / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def all_acked(self) -> bool:
        return self.acked == self.published and self.acked_malformed == self.published_malformed

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate_envelopes_per_s"] = round(self.rate, 1)
        d["rate_readings_per_s"] = round(self.readings_rate, 1)
        return d


# --------------------------------------------------------------------------------------
# Envelopes

_MSGPACK = msgspec.msgpack.Encoder()


_SAMPLE_BYTES = {"f32le": 4, "i16le": 2}


def _hz(hz: float) -> float | int:
    return int(hz) if float(hz).is_integer() else hz


Rows = list[tuple[int, list[str], list[tuple[Any, ...]], list[tuple[str, list[Any], list[bool]]]]]
WaveRows = list[tuple[str, Any, int, list[Any], dict[str, Any]]]
WAVEFORM_FORMATS = ("numbers", "f32le", "i16le")


def _compact(samples: np.ndarray, fmt: str) -> tuple[list[bytes], dict[str, Any]]:
    """One window's samples of every device (rows) in the compact form of PROTOCOL 1.1."""
    if fmt == "f32le":
        return [row.tobytes() for row in samples.astype("<f4")], {"format": "f32le"}
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    scale = peak / 32000 if peak > 0 else 1.0  # the window's range on the int16 grid, as an ADC would
    raw = np.round(samples / scale).astype("<i2")
    return [row.tobytes() for row in raw], {"format": "i16le", "scale": scale, "offset": 0.0}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        import base64

        return base64.b64encode(obj).decode()
    raise TypeError


def window_rows(w: Window, waveform_format: str = "numbers") -> tuple[Rows, WaveRows]:
    """A window's arrays as Python lists, once for all devices (``build_envelope`` indexes them)."""
    rows: Rows = []
    for i, (t, values) in enumerate(w.numerics):
        due = w.due[i] if i < len(w.due) else {}
        names = [m for m in values if m not in due]
        cols = [values[m].tolist() for m in names]
        rows.append((t, names, list(zip(*cols)) if cols else [], [(m, values[m].tolist(), due[m].tolist()) for m in due]))
    if waveform_format == "numbers":
        waves: WaveRows = [(b.metric, _hz(b.hz), b.t0_ms, b.samples.tolist(), {}) for b in w.waveforms]
    else:
        waves = [(b.metric, _hz(b.hz), b.t0_ms, *_compact(b.samples, waveform_format)) for b in w.waveforms]
    return rows, waves


def build_envelope(
    did: str, seq: int, profile: str, base_ms: int, d: int, rows: Rows, wave_rows: WaveRows, sent_ms: int
) -> tuple[dict[str, Any], int, int]:
    """Device ``d``'s envelope for a window, with its numbers of readings and samples.

    An envelope with nothing to report (only slow metrics, none due) has zero of both.
    """
    env: dict[str, Any] = {"v": 1, "device_id": did, "seq": seq, "profile": profile, "firmware": "1.4.2", "sent_at": sent_ms}
    numerics = []
    n_read = 0
    for t, names, vals, slow in rows:
        values = dict(zip(names, vals[d])) if names else {}
        for m, col, due in slow:
            if due[d]:
                values[m] = col[d]
        if values:
            numerics.append({"t": base_ms + t, "values": values})
            n_read += len(values)
    if numerics:
        env["numerics"] = numerics
    n_samp = 0
    if wave_rows:
        env["waveforms"] = [
            {"metric": m, "t0": base_ms + t0, "hz": hz, "samples": samples[d], **extra}
            for m, hz, t0, samples, extra in wave_rows
        ]
        n_samp = sum(len(samples[d]) // _SAMPLE_BYTES.get(extra.get("format"), 1)
                     for _, _, _, samples, extra in wave_rows)
    return env, n_read, n_samp


def malformed(env: dict[str, Any], kind: str, encoding: str) -> bytes:
    """A deliberately broken copy of a valid envelope (never carries ``seq``)."""
    bad = {k: v for k, v in env.items() if k not in ("seq", "waveforms")}
    bad["numerics"] = [dict(n, values=dict(n["values"])) for n in env.get("numerics", [])] or [
        {"t": env["waveforms"][0]["t0"], "values": {}}
    ]
    values = bad["numerics"][0]["values"]
    if kind == "wrong_type":
        if values:
            first = next(iter(values))
            values[first] = str(values[first])
        else:
            values["spo2"] = "97"
    elif kind == "unknown_metric":
        values["bogus_metric"] = 1.0
    elif kind == "unknown_profile":
        bad["profile"] = "toaster"
    elif kind == "bad_version":
        bad["v"] = 2
    elif kind == "device_mismatch":
        bad["device_id"] = "zz-999999"
    elif kind == "no_readings":
        bad["numerics"] = []
    elif kind == "bad_timestamp":
        bad["numerics"][0]["t"] = "yesterday"
    payload = orjson.dumps(bad) if encoding == "json" else _MSGPACK.encode(bad)
    if kind == "truncated":
        payload = payload[: max(1, len(payload) // 2)]
    return payload


@dataclass
class _Device:
    did: str
    topic: str
    encoding: str
    offset_ms: int
    seq: int = 0
    quota: int | None = None  # envelopes left to send (flat out with a total)


class _Worker:
    """One publisher process: its devices, their signal groups, one MQTT connection."""

    def __init__(
        self, idx: int, cfg: FleetConfig, assignment: dict[str, list[int]], global_index: dict[str, int], counters: Any
    ) -> None:
        from gateway.profiles import load_profiles

        self.idx = idx
        self.cfg = cfg
        self.global_index = global_index
        self.counters = counters
        self.base = idx * NFIELDS
        self.local = [0] * NFIELDS
        profiles = load_profiles(cfg.profiles_dir)
        rng = np.random.default_rng(cfg.seed * 1000 + idx)
        self.rng = rng
        artifacts = ArtifactRates() if cfg.artifacts else NO_ARTIFACTS
        self.groups: list[tuple[str, DeviceGroup, list[_Device]]] = []
        for pname, numbers in sorted(assignment.items()):
            prof = profiles[pname]
            metrics = None
            if cfg.metrics is not None:
                metrics = [m for m in cfg.metrics if m in prof.metrics and prof.metrics[m].kind == "numeric"]
            group = DeviceGroup(
                prof, len(numbers), cfg.seed * 7919 + idx * 104729 + len(self.groups),
                interval_s=cfg.interval_s, numerics_per_envelope=cfg.numerics_per_envelope,
                metrics=metrics, waveforms=cfg.waveforms, artifacts=artifacts,
                respect_intervals=cfg.respect_intervals,
            )
            devs = []
            for n in numbers:
                did = device_id(pname, n)
                enc = cfg.encoding if cfg.encoding != "mixed" else ("json" if n % 2 else "msgpack")
                offset = int(rng.uniform(0.1, 1.0) * cfg.interval_s * 1000)
                devs.append(_Device(did, f"devices/{did}/telemetry", enc, offset))
            self.groups.append((pname, group, devs))
        self.start_ms = cfg.start_ms
        self.bad_kind = idx % len(MALFORMED_KINDS)

    # -- generation -------------------------------------------------------------------

    def window_messages(self, start_ms: int) -> list[tuple[int, str, bytes, str, int, int, int]]:
        """All devices' envelopes for their next window: (send offset ms, topic, payload, encoding, readings,
        samples, bad), sorted by send offset. ``start_ms`` is the epoch ms of the stream's start (window 0).
        """
        out: list[tuple[int, str, bytes, str, int, int, int]] = []
        mal = self.cfg.malformed
        for pname, group, devs in self.groups:
            w = group.next_window()
            rows, wave_rows = window_rows(w, self.cfg.waveform_format)
            win_end = int(round((w.index + 1) * self.cfg.interval_s * 1000))
            for d, dev in enumerate(devs):
                if dev.quota is not None and dev.quota <= 0:
                    continue
                base = start_ms + dev.offset_ms
                env, n_read, n_samp = build_envelope(dev.did, dev.seq + 1, pname, base, d, rows, wave_rows, base + win_end)
                if not n_read and not n_samp:
                    continue  # nothing due this window
                dev.seq += 1
                if dev.quota is not None:
                    dev.quota -= 1
                payload = orjson.dumps(env, default=_json_default) if dev.encoding == "json" else _MSGPACK.encode(env)
                out.append((dev.offset_ms, dev.topic, payload, dev.encoding, n_read, n_samp, 0))
                if mal and self.rng.random() < mal:
                    kind = MALFORMED_KINDS[self.bad_kind][0]
                    self.bad_kind = (self.bad_kind + 1) % len(MALFORMED_KINDS)
                    out.append((dev.offset_ms, dev.topic, malformed(env, kind, dev.encoding), dev.encoding, 0, 0, 1))
        out.sort(key=lambda m: m[0])
        return out

    # -- counters ---------------------------------------------------------------------

    def _on_ack(self, token: tuple[int, int, int], rc: int) -> None:
        n_read, n_samp, bad = token
        loc = self.local
        if rc >= 128:
            loc[ACK_FAIL] += 1
            return
        if rc == NO_MATCHING_SUBSCRIBERS:
            loc[NO_SUBS] += 1
        if bad:
            loc[ACK_BAD] += 1
        else:
            loc[ACK_ENV] += 1
            loc[ACK_READ] += n_read
            loc[ACK_SAMP] += n_samp

    def flush_counters(self) -> None:
        c, b = self.counters, self.base
        for i in range(STATE):
            c[b + i] = self.local[i]
        c[b + CPU_MS] = int(time.process_time() * 1000)
        c[b + LAG_MAX_US] = self.local[LAG_MAX_US]
        c[b + LATE] = self.local[LATE]

    def set_state(self, state: int) -> None:
        self.counters[self.base + STATE] = state

    # -- publishing -------------------------------------------------------------------

    def run(self, start_event: Any, stop_event: Any, t0_wall: Any) -> None:
        cfg = self.cfg
        total_windows: int | None = None
        if cfg.envelopes is not None:
            # Envelopes are split over devices: device k (global order) sends floor or ceil.
            for _, group, devs in self.groups:
                for dev in devs:
                    dev.quota = self._quota(dev)
            total_windows = self._windows_needed()
        link = open_link(
            cfg.client, cfg.url, f"{cfg.client_id_prefix or 'fleet'}-{os.getpid()}-{self.idx}", cfg.mqtt_version,
            self._on_ack,
        )
        try:
            pregenerated: list[list[tuple[int, str, bytes, str, int, int, int]]] | None = None
            if cfg.flat_out and total_windows is not None:
                # The newest readings 45 s ahead of the wall clock, older ones as far back as needed:
                # a gateway ingesting within ~75 s never sees a device silent for 30 s (the shortest
                # ``silent`` rule), and nothing is beyond the default 60 s clock skew.
                span_ms = (total_windows + 1) * cfg.interval_s * 1000
                start_ms = self.start_ms or int(time.time() * 1000 + FUTURE_MS - span_ms)
                pregenerated = []
                while self._quota_left() and len(pregenerated) < 2 * total_windows + 10:
                    pregenerated.append(self.window_messages(start_ms))
                total_windows = len(pregenerated)
            elif cfg.pregenerate:
                assert cfg.seconds is not None and cfg.start_ms is not None
                pregenerated = [self.window_messages(cfg.start_ms)
                                for _ in range(max(1, math.ceil(cfg.seconds / cfg.interval_s - 1e-9)))]
                total_windows = len(pregenerated)
            self.set_state(READY)
            start_event.wait()
            self.set_state(RUNNING)
            if cfg.flat_out:
                self._flat_out(link, pregenerated, stop_event, t0_wall.value, total_windows)
            else:
                self._paced(link, stop_event, t0_wall.value, total_windows, pregenerated)
            # Wait for the remaining PUBACKs.
            deadline = time.monotonic() + cfg.ack_timeout_s
            while link.outstanding and time.monotonic() < deadline:
                link.pump(0.05)
                self.flush_counters()
            self.flush_counters()
        finally:
            link.close()
        self.set_state(DONE)

    def _quota_left(self) -> int:
        return sum(d.quota or 0 for _, _, devs in self.groups for d in devs)

    def _windows_needed(self) -> int:
        """Windows to generate so that every device can send its quota (slow devices need more)."""
        need = 0
        for _, group, devs in self.groups:
            every = 1
            if group.wave_specs == {} and all(m in group.slow_metrics for m in group.numeric_specs):
                every = math.ceil(min(group.slow_metrics.values()) / self.cfg.interval_s)
            need = max(need, max(d.quota or 0 for d in devs) * every)
        return need

    def _quota(self, dev: _Device) -> int:
        # Global device order is (profile, number); envelopes are dealt round-robin.
        n_dev, total = self.cfg.devices, int(self.cfg.envelopes or 0)
        k = self.global_index[dev.did]
        return total // n_dev + (1 if k < total % n_dev else 0)

    def _publish(self, link: Any, msg: tuple[int, str, bytes, str, int, int, int]) -> None:
        _, topic, payload, enc, n_read, n_samp, bad = msg
        link.publish(topic, payload, CONTENT_TYPE[enc], (n_read, n_samp, bad))
        loc = self.local
        if bad:
            loc[PUB_BAD] += 1
        else:
            loc[PUB_ENV] += 1
            loc[PUB_READ] += n_read
            loc[PUB_SAMP] += n_samp
        loc[PUB_BYTES] += len(payload)

    def _flat_out(self, link: Any, pregenerated: Any, stop_event: Any, t0: float, total_windows: int | None) -> None:
        cfg = self.cfg
        window = cfg.window
        deadline = None if cfg.seconds is None else t0 + cfg.seconds
        start_ms = self.start_ms or int(time.time() * 1000 - 12 * 3600 * 1000)
        k = 0
        last_flush = time.monotonic()
        while total_windows is None or k < total_windows:
            msgs = pregenerated[k] if pregenerated is not None else self.window_messages(start_ms)
            if pregenerated is not None:
                pregenerated[k] = []  # free memory as we go
            for i, msg in enumerate(msgs):
                self._publish(link, msg)
                if i % 64 == 63:
                    link.pump(0)
                while link.outstanding >= window:
                    link.pump(0.002)
            k += 1
            now = time.monotonic()
            if now - last_flush > 0.1:
                link.pump(0)
                self.flush_counters()
                last_flush = now
                if stop_event.is_set() or (deadline is not None and time.time() >= deadline):
                    break
        link.pump(0)
        self.flush_counters()

    def _paced(self, link: Any, stop_event: Any, t0: float, total_windows: int | None,
               pregenerated: list[list[tuple[int, str, bytes, str, int, int, int]]] | None = None) -> None:
        cfg = self.cfg
        start_ms = self.start_ms or int(t0 * 1000)
        interval_ms = cfg.interval_s * 1000
        k = 0
        while True:
            if pregenerated is not None:
                if k >= len(pregenerated):
                    return
            elif total_windows is not None and not (self._quota_left() > 0 and k < 2 * total_windows + 10):
                return
            wstart_ms = start_ms + int(round(k * interval_ms))
            # Wait for the window to begin (device offsets are >= 10 % of the interval).
            while time.time() * 1000 < wstart_ms:
                link.pump(min(0.05, max(0.0, wstart_ms / 1000 - time.time())))
                self.flush_counters()
                if stop_event.is_set():
                    return
            if pregenerated is not None:
                msgs, pregenerated[k] = pregenerated[k], []
            else:
                msgs = self.window_messages(start_ms)
            for msg in msgs:
                # A window's envelope is sent when its window ends, at the device's offset.
                due = (wstart_ms + interval_ms + msg[0]) / 1000.0
                while True:
                    delay = due - time.time()
                    if delay <= 0.002:
                        break
                    link.pump(min(delay, 0.05))
                    if stop_event.is_set():
                        return
                lag = -delay
                if lag > LATE_S:
                    self.local[LATE] += 1
                if lag > 0 and lag * 1e6 > self.local[LAG_MAX_US]:
                    self.local[LAG_MAX_US] = int(lag * 1e6)
                self._publish(link, msg)
            link.pump(0)
            self.flush_counters()
            k += 1
            if stop_event.is_set():
                return
            if pregenerated is None and cfg.seconds is not None and time.time() >= t0 + cfg.seconds:
                return


def _worker_main(idx: int, cfg: FleetConfig, assignment: dict[str, list[int]], global_index: dict[str, int],
                 counters: Any, start_event: Any, stop_event: Any, t0_wall: Any, errors: Any) -> None:
    try:
        counters[idx * NFIELDS + PID] = os.getpid()
        _Worker(idx, cfg, assignment, global_index, counters).run(start_event, stop_event, t0_wall)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        counters[idx * NFIELDS + STATE] = FAILED
        errors.put(f"publisher {idx}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")


class Fleet:
    """Start publisher processes, read their counters, stop them.

    ``start()`` returns once every process is connected (and, flat out with a total, has
    generated all its payloads) and has been told to go.
    """

    def __init__(self, cfg: FleetConfig) -> None:
        from gateway.profiles import load_profiles

        self.cfg = cfg
        profiles = load_profiles(cfg.profiles_dir)
        missing = [p for p in cfg.mix if p not in profiles]
        if missing:
            raise ValueError(f"no profile {missing[0]!r} in {cfg.profiles_dir} (have: {', '.join(sorted(profiles))})")
        self.per_profile = split_devices(cfg.devices, cfg.mix)
        self.device_ids: list[str] = []
        self._assign: list[dict[str, list[int]]] = [{} for _ in range(cfg.processes)]
        i = 0
        for pname in sorted(self.per_profile):
            for number in range(1, self.per_profile[pname] + 1):
                self._assign[i % cfg.processes].setdefault(pname, []).append(number)
                self.device_ids.append(device_id(pname, number))
                i += 1
        self._global_index = {d: k for k, d in enumerate(self.device_ids)}
        self._ctx = mp.get_context("spawn")
        self._counters = self._ctx.Array("q", cfg.processes * NFIELDS, lock=False)
        self._start = self._ctx.Event()
        self._stop = self._ctx.Event()
        self._t0 = self._ctx.Value("d", 0.0, lock=False)
        self._errors = self._ctx.Queue()
        self._procs: list[Any] = []
        self._t0_mono = 0.0
        self._t_end: float | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def start(self, timeout: float = 120.0) -> None:
        for idx in range(self.cfg.processes):
            p = self._ctx.Process(
                target=_worker_main, name=f"fleet-{idx}",
                args=(idx, self.cfg, self._assign[idx], self._global_index, self._counters, self._start, self._stop,
                      self._t0, self._errors),
                daemon=True,
            )
            p.start()
            self._procs.append(p)
        deadline = time.monotonic() + timeout
        while True:
            self._raise_errors()
            states = [self._counters[i * NFIELDS + STATE] for i in range(self.cfg.processes)]
            if all(s >= READY for s in states):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"publishers not ready after {timeout:.0f} s (states {states})")
            for p in self._procs:
                if not p.is_alive() and p.exitcode not in (0, None):
                    self._raise_errors()
                    raise RuntimeError(f"publisher {p.name} exited with code {p.exitcode}")
            time.sleep(0.02)
        self._t0.value = time.time()
        self._t0_mono = time.monotonic()
        self._start.set()

    def _raise_errors(self) -> None:
        try:
            msg = self._errors.get_nowait()
        except Exception:  # queue.Empty
            return
        self.kill()
        raise RuntimeError(msg)

    def check(self) -> None:
        """Raise if a publisher failed."""
        self._raise_errors()

    def stats(self) -> FleetStats:
        c = self._counters
        tot = [0] * NFIELDS
        done = 0
        for i in range(self.cfg.processes):
            for f in (*range(STATE), CPU_MS, LATE):
                tot[f] += c[i * NFIELDS + f]
            tot[LAG_MAX_US] = max(tot[LAG_MAX_US], c[i * NFIELDS + LAG_MAX_US])
            done += c[i * NFIELDS + STATE] == DONE
        end = self._t_end if self._t_end is not None else time.monotonic()
        elapsed = end - self._t0_mono if self._t0_mono else 0.0
        return FleetStats(
            elapsed, tot[PUB_ENV], tot[PUB_READ], tot[PUB_SAMP], tot[PUB_BAD], tot[PUB_BYTES],
            tot[ACK_ENV], tot[ACK_READ], tot[ACK_SAMP], tot[ACK_BAD], tot[ACK_FAIL], tot[NO_SUBS], done, self.cfg.processes,
            tot[CPU_MS] / 1000.0, tot[LAG_MAX_US] / 1000.0, tot[LATE],
        )

    def done(self) -> bool:
        return all(not p.is_alive() for p in self._procs)

    def stop(self) -> None:
        """Stop publishing new envelopes; processes then wait for their PUBACKs and exit."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the processes to finish; True if they all did. Freezes the elapsed time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self._procs:
            p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._raise_errors()
        ok = self.done()
        if ok and self._t_end is None:
            self._t_end = time.monotonic()
        return ok

    def publishing_time(self) -> float:
        return (self._t_end or time.monotonic()) - self._t0_mono

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(5)


# --------------------------------------------------------------------------------------
# Command line


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description="Simulate a fleet of medical devices publishing telemetry envelopes over MQTT (QoS 1).",
    )
    ap.add_argument("--url", default="mqtt://127.0.0.1:1883", help="broker (default %(default)s)")
    ap.add_argument("--profiles", default="device_profiles", help="profiles directory (default %(default)s)")
    ap.add_argument("--devices", type=int, default=100, help="number of devices (default %(default)s)")
    ap.add_argument("--mix", default="pulse_oximeter=1",
                    help="profile weights, e.g. pulse_oximeter=0.6,patient_monitor=0.4 (default %(default)s)")
    ap.add_argument("--processes", type=int, default=2, help="publisher processes (default %(default)s)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds of signal per envelope (default %(default)s)")
    ap.add_argument("--rate", type=float, default=None,
                    help="total envelopes/s; 0 = flat out (default: each device once per --interval)")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--envelopes", type=int, default=None, help="stop after this many envelopes in total")
    ap.add_argument("--encoding", choices=("json", "msgpack", "mixed"), default="mixed")
    ap.add_argument("--mqtt", choices=("5", "3.1.1"), default="5", help="MQTT protocol version")
    ap.add_argument("--client", choices=("paho", "raw"), default="paho",
                    help="paho-mqtt, or the minimal raw-socket publisher (far less CPU per message)")
    ap.add_argument("--numerics-per-envelope", type=int, default=1)
    ap.add_argument("--metrics", default=None, help="comma-separated numeric metrics to send (default: all)")
    ap.add_argument("--no-waveforms", action="store_true")
    ap.add_argument("--waveform-format", choices=WAVEFORM_FORMATS, default="numbers",
                    help="samples as numbers (PROTOCOL 1), or binary float32 / int16 (1.1) (default %(default)s)")
    ap.add_argument("--no-artifacts", action="store_true", help="clean signals only (no probe-off, out of range...)")
    ap.add_argument("--malformed", type=float, default=0.0, help="probability per envelope of an extra malformed one")
    ap.add_argument("--window", type=int, default=10_000, help="max unacknowledged messages per process")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the final counters as JSON on stdout")
    a = ap.parse_args(argv)
    if a.seconds is None and a.envelopes is None:
        ap.error("give --seconds or --envelopes (or both)")
    return a


def config_from_args(a: argparse.Namespace) -> FleetConfig:
    interval = a.interval
    flat_out = a.rate == 0
    if a.rate is not None and a.rate > 0:
        interval = a.devices / a.rate
    return FleetConfig(
        url=a.url, profiles_dir=a.profiles, devices=a.devices, mix=parse_mix(a.mix), processes=a.processes,
        interval_s=interval, flat_out=flat_out, seconds=a.seconds, envelopes=a.envelopes, encoding=a.encoding,
        mqtt_version=a.mqtt, client=a.client, numerics_per_envelope=a.numerics_per_envelope,
        metrics=a.metrics.split(",") if a.metrics else None, waveforms=not a.no_waveforms,
        artifacts=not a.no_artifacts, malformed=a.malformed, seed=a.seed, window=a.window,
        waveform_format=a.waveform_format,
    )


def progress_line(s: FleetStats, prev: FleetStats | None) -> str:
    inst = 0.0
    if prev is not None and s.elapsed_s > prev.elapsed_s:
        inst = (s.acked - prev.acked) / (s.elapsed_s - prev.elapsed_s)
    return (
        f"t={s.elapsed_s:6.1f}s published={s.published:,} acked={s.acked:,} readings={s.acked_readings:,} "
        f"samples={s.acked_samples:,} malformed={s.acked_malformed:,} rate={inst:,.0f}/s avg={s.rate:,.0f}/s"
    )


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    cfg = config_from_args(a)
    fleet = Fleet(cfg)
    print(
        f"Fleet: {cfg.devices} devices ({', '.join(f'{p}={n}' for p, n in fleet.per_profile.items())}), "
        f"{cfg.processes} processes, {cfg.client} MQTT {cfg.mqtt_version}, "
        + ("flat out" if cfg.flat_out else f"one envelope per device every {cfg.interval_s:g} s"),
        file=sys.stderr,
    )
    fleet.start()
    prev = None
    try:
        while not fleet.join(1.0):
            s = fleet.stats()
            print("\r" + progress_line(s, prev), end="", file=sys.stderr, flush=True)
            prev = s
    except KeyboardInterrupt:
        fleet.stop()
        fleet.join(cfg.ack_timeout_s + 5)
    s = fleet.stats()
    print("\r" + progress_line(s, prev), file=sys.stderr)
    unacked = s.published - s.acked + s.published_malformed - s.acked_malformed
    print(
        f"Published {s.published:,} envelopes ({s.published_readings:,} readings, {s.published_samples:,} samples, "
        f"{s.published_malformed:,} malformed) in {s.elapsed_s:.1f} s: {s.rate:,.0f} envelopes/s, "
        f"{s.readings_rate:,.0f} readings/s acknowledged; unacknowledged {unacked:,}, failed {s.ack_failures:,}, "
        f"no subscribers {s.no_subscribers:,}",
        file=sys.stderr,
    )
    if a.json:
        print(orjson.dumps(s.as_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0 if unacked == 0 and s.ack_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
