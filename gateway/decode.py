"""Bytes -> validated envelope, or a ``RejectError`` whose reason names the field.

Decoders are built once and reused (msgspec typed decoding). Validation that depends on
the device profile (metric names and kinds, finiteness, at least one reading, topic
binding) happens here too, so that everything after this module can trust its input.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain

import msgspec
import numpy as np

from gateway.errors import IdentityError, RejectError
from gateway.model import Envelope, NumericColumns, Waveform, WaveformColumns
from gateway.profiles import Profile
from gateway.reasons import name as _name
from gateway.reasons import name_dict_key as _name_dict_key
from gateway.reasons import peek_device_id as _peek_device_id
from gateway.reasons import reason_from as _reason_from

__all__ = ["Decoded", "decode", "encoding_of", "to_columns", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 256 * 1024
_JSON = msgspec.json.Decoder(Envelope)
_MSGPACK = msgspec.msgpack.Decoder(Envelope)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MAX_MS = 253_402_300_799_999  # end of year 9999
_MS = 1000

_JSON_TYPES = {"application/json", "text/json"}
_MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}


@dataclass(slots=True)
class Decoded:
    """A valid envelope with what the pipeline needs from it, flattened per reading."""

    envelope: Envelope
    profile: Profile
    encoding: str
    sha256: bytes
    payload_bytes: int
    # numeric readings of this envelope, in array order
    num_t: list[int]
    num_metric: list[str]
    num_value: list[float]
    # waveform blocks of this envelope
    wav_metric: list[str]
    wav_t0: list[int]
    wav_hz: list[float]
    wav_len: list[int]
    wav_samples: list[list[float] | np.ndarray]  # per block: the numbers as sent, or decoded binary (float64)

    @property
    def device_id(self) -> str:
        return self.envelope.device_id

    @property
    def n_numeric(self) -> int:
        return len(self.num_t)

    @property
    def n_samples(self) -> int:
        return sum(self.wav_len)

    @property
    def latest_t(self) -> int:
        """The latest reading time (numeric t or waveform block end), epoch ms."""
        ends = [t0 + int(math.ceil((n - 1) * _MS / hz)) for t0, hz, n in zip(self.wav_t0, self.wav_hz, self.wav_len)]
        return max(chain(self.num_t, ends))


def encoding_of(payload: bytes, content_type: str | None) -> str:
    """``json`` or ``msgpack``: from the content type when given, else from the first byte."""
    if content_type:
        ct = content_type.split(";", 1)[0].strip().lower()
        if ct in _JSON_TYPES:
            return "json"
        if ct in _MSGPACK_TYPES:
            return "msgpack"
        raise RejectError(f"content-type: unsupported {ct!r}, expected application/json or application/msgpack")
    if payload and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):
        return "msgpack"
    return "json"


_NUMERIC_NAMES: dict[int, tuple[Profile, frozenset[str]]] = {}


def _numeric_names(profile: Profile) -> frozenset[str]:
    """The profile's numeric metric names, cached per loaded profile object (kept alive by the cache)."""
    hit = _NUMERIC_NAMES.get(id(profile))
    if hit is None or hit[0] is not profile:
        hit = _NUMERIC_NAMES[id(profile)] = (profile, frozenset(k for k, m in profile.metrics.items() if m.kind == "numeric"))
    return hit[1]


def _ms(t: int | datetime) -> int:
    if type(t) is int:
        return t
    return (t - _EPOCH) // _ONE_MS  # type: ignore[operator]


_ONE_MS = __import__("datetime").timedelta(milliseconds=1)


def decode(
    payload: bytes,
    *,
    content_type: str | None,
    profiles: Mapping[str, Profile],
    default_profile: str | None | Callable[[str], str | None] = None,
    topic_device_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Decoded:
    """Decode and validate one envelope; raise ``RejectError`` naming the field at fault.

    ``default_profile`` is the profile of an envelope that names none; a callable is called
    with the envelope's ``device_id`` for every envelope, once its identity is checked
    against the topic (the device registry: it may raise ``IdentityError`` to refuse it).
    """
    size = len(payload)
    if size > max_bytes:
        raise RejectError(f"payload: {size} bytes exceeds the limit of {max_bytes} bytes", topic_device_id)
    if size == 0:
        raise RejectError("payload: empty", topic_device_id)
    try:
        encoding = encoding_of(payload, content_type)
    except RejectError as exc:  # keep the device the topic names on the reject
        raise RejectError(exc.reason, topic_device_id) from None
    try:
        env = (_MSGPACK if encoding == "msgpack" else _JSON).decode(payload)
    except msgspec.ValidationError as exc:
        reason = _name_dict_key(_reason_from(exc), payload, encoding)
        raise RejectError(reason, topic_device_id or _peek_device_id(payload, encoding)) from None
    except UnicodeDecodeError:
        raise RejectError("payload: a string is not valid UTF-8", topic_device_id) from None
    except RecursionError:
        raise RejectError("payload: nested too deeply", topic_device_id) from None
    except msgspec.DecodeError as exc:
        if "Invalid UTF-8" in str(exc):  # msgspec >= 0.19 reports it as malformed input
            raise RejectError("payload: a string is not valid UTF-8", topic_device_id) from None
        what = "MessagePack" if encoding == "msgpack" else "JSON"
        detail = str(exc).replace("JSON is malformed: ", "").replace("MessagePack data is malformed: ", "")
        raise RejectError(f"payload: invalid {what}: {detail}", topic_device_id) from None
    dev = env.device_id
    if topic_device_id is not None and dev != topic_device_id:
        raise IdentityError(
            f"device_id: {dev!r} does not match the device id {topic_device_id!r} of the topic", topic_device_id,
            action="identity.mismatch", target=dev,
        )
    if callable(default_profile):
        default_profile = default_profile(dev)
    if env.v != 1:
        raise RejectError(f"v: unsupported envelope version {env.v}, expected 1", dev)
    if env.firmware is not None and "\x00" in env.firmware:
        raise RejectError("firmware: must not contain NUL characters", dev)
    pname = env.profile if env.profile is not None else default_profile
    if pname is None:
        raise RejectError("profile: required, the device has no registered profile", dev)
    profile = profiles.get(pname)
    if profile is None:
        raise RejectError(f"profile: unknown profile {pname!r}", dev)
    if not env.numerics and not env.waveforms:
        raise RejectError("numerics: at least one reading is required (numerics and waveforms are both empty)", dev)

    metrics = profile.metrics
    numeric_names = _numeric_names(profile)
    num_t: list[int] = []
    num_metric: list[str] = []
    num_value: list[float] = []
    for i, n in enumerate(env.numerics):
        values = n.values
        if not values:
            raise RejectError(f"numerics[{i}].values: must name at least one metric", dev)
        if not values.keys() <= numeric_names:  # set check in C; the loop below only builds the reason
            name = next(k for k in values if k not in numeric_names)
            if name not in metrics:
                raise RejectError(f"numerics[{i}].values.{_name(name)}: unknown metric for profile {pname!r}", dev)
            raise RejectError(f"numerics[{i}].values.{_name(name)}: {name!r} is a waveform metric, send it in waveforms", dev)
        vals = values.values()
        if not math.isfinite(sum(vals)):
            for name, v in values.items():
                if not math.isfinite(v):
                    raise RejectError(f"numerics[{i}].values.{_name(name)}: expected a finite number, got {v}", dev)
        num_t.extend([_ms(n.t)] * len(values))
        num_metric.extend(values.keys())
        num_value.extend(vals)

    wav_metric: list[str] = []
    wav_t0: list[int] = []
    wav_hz: list[float] = []
    wav_len: list[int] = []
    wav_samples: list[list[float] | np.ndarray] = []
    for i, w in enumerate(env.waveforms):
        spec = metrics.get(w.metric)
        if spec is None:
            raise RejectError(f"waveforms[{i}].metric: unknown metric {w.metric!r} for profile {pname!r}", dev)
        if spec.kind != "waveform":
            raise RejectError(f"waveforms[{i}].metric: {w.metric!r} is a numeric metric, send it in numerics", dev)
        samples = w.samples
        if type(samples) is list:
            if w.format is not None or w.scale is not None or w.offset is not None:
                what = "format" if w.format is not None else "scale" if w.scale is not None else "offset"
                raise RejectError(f"waveforms[{i}].{what}: only with binary samples", dev)
        else:
            samples = _binary_samples(i, w, dev)
        if not len(samples):
            raise RejectError(f"waveforms[{i}].samples: must not be empty", dev)
        if not math.isfinite(w.hz):
            raise RejectError(f"waveforms[{i}].hz: expected a finite number > 0", dev)
        t0 = _ms(w.t0)
        if t0 + (len(samples) - 1) * _MS / w.hz > _MAX_MS:
            raise RejectError(f"waveforms[{i}].hz: too low, the block would end after 9999-12-31", dev)
        wav_metric.append(w.metric)
        wav_t0.append(t0)
        wav_hz.append(w.hz)
        wav_len.append(len(samples))
        wav_samples.append(samples)

    return Decoded(
        envelope=env,
        profile=profile,
        encoding=encoding,
        sha256=hashlib.sha256(payload).digest(),
        payload_bytes=size,
        num_t=num_t,
        num_metric=num_metric,
        num_value=num_value,
        wav_metric=wav_metric,
        wav_t0=wav_t0,
        wav_hz=wav_hz,
        wav_len=wav_len,
        wav_samples=wav_samples,
    )


_SAMPLE_TYPES = {"f32le": np.dtype("<f4"), "i16le": np.dtype("<i2")}


def _binary_samples(i: int, w: Waveform, dev: str) -> np.ndarray:
    """The compact form (PROTOCOL 1.1): little-endian float32, or int16 with scale and offset, as float64."""
    raw = w.samples
    fmt = w.format
    if fmt is None:
        raise RejectError(f"waveforms[{i}].format: required with binary samples (f32le or i16le)", dev)
    dtype = _SAMPLE_TYPES[fmt]
    if len(raw) % dtype.itemsize:  # type: ignore[arg-type]
        raise RejectError(f"waveforms[{i}].samples: {len(raw)} bytes is not a whole number of {fmt} samples", dev)
    values = np.frombuffer(raw, dtype=dtype)  # type: ignore[call-overload]
    if fmt == "f32le":
        if w.scale is not None or w.offset is not None:
            raise RejectError(f"waveforms[{i}].{'scale' if w.scale is not None else 'offset'}: only with format i16le", dev)
        return values.astype(np.float64)
    scale, offset = w.scale, 0.0 if w.offset is None else w.offset
    if scale is None:
        raise RejectError(f"waveforms[{i}].scale: required with format i16le", dev)
    if not math.isfinite(scale) or scale == 0:
        raise RejectError(f"waveforms[{i}].scale: expected a finite number other than 0", dev)
    if not math.isfinite(offset):
        raise RejectError(f"waveforms[{i}].offset: expected a finite number", dev)
    return values * scale + offset


def to_columns(items: Sequence[Decoded], received_at_ms: Sequence[int]) -> tuple[NumericColumns, WaveformColumns]:
    """Concatenate decoded envelopes into the column batches the checks and the sink use."""
    if not items:
        return NumericColumns.empty(), WaveformColumns.empty()
    n_num = np.fromiter((len(d.num_t) for d in items), dtype=np.int64, count=len(items))
    n_wav = np.fromiter((len(d.wav_t0) for d in items), dtype=np.int64, count=len(items))
    devices = np.array([d.envelope.device_id for d in items], dtype=object)
    profiles = np.array([d.profile.name for d in items], dtype=object)
    recv = np.asarray(received_at_ms, dtype=np.int64)
    env_idx = np.arange(len(items), dtype=np.int32)

    num = NumericColumns(
        device=np.repeat(devices, n_num),
        metric=np.array(list(chain.from_iterable(d.num_metric for d in items)), dtype=object),
        profile=np.repeat(profiles, n_num),
        t=np.fromiter(chain.from_iterable(d.num_t for d in items), dtype=np.int64, count=int(n_num.sum())),
        value=np.fromiter(chain.from_iterable(d.num_value for d in items), dtype=np.float64, count=int(n_num.sum())),
        received_at=np.repeat(recv, n_num),
        env=np.repeat(env_idx, n_num),
    )
    total_blocks = int(n_wav.sum())
    if total_blocks == 0:
        return num, WaveformColumns.empty()
    lens = np.fromiter(chain.from_iterable(d.wav_len for d in items), dtype=np.int64, count=total_blocks)
    offsets = np.zeros(total_blocks + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    samples = _concat_samples(items)
    wav = WaveformColumns(
        device=np.repeat(devices, n_wav),
        metric=np.array(list(chain.from_iterable(d.wav_metric for d in items)), dtype=object),
        profile=np.repeat(profiles, n_wav),
        t0=np.fromiter(chain.from_iterable(d.wav_t0 for d in items), dtype=np.int64, count=total_blocks),
        hz=np.fromiter(chain.from_iterable(d.wav_hz for d in items), dtype=np.float64, count=total_blocks),
        received_at=np.repeat(recv, n_wav),
        env=np.repeat(env_idx, n_wav),
        offsets=offsets,
        samples=samples,
    )
    return num, wav


def _concat_samples(items: Sequence[Decoded]) -> np.ndarray:
    """Every block's samples, concatenated in order, as float64: runs of number arrays
    through one ``np.fromiter`` each (measured faster than ``np.array`` of the joined
    lists), binary blocks as the arrays they already are."""
    chunks: list[np.ndarray] = []
    run: list[list[float]] = []
    n = 0
    for d in items:
        for s in d.wav_samples:
            if type(s) is list:
                run.append(s)
                n += len(s)
            else:
                if run:
                    chunks.append(np.fromiter(chain.from_iterable(run), dtype=np.float64, count=n))
                    run, n = [], 0
                chunks.append(s)  # type: ignore[arg-type]
    if run or not chunks:
        chunks.append(np.fromiter(chain.from_iterable(run), dtype=np.float64, count=n))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
