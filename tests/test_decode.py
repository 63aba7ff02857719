"""Decoding and validation: accepted shapes, and a reason naming the field for each reject."""

from __future__ import annotations

import hashlib

import msgspec
import orjson
import pytest

from gateway.decode import decode, encoding_of, to_columns
from gateway.errors import RejectError
from gateway.profiles import load_profiles
from tests.harness import PROFILES

P = load_profiles(PROFILES)
T = 1764187200000


def env(**over: object) -> dict:
    base: dict = {"v": 1, "device_id": "po-1", "profile": "pulse_oximeter",
                  "numerics": [{"t": T, "values": {"spo2": 97, "pulse_rate": 72}}]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def reject(payload: bytes, **kw: object) -> RejectError:
    with pytest.raises(RejectError) as info:
        decode(payload, content_type=kw.pop("content_type", None), profiles=P, **kw)  # type: ignore[arg-type]
    return info.value


def test_json_and_msgpack_decode_to_the_same_readings():
    e = env(seq=3, firmware="1.2", numerics=[{"t": T, "values": {"spo2": 97, "pulse_rate": 72}},
                                             {"t": "2025-11-26T20:00:01.5+00:00", "values": {"spo2": 96.5}}],
            waveforms=[{"metric": "pleth", "t0": "2025-11-26T21:00:00+01:00", "hz": 125, "samples": [0.5, 0.6, 0.7]}])
    a = decode(orjson.dumps(e), content_type=None, profiles=P)
    b = decode(msgspec.msgpack.encode(e), content_type=None, profiles=P)
    assert (a.encoding, b.encoding) == ("json", "msgpack")
    for d in (a, b):
        assert d.num_t == [T, T, T + 1500]
        assert d.num_metric == ["spo2", "pulse_rate", "spo2"]
        assert d.num_value == [97.0, 72.0, 96.5]
        assert (d.wav_metric, d.wav_t0, d.wav_hz, d.wav_len) == (["pleth"], [T], [125.0], [3])
        assert d.profile.name == "pulse_oximeter" and d.envelope.seq == 3
        assert d.latest_t == T + 1500
    assert a.sha256 == hashlib.sha256(orjson.dumps(e)).digest()


def test_encoding_by_content_type_and_first_byte():
    assert encoding_of(b"{", None) == "json"
    assert encoding_of(b"\x85", None) == "msgpack"
    assert encoding_of(b"\xde\x00\x01", None) == "msgpack"
    assert encoding_of(b"{", "application/json; charset=utf-8") == "json"
    assert encoding_of(b"{", "application/msgpack") == "msgpack"
    assert reject(orjson.dumps(env()), content_type="text/plain").reason == (
        "content-type: unsupported 'text/plain', expected application/json or application/msgpack")


def test_default_profile_applies_only_when_the_envelope_names_none():
    d = decode(orjson.dumps(env(profile=None)), content_type=None, profiles=P, default_profile="pulse_oximeter")
    assert d.profile.name == "pulse_oximeter"
    assert reject(orjson.dumps(env(profile=None))).reason == "profile: required, the device has no registered profile"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (orjson.dumps(env(numerics=[{"t": T, "values": {"spo2": 1}}, {"t": T, "values": {"spo2": "x"}}])),
         "numerics[1].values.spo2: expected number, got string"),
        (orjson.dumps(env(numerics=[{"t": T, "values": {"spo2": None}}])), "numerics[0].values.spo2: expected number, got null"),
        (orjson.dumps(env(numerics=[{"t": T, "values": {"spo2": True}}])), "numerics[0].values.spo2: expected number, got boolean"),
        (orjson.dumps(env(numerics={"t": T})), "numerics: expected array, got object"),
        (orjson.dumps(env(device_id="x" * 65)), "device_id: must match [A-Za-z0-9._-]{1,64}"),
        (orjson.dumps(env(seq=-1)), "seq: expected integer >= 0"),
        (b'{"v":1,"device_id":"po-1","seq":18446744073709551615,"numerics":[]}', "seq: expected integer <= 9223372036854775807"),
        (orjson.dumps(env(numerics=[{"t": 2**60, "values": {"spo2": 1}}])), "numerics[0].t: expected integer <= 253402300799999"),
        (orjson.dumps(env(waveforms=[{"metric": "pleth", "t0": T, "hz": -1, "samples": [1]}])), "waveforms[0].hz: expected number > 0.0"),
        (orjson.dumps(env(waveforms=[{"metric": "spo2", "t0": T, "hz": 1, "samples": [1]}])),
         "waveforms[0].metric: 'spo2' is a numeric metric, send it in numerics"),
        (orjson.dumps(env(waveforms=[{"metric": "ecg", "t0": T, "hz": 1, "samples": [1]}])),
         "waveforms[0].metric: unknown metric 'ecg' for profile 'pulse_oximeter'"),
        (orjson.dumps(env(waveforms=[{"metric": "pleth", "t0": T, "hz": 1, "samples": ["a"]}])),
         "waveforms[0].samples[0]: expected number, got string"),
        (msgspec.msgpack.encode(env(numerics=[{"t": T, "values": {"spo2": float("inf")}}])),
         "numerics[0].values.spo2: expected a finite number, got inf"),
        (b'{"v":1,"device_id":"po-1","numerics":[{"t":1,"values":{"spo2":NaN}}]}', "payload: invalid JSON: invalid character (byte 62)"),
        (orjson.dumps(env(numerics=[{"t": T, "values": {"sp\u0000o2": 1}}])),
         "numerics[0].values.'sp\\x00o2': unknown metric for profile 'pulse_oximeter'"),
        (orjson.dumps(env(waveforms=[{"metric": "pleth", "t0": T, "hz": 5e-324, "samples": [1.0, 2.0]}])),
         "waveforms[0].hz: too low, the block would end after 9999-12-31"),
    ],
)
def test_reject_reasons_name_the_field(payload: bytes, reason: str):
    assert reject(payload).reason == reason


def test_reject_carries_the_device_id_when_readable():
    assert reject(orjson.dumps(env(v=9))).device_id == "po-1"
    assert reject(orjson.dumps(env(seq="x"))).device_id == "po-1"
    assert reject(b"junk", topic_device_id="po-9").device_id == "po-9"
    assert reject(b"junk").device_id is None


def test_non_finite_waveform_samples_are_accepted_for_flagging():
    e = env(numerics=[], waveforms=[{"metric": "pleth", "t0": T, "hz": 125, "samples": [0.5, float("nan"), float("inf")]}])
    d = decode(msgspec.msgpack.encode(e), content_type=None, profiles=P)
    _, wav = to_columns([d], [T])
    assert len(wav) == 1 and list(wav.offsets) == [0, 3]


def test_to_columns_concatenates_envelopes_in_arrival_order():
    a = decode(orjson.dumps(env(device_id="a")), content_type=None, profiles=P)
    b = decode(orjson.dumps(env(device_id="b", numerics=[{"t": T + 1, "values": {"spo2": 90}}],
                                waveforms=[{"metric": "pleth", "t0": T, "hz": 125, "samples": [1.0, 2.0]}])),
               content_type=None, profiles=P)
    num, wav = to_columns([a, b], [10, 20])
    assert list(num.device) == ["a", "a", "b"]
    assert list(num.metric) == ["spo2", "pulse_rate", "spo2"]
    assert list(num.t) == [T, T, T + 1]
    assert list(num.received_at) == [10, 10, 20]
    assert list(num.env) == [0, 0, 1]
    assert list(num.profile) == ["pulse_oximeter"] * 3
    assert list(wav.device) == ["b"] and list(wav.env) == [1] and list(wav.samples) == [1.0, 2.0]


# ---------------------------------------------------------------- compact waveform samples (PROTOCOL 1.1)

def _block(samples: object, **kw: object) -> dict:
    return {"metric": "pleth", "t0": T, "hz": 125, "samples": samples, **kw}


def test_compact_samples_decode_to_the_same_columns_as_numbers():
    import numpy as np

    values = [0.5, -0.25, 1.0, 0.125]  # exact in float32 and on the int16 grid of 1/1024
    forms = [
        _block(values),
        _block(np.asarray(values, "<f4").tobytes(), format="f32le"),
        _block((np.asarray(values) * 1024).astype("<i2").tobytes(), format="i16le", scale=1 / 1024),
        _block(((np.asarray(values) - 1) * 1024).astype("<i2").tobytes(), format="i16le", scale=1 / 1024, offset=1.0),
    ]
    cols = []
    for w in forms:
        d = decode(msgspec.msgpack.encode(env(waveforms=[w, _block([0.1, 0.2], t0=T + 40)])), content_type=None,
                   profiles=P)
        assert d.wav_len == [4, 2]
        cols.append(to_columns([d], [T])[1])
    for c in cols[1:]:
        assert c.samples.dtype == np.float64
        assert c.samples.tolist() == cols[0].samples.tolist() == values + [0.1, 0.2]
        assert c.offsets.tolist() == cols[0].offsets.tolist()


@pytest.mark.parametrize(("block", "reason"), [
    (_block(b"\x00\x00\x80\x3f"), "waveforms[0].format: required with binary samples (f32le or i16le)"),
    (_block(b"\x00\x00\x80", format="f32le"), "waveforms[0].samples: 3 bytes is not a whole number of f32le samples"),
    (_block(b"\x01\x00\x02", format="i16le", scale=1.0), "waveforms[0].samples: 3 bytes is not a whole number of i16le samples"),
    (_block(b"\x01\x00", format="i16le"), "waveforms[0].scale: required with format i16le"),
    (_block(b"\x01\x00", format="i16le", scale=0.0), "waveforms[0].scale: expected a finite number other than 0"),
    (_block(b"\x01\x00", format="i16le", scale=1.0, offset=float("inf")), "waveforms[0].offset: expected a finite number"),
    (_block(b"\x00\x00\x80\x3f", format="f32le", scale=2.0), "waveforms[0].scale: only with format i16le"),
    (_block([0.5], format="f32le"), "waveforms[0].format: only with binary samples"),
    (_block([0.5], scale=2.0), "waveforms[0].scale: only with binary samples"),
    (_block(b"", format="f32le"), "waveforms[0].samples: must not be empty"),
    (_block(b"\x00\x00\x80\x3f", format="f64le"), "waveforms[0].format: invalid enum value 'f64le'"),
    (_block("text"), "waveforms[0].samples: expected array of numbers or binary, got string"),
])
def test_compact_samples_rejects_name_the_field(block: dict, reason: str):
    assert reject(msgspec.msgpack.encode(env(waveforms=[block]))).reason == reason
