"""Hypothesis strategies for hostile telemetry payloads, as the bytes a device could send.

Each strategy draws ``(payload, content_type)``. Envelopes start from the contract's shape
and are then made hostile: deep nesting, huge and non-finite numbers, wrong encodings and
invalid UTF-8, oversize arrays, unicode and control characters in ids and metric names,
duplicated keys, MessagePack extension types, truncation and byte flips. JSON is written
by hand (``json_text``) because no encoder emits duplicate keys, ``NaN`` or 400-digit
integers.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
from hypothesis import strategies as st

__all__ = ["hostile_payload", "mutated_payload", "json_text", "FIELD_ROOTS", "PROFILE", "METRICS"]

PROFILE = "pulse_oximeter"
METRICS = ["spo2", "pulse_rate", "perfusion_index"]
WAVEFORMS = ["pleth"]
# the first segment of every field path a reject reason may start with
FIELD_ROOTS = {"payload", "content-type", "v", "device_id", "seq", "profile", "firmware", "sent_at", "numerics", "waveforms"}
T0 = (int(time.time()) - 3600) * 1000


class Raw:
    """Text spliced into JSON as it is (``NaN``, ``1e999``, a 400-digit integer, deep nesting)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs:
    """A JSON object written from a list of pairs: the same key may appear twice."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def json_text(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json_text(k)}:{json_text(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return json_text(Pairs(list(value.items())))
    if isinstance(value, list):
        return "[" + ",".join(json_text(v) for v in value) + "]"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return msgspec.json.encode(value).decode()


def _plain(value: Any) -> Any:
    """For MessagePack: Raw and Pairs become what msgpack can carry (duplicates collapse)."""
    if isinstance(value, Raw):
        try:
            return msgspec.json.decode(value.text)
        except (msgspec.DecodeError, RecursionError):
            return value.text
    if isinstance(value, Pairs):
        return {_plain(k) if not isinstance(k, str) else k: _plain(v) for k, v in value.pairs}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _weird_pool() -> list[str]:
    """Hostile strings, fixed; drawing from a pool costs a tenth of generating text per example."""
    rng = random.Random(20261206)
    pool = ["", " ", "po 1", "po\x00", "po\n1", "po\t1", "po-\u202e1", "\ufeffpo-1", "po-\u00e91", "\U0001fac0", "a" * 65,
            "a" * 64, "../../x", "$share/x", "devices/+/telemetry", "#", "po-1\r\n", "\x7f", "\u0000", "\ud7ff",
            "\uffff", "\U0010ffff", "\u0301", "ａｂｃ", "po-1 ", "PO-1", "vgd_0123456789abcdef_" + "s" * 43, "null",
            "__proto__", "constructor", "%s%n", "'; DROP TABLE readings; --", "\\", '"', "\u2028", "x" * 300]
    for _ in range(60):
        n = rng.randint(1, 12)
        pool.append("".join(chr(rng.choice([rng.randint(0, 0x7f), rng.randint(0x80, 0x7ff), rng.randint(0x800, 0xd7ff),
                                            rng.randint(0xe000, 0x10ffff)])) for _ in range(n)))
    return pool


weird_text = st.sampled_from(_weird_pool())
device_ids = st.sampled_from(["po-1", "po-2", "po.3_x"]) | weird_text
metric_names = st.sampled_from(METRICS + WAVEFORMS + ["SPO2", "spo2 ", "hr", ""]) | weird_text
huge_numbers = st.sampled_from([
    Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" * 400), Raw("-" + "9" * 40),
    Raw("1e-400"), Raw("0.0000000000000000000000001"), Raw("18446744073709551616"), Raw("-0"), Raw("1.5e308"),
    2**63, 2**64, -(2**63) - 1, float("nan"), float("inf"), -0.0, 1e308,
])
numbers = st.sampled_from([0, 1, 97, 97.5, -1, 70, 1e-9]) | st.floats(allow_nan=True, allow_infinity=True) | huge_numbers
values = numbers | st.sampled_from([None, True, False, [], [1, 2], {}, {"a": 1}]) | weird_text
timestamps = (st.sampled_from([T0, T0, T0 + 1000, 0, -1, 2**63, 2**64, -(2**63) - 1, 253_402_300_800_000])
              | st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z",
                                 "9999-12-31T23:59:59.999Z", "0000-01-01T00:00:00Z", "yesterday", ""])
              | st.sampled_from([0.5, float("nan"), None]))


def _deep(depth: int, leaf: str = "1") -> Raw:
    return Raw("[" * depth + leaf + "]" * depth)


deep = st.integers(50, 20_000).map(_deep) | st.integers(50, 5_000).map(lambda d: Raw('{"a":' * d + "1" + "}" * d))


@st.composite
def numeric(draw: st.DrawFn) -> Any:
    keys = draw(st.lists(metric_names, min_size=0, max_size=3))
    pairs: list[tuple[str, Any]] = [(k, draw(numbers if draw(st.booleans()) else values)) for k in keys]
    if pairs and draw(st.integers(0, 9)) == 0:
        pairs.append((pairs[0][0], draw(numbers)))  # duplicated key
    obj: list[tuple[str, Any]] = [("t", draw(timestamps)), ("values", Pairs(pairs))]
    if draw(st.integers(0, 9)) == 0:
        obj.append((draw(st.sampled_from(["values", "t", "extra"])), draw(values | deep)))
    return Pairs(obj)


@st.composite
def waveform(draw: st.DrawFn) -> Any:
    n = draw(st.integers(0, 4))
    samples: Any = [draw(numbers) for _ in range(n)]
    if draw(st.integers(0, 19)) == 0:
        samples = Raw("[" + ",".join(["0.5"] * draw(st.integers(10_000, 40_000))) + "]")  # oversize array
    return Pairs([("metric", draw(metric_names)), ("t0", draw(timestamps)),
                  ("hz", draw(st.sampled_from([125.0, 0.0, -1.0, 1e-300, 1e300]) | numbers)), ("samples", samples)])


@st.composite
def envelope(draw: st.DrawFn) -> Pairs:
    """An envelope close to the contract, with hostile parts drawn in."""
    fields: list[tuple[str, Any]] = [
        ("v", draw(st.sampled_from([1, 1, 1, 2, 0, -1, "1", 1.0, None]))),
        ("device_id", draw(device_ids)),
        ("seq", draw(st.integers(-1, 2**64) | st.none() | st.just("3"))),
        ("profile", draw(st.sampled_from([PROFILE, PROFILE, "ventilator", "nope", "", None]) | weird_text)),
        ("firmware", draw(st.none() | weird_text | st.just("x" * 200))),
        ("sent_at", draw(timestamps)),
        ("numerics", draw(st.lists(numeric(), max_size=3))),
        ("waveforms", draw(st.lists(waveform(), max_size=1))),
    ]
    fields = draw(st.lists(st.sampled_from(fields), min_size=0, max_size=len(fields), unique_by=lambda f: f[0])) \
        if draw(st.integers(0, 4)) == 0 else fields  # sometimes fields missing
    if draw(st.integers(0, 6)) == 0:  # duplicated top-level key
        key = draw(st.sampled_from(["device_id", "v", "numerics", "profile"]))
        fields.append((key, draw(device_ids if key == "device_id" else values)))
    if draw(st.integers(0, 6)) == 0:  # unknown fields, some nested deep
        fields.append((draw(weird_text), draw(values | deep)))
    if draw(st.integers(0, 9)) == 0:  # an oversize array of readings
        fields.append(("numerics", Raw("[" + ",".join([f'{{"t":{T0},"values":{{"spo2":97}}}}'] * draw(
            st.integers(1_000, 20_000))) + "]")))
    return Pairs(fields)


def _msgpack_ext(draw: st.DrawFn, value: Any) -> Any:
    """Replace a random part of a msgpack-able value with an extension type, bin, or a non-str key."""
    odd = draw(st.sampled_from([
        msgspec.msgpack.Ext(draw(st.integers(-128, 127)), draw(st.binary(max_size=12))),
        msgspec.msgpack.Ext(-1, b"\x00\x00\x00\x00"),  # the timestamp extension
        msgspec.msgpack.Ext(-1, b"\xff" * 12),  # a timestamp extension out of range
        b"\xff\xfe\x00",  # bin, not str
        {1: 2, b"k": 3},  # non-string keys
    ]))
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value, key=str)))
        return {**value, key: odd}
    return odd


@st.composite
def hostile_payload(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """``(payload, content_type)`` of any of the hostile kinds."""
    env = draw(envelope())
    kind = draw(st.sampled_from(["json", "json", "json", "msgpack", "msgpack", "msgpack-ext", "utf16", "latin1",
                                 "bad-utf8", "mutated", "truncated", "bytes", "deep"]))
    if kind in ("msgpack", "msgpack-ext"):
        value = _plain(env)
        if kind == "msgpack-ext":
            value = _msgpack_ext(draw, value)
            if isinstance(value, dict) and isinstance(value.get("numerics"), list) and value["numerics"]:
                first = value["numerics"][0]
                value["numerics"][0] = _msgpack_ext(draw, first if isinstance(first, dict) else {})
        try:
            payload = msgspec.msgpack.encode(value)
        except (TypeError, OverflowError, ValueError):  # an int beyond 64 bits: send it as JSON text
            payload = json_text(env).encode()
        content_type = draw(st.sampled_from(["application/msgpack", "application/x-msgpack", None]))
        return payload, content_type
    text = json_text(env)
    content_type = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", None, "text/json"]))
    if kind == "utf16":
        return text.encode("utf-16"), content_type
    if kind == "latin1":
        return text.replace("po-", "p\u00f6-").encode("latin-1", errors="replace"), content_type
    payload = text.encode("utf-8", errors="surrogatepass")
    if kind == "bad-utf8":
        at = draw(st.integers(0, len(payload)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]))
        return payload[:at] + bad + payload[at:], content_type
    if kind == "mutated":
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), content_type
    if kind == "truncated":
        return payload[: draw(st.integers(0, max(0, len(payload) - 1)))], content_type
    if kind == "bytes":
        return draw(st.binary(max_size=64)), draw(st.sampled_from([None, "application/json", "application/msgpack",
                                                                     "text/plain", "application/cbor"]))
    return draw(deep).text.encode(), content_type  # deep nesting as the whole payload


def _corpus() -> list[tuple[bytes, str]]:
    """Valid envelopes (numerics, waveforms, both; JSON and MessagePack), seeded: the start of mutations."""
    rng = random.Random(7)
    out: list[tuple[bytes, str]] = []
    for i in range(64):
        env: dict[str, Any] = {"v": 1, "device_id": f"po-{i % 5}", "seq": i, "profile": PROFILE, "firmware": "2.4.1",
                               "sent_at": T0 + i * 1000}
        if i % 3 != 2:
            env["numerics"] = [{"t": T0 + i * 1000 + k, "values": {m: round(rng.uniform(50, 100), 1) for m in METRICS[:1 + k]}}
                               for k in range(1 + i % 3)]
        if i % 3 != 0:
            env["waveforms"] = [{"metric": "pleth", "t0": T0 + i * 1000, "hz": 125.0,
                                 "samples": [round(rng.uniform(-1, 1), 3) for _ in range(1 + i % 40)]}]
        if i % 2:
            out.append((msgspec.msgpack.encode(env), "application/msgpack"))
        else:
            out.append((msgspec.json.encode(env), "application/json"))
    return out


CORPUS = _corpus()
_SPLICES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"NaN", b"1e999", b'"', b"{", b"]", b",", b"\xc1", b"\xd4\x01\x00",
            b"\xc7\x05\x01hello", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",
            b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd6\xff\x00\x00\x00\x00", b"\xa4po-1", b'"device_id":"po-9",']


@st.composite
def mutated_payload(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A valid payload with bytes flipped, spliced in (invalid UTF-8, MessagePack ext and huge headers), cut or repeated.

    Cheap to draw (a handful of choices), so it carries most of the fuzz run's examples.
    """
    payload, content_type = draw(st.sampled_from(CORPUS))
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            data[at:at] = draw(st.sampled_from(_SPLICES))
        elif op == 2:
            del data[at:at + draw(st.integers(1, 16))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(2, 4))
    return bytes(data), draw(st.sampled_from([content_type, None]))
