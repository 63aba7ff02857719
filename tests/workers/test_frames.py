"""Every data field of RawMessage travels through a Forward frame; only the callables stay local."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable

import msgspec
import pytest

from gateway.model import RawMessage
from gateway.workers.frames import HEADER, Done, ForwardCodec, decoder, forward_frame, frame, raw_of

# A value unlike the default for each field type of RawMessage. A field of a new type has
# no sample here and fails the test until one is added, so every field is proven to travel.
SAMPLES: dict[object, Callable[[str], object]] = {
    bytes: lambda name: b"\x00\xff" + name.encode(),
    str: lambda name: f"sample-{name}",
    int: lambda name: 1_700_000_000_000 + len(name),
    str | None: lambda name: f"sample-{name}",
    typing.Literal["mqtt", "https", "replay"]: lambda name: "https",
}


def sample_message(cls: type = RawMessage, **local: object) -> RawMessage:
    values = {}
    hints = typing.get_type_hints(cls)
    for name, typ in ((f.name, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("local")):
        if typ not in SAMPLES:
            pytest.fail(f"RawMessage.{name}: no sample value for {typ}; add one to SAMPLES")
        values[name] = SAMPLES[typ](name)
    return cls(**values, **local)


def roundtrip(raw: RawMessage) -> RawMessage:
    data = forward_frame(7, raw)
    (n,) = HEADER.unpack_from(data)
    assert n == len(data) - 4
    msg = decoder.decode(data[4:])
    assert msg.id == 7
    return raw_of(msg)


def test_every_data_field_of_raw_message_travels():
    raw = sample_message(ack=lambda: None, on_outcome=lambda o: None)
    back = roundtrip(raw)
    for f in dataclasses.fields(RawMessage):
        if f.metadata.get("local"):
            assert getattr(back, f.name) is None, f"{f.name} is local: it must not travel"
        else:
            assert getattr(back, f.name) == getattr(raw, f.name), f"RawMessage.{f.name} is lost in a Forward frame"


def test_only_callables_stay_local():
    hints = typing.get_type_hints(RawMessage)
    local = [f.name for f in dataclasses.fields(RawMessage) if f.metadata.get("local")]
    assert local == ["ack", "on_outcome"]
    for name in local:
        assert typing.get_origin(typing.get_args(hints[name])[0]) is Callable, f"{name} is data: it must travel"


def test_a_field_added_to_raw_message_travels_without_listing_it():
    @dataclasses.dataclass(slots=True)
    class Extended(RawMessage):
        hops: int = 0
        tenant: str | None = None

    codec = ForwardCodec(Extended)
    assert codec.names[-2:] == ("hops", "tenant")
    raw = sample_message(Extended)
    assert raw.hops and raw.tenant
    body = frame(codec.forward(3, raw))[4:]
    import msgspec
    back = codec.raw(msgspec.msgpack.decode(body, type=codec.struct))
    assert back == raw


def test_defaults_and_nones_travel_too():
    raw = RawMessage(b"{}", "mqtt", None, "devices/a/telemetry", 1)
    assert roundtrip(raw) == raw


def test_done_frames_decode():
    assert decoder.decode(frame(Done(4, "stored", 99))[4:]) == Done(4, "stored", 99, None)
