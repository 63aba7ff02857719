"""bench.fleet: envelopes that the gateway's decoder accepts, malformed ones it rejects, device split."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from bench.common import _varint
from bench.fleet import (
    MALFORMED_KINDS, PREFIX, FleetConfig, _Worker, device_id, malformed, parse_mix, split_devices,
)
from gateway.decode import decode
from gateway.errors import RejectError
from gateway.model import Envelope
from gateway.profiles import load_profiles

PROFILES_DIR = Path(__file__).resolve().parents[2] / "device_profiles"
PROFILES = load_profiles(PROFILES_DIR)


def _worker(**kw: object) -> _Worker:
    cfg = FleetConfig(profiles_dir=str(PROFILES_DIR), devices=len(PROFILES) * 4,
                      mix={p: 1.0 for p in PROFILES}, processes=1, **kw)  # type: ignore[arg-type]
    per = split_devices(cfg.devices, cfg.mix)
    assignment = {p: list(range(1, n + 1)) for p, n in per.items()}
    ids = sorted(device_id(p, k) for p, ks in assignment.items() for k in ks)
    return _Worker(0, cfg, assignment, {d: i for i, d in enumerate(ids)}, [0] * 16)


def test_device_ids_and_mix() -> None:
    assert device_id("pulse_oximeter", 123) == "po-000123"
    assert device_id("patient_monitor", 1) == "pm-000001"
    assert device_id("toaster", 7) == "to-000007"
    assert set(PREFIX) >= set(PROFILES)
    assert parse_mix("pulse_oximeter=0.6, patient_monitor=0.4") == {"pulse_oximeter": 0.6, "patient_monitor": 0.4}
    with pytest.raises(ValueError):
        parse_mix("")
    counts = split_devices(300, {"a": 0.6, "b": 0.3, "c": 0.1})
    assert counts == {"a": 180, "b": 90, "c": 30}
    counts = split_devices(10, {"a": 100.0, "b": 1.0, "c": 1.0})
    assert sum(counts.values()) == 10 and counts["b"] == counts["c"] == 1


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_envelopes_decode_and_validate(encoding: str) -> None:
    w = _worker(encoding=encoding, malformed=0.0)
    seen_profiles = set()
    seqs: dict[str, list[int]] = {}
    readings = samples = 0
    for k in range(3):
        for _, topic, payload, enc, n_read, n_samp, bad in w.window_messages(1_764_187_200_000):
            assert enc == encoding and not bad
            did = topic.split("/")[1]
            assert topic == f"devices/{did}/telemetry"
            ctype = "application/json" if enc == "json" else "application/msgpack"
            env = (msgspec.json if enc == "json" else msgspec.msgpack).decode(payload, type=Envelope)
            assert env.device_id == did and env.profile is not None
            d = decode(payload, content_type=ctype, profiles=PROFILES, topic_device_id=did)
            assert d.n_numeric == n_read and d.n_samples == n_samp
            readings += n_read
            samples += n_samp
            seen_profiles.add(env.profile)
            seqs.setdefault(did, []).append(env.seq)  # type: ignore[arg-type]
    assert seen_profiles >= {"pulse_oximeter", "patient_monitor"}
    assert readings > 0 and samples > 0
    for did, s in seqs.items():
        assert s == list(range(1, len(s) + 1)), did  # seq counts up from 1, no gaps


def test_malformed_payloads_are_all_rejected() -> None:
    w = _worker(encoding="mixed", malformed=0.0)
    msgs = w.window_messages(1_764_187_200_000)
    for encoding in ("json", "msgpack"):
        _, topic, payload, _, _, _, _ = next(m for m in msgs if m[3] == encoding and "pm-" in m[1])
        did = topic.split("/")[1]
        codec = msgspec.json if encoding == "json" else msgspec.msgpack
        env = codec.decode(payload)
        for kind, _ in MALFORMED_KINDS:
            bad = malformed(env, kind, encoding)
            with pytest.raises(RejectError):
                decode(bad, content_type=f"application/{encoding}", profiles=PROFILES, topic_device_id=did)


def test_mixed_encoding_alternates_per_device() -> None:
    w = _worker(encoding="mixed")
    by_device = {m[1]: m[3] for m in w.window_messages(0)}
    assert set(by_device.values()) == {"json", "msgpack"}


def test_varint() -> None:
    assert _varint(0) == b"\x00"
    assert _varint(127) == b"\x7f"
    assert _varint(128) == b"\x80\x01"
    assert _varint(16_383) == b"\xff\x7f"
    assert _varint(2_097_152) == b"\x80\x80\x80\x01"


def test_consecutive_envelopes_of_a_device_are_contiguous_in_time() -> None:
    cfg = FleetConfig(profiles_dir=str(PROFILES_DIR), devices=4, mix={"patient_monitor": 1}, processes=1,
                      interval_s=2.0, numerics_per_envelope=2, encoding="json")
    w = _Worker(0, cfg, {"patient_monitor": [1, 2, 3, 4]}, {}, [0] * 16)
    start = 1_764_187_200_000
    by_device: dict[str, list[Envelope]] = {}
    for _ in range(4):
        for m in w.window_messages(start):
            env = msgspec.json.decode(m[2], type=Envelope)
            by_device.setdefault(env.device_id, []).append(env)
    for did, envs in by_device.items():
        times = [n.t for e in envs for n in e.numerics if "heart_rate" in n.values]
        assert len(times) == 8
        assert all(b - a == 1000 for a, b in zip(times, times[1:])), (did, times)
        assert start + 1000 <= times[0] < start + 3000  # device offset (< interval) + first step
        for metric in ("ecg_ii", "pleth", "resp"):
            blocks = [b for e in envs for b in e.waveforms if b.metric == metric]
            for a, b in zip(blocks, blocks[1:]):
                assert abs(b.t0 - (a.t0 + len(a.samples) * 1000 / a.hz)) < 1, (did, metric)
        assert all(e.sent_at >= max(n.t for n in e.numerics) for e in envs)


@pytest.mark.parametrize("fmt", ["f32le", "i16le"])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_compact_waveforms_decode_to_the_counted_samples_close_to_the_numbers(encoding: str, fmt: str) -> None:
    import numpy as np

    from gateway.decode import to_columns

    def columns(waveform_format: str) -> tuple[int, np.ndarray]:
        w = _worker(encoding=encoding, malformed=0.0, artifacts=False, waveform_format=waveform_format)
        ds, counted = [], 0
        for _, topic, payload, _enc, _n_read, n_samp, _bad in w.window_messages(1_764_187_200_000):
            ds.append(decode(payload, content_type=None, profiles=PROFILES, topic_device_id=topic.split("/")[1]))
            counted += n_samp
        wav = to_columns(ds, [0] * len(ds))[1]
        assert len(wav.samples) == counted > 0
        return counted, wav.samples

    n, numbers = columns("numbers")
    m, compact = columns(fmt)
    assert n == m
    peak = np.abs(numbers).max()
    assert np.abs(compact - numbers).max() <= (peak / 32000 if fmt == "i16le" else 1e-6 * peak)
