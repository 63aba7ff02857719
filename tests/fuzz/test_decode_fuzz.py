"""decode() against hostile payloads: a reject naming the field, or a valid envelope; nothing else.

The bulk of the fuzzing runs here, where decoding costs microseconds and drawing the
example most of the time: 10,500 examples over four tests, most of them byte-level
mutations of valid payloads (cheap to draw), the rest structured hostile envelopes. ``pytest`` prints the count at the end (tests/fuzz/conftest.py).
"""

from __future__ import annotations

import math
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.decode import DEFAULT_MAX_BYTES, Decoded, decode
from gateway.errors import IdentityError, RejectError
from gateway.model import DEVICE_ID_PATTERN
from gateway.profiles import load_profiles
from tests.fuzz.conftest import EXAMPLES, FUZZ, OUTCOMES
from tests.fuzz.strategies import FIELD_ROOTS, PROFILE, envelope, hostile_payload, json_text, mutated_payload
from tests.harness import PROFILES

P = load_profiles(PROFILES)
_ROOT = re.compile(r"^([a-z_-]+)(?:\[\d+\]|\.|:)")
_DEVICE = re.compile(DEVICE_ID_PATTERN)


def check(payload: bytes, content_type: str | None, *, topic_device_id: str | None = None,
          max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Decode; assert the outcome is a field-naming reject or a valid envelope; return which."""
    try:
        d = decode(payload, content_type=content_type, profiles=P, default_profile=None,
                   topic_device_id=topic_device_id, max_bytes=max_bytes)
    except RejectError as exc:
        m = _ROOT.match(exc.reason)
        assert m and m.group(1) in FIELD_ROOTS, f"reason names no field: {exc.reason!r}"
        assert ": " in exc.reason and exc.reason.split(": ", 1)[1].strip(), exc.reason
        assert exc.device_id is None or _DEVICE.fullmatch(exc.device_id), exc.device_id
        if topic_device_id is not None:
            assert exc.device_id == topic_device_id
        return "identity" if isinstance(exc, IdentityError) else "rejected"
    assert isinstance(d, Decoded)
    env = d.envelope
    assert env.v == 1 and _DEVICE.fullmatch(env.device_id) and d.profile.name in P
    assert topic_device_id is None or env.device_id == topic_device_id
    assert d.n_numeric + len(d.wav_len) > 0
    assert all(math.isfinite(v) for v in d.num_value) and all(math.isfinite(h) and h > 0 for h in d.wav_hz)
    assert set(d.num_metric) <= {k for k, m in d.profile.metrics.items() if m.kind == "numeric"}
    assert set(d.wav_metric) <= {k for k, m in d.profile.metrics.items() if m.kind == "waveform"}
    assert len(d.num_t) == len(d.num_metric) == len(d.num_value) and all(n > 0 for n in d.wav_len)
    assert d.payload_bytes == len(payload) <= max_bytes
    return "stored"


@settings(FUZZ, max_examples=1500)
@given(hostile_payload())
def test_decoder_answers_every_hostile_payload_with_a_named_field_or_an_envelope(case):
    payload, content_type = case
    EXAMPLES["decode"] += 1
    OUTCOMES[check(payload, content_type)] += 1


@settings(FUZZ, max_examples=500)
@given(hostile_payload(), st.sampled_from(["po-1", "po-2", "po.3_x"]), st.sampled_from([1024, 4096, DEFAULT_MAX_BYTES]))
def test_decoder_with_a_topic_identity_and_a_small_size_limit(case, topic_device, max_bytes):
    payload, content_type = case
    EXAMPLES["decode-topic"] += 1
    OUTCOMES[check(payload, content_type, topic_device_id=topic_device, max_bytes=max_bytes)] += 1


@settings(FUZZ, max_examples=8000)
@given(mutated_payload())
def test_decoder_answers_every_mutation_of_a_valid_payload(case):
    payload, content_type = case
    EXAMPLES["decode-mutated"] += 1
    OUTCOMES[check(payload, content_type)] += 1


@settings(FUZZ, max_examples=500)
@given(envelope())
def test_json_and_msgpack_of_the_same_envelope_get_the_same_answer(env):
    """Where an envelope is representable in both encodings, both are stored or both rejected for the same field."""
    EXAMPLES["decode-both"] += 1
    text = json_text(env)
    try:
        value = msgspec.json.decode(text)  # the JSON as a plain value (duplicates collapse, as in JSON)
        packed = msgspec.msgpack.encode(value)
    except (msgspec.DecodeError, OverflowError, TypeError, ValueError, RecursionError):  # NaN, huge ints, deep: JSON only
        OUTCOMES[check(text.encode(), "application/json")] += 1
        return
    outcomes, reasons = [], []
    for payload, ct in ((msgspec.json.encode(value), "application/json"), (packed, "application/msgpack")):
        try:
            decode(payload, content_type=ct, profiles=P)
            outcomes.append("stored")
        except RejectError as exc:
            outcomes.append(exc.reason.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0])
            reasons.append(exc.reason)
    OUTCOMES["stored" if outcomes[0] == "stored" else "rejected"] += 1
    if outcomes[0] != outcomes[1] and "payload: nested too deeply" in reasons and "stored" not in outcomes:
        # Nesting near the interpreter's recursion limit: where each decoder gives up depends on
        # the stack depth it was called at, so one may name the depth and the other the first
        # field it found wrong. Both refuse the payload naming a reason, which is the contract.
        return
    if outcomes[0] != outcomes[1] and any(r.startswith("payload: ") and "exceeds the limit" in r for r in reasons):
        # The size limit is on the bytes received, and the same envelope takes fewer bytes as
        # MessagePack: near the limit one encoding is refused for its size while the other is
        # decoded and judged on its fields (found at 262,146 JSON bytes against 262,144).
        return
    assert outcomes[0] == outcomes[1], outcomes


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deep_nesting_anywhere_is_a_reject_or_ignored(depth):
    deep = "[" * depth + "]" * depth
    base = '{"v":1,"device_id":"po-1","profile":"%s","numerics":[{"t":1700000000000,"values":{"spo2":97}}]' % PROFILE
    for payload in (deep.encode(), f'{base},"x":{deep}}}'.encode(), f'{base},"numerics":{deep}}}'.encode()):
        check(payload, "application/json", max_bytes=10**6)
    packed = b"\x91" * depth + b"\x90"  # msgpack arrays of one array ...
    check(b"\x85\xa1v\x01\xa9device_id\xa4po-1\xa7profile\xae" + PROFILE.encode()
          + b"\xa8numerics\x91\x82\xa1t\xcf\x00\x00\x01\x8b\xcf\xe5h\x00\xa6values\x81\xa4spo2\x61\xa1x" + packed,
          "application/msgpack", max_bytes=10**6)


def test_found_by_fuzzing_an_unsupported_content_type_keeps_the_topic_device():
    with pytest.raises(RejectError) as info:
        decode(b"\x00", content_type="text/plain", profiles=P, topic_device_id="po-1")
    assert info.value.device_id == "po-1" and info.value.reason.startswith("content-type: unsupported 'text/plain'")
