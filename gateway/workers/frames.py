"""Frames between workers: a 4-byte big-endian length, then a MessagePack ``Forward`` or ``Done``.

``Forward`` carries one payload and what the receiving transport knew about it: every
data field of ``RawMessage``, derived from the dataclass itself (fields marked
``model.LOCAL``, the ``ack``/``on_outcome`` callables, stay with the receiving process),
so a field added to ``RawMessage`` travels with ``--workers`` without being listed here.
``Done`` is the owner's answer after commit: an ``Outcome`` status (``stored``,
``duplicate``, ``rejected``) or ``refused`` (the owner is shutting down).
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
import struct
import typing
from pathlib import Path
from typing import Any

import msgspec

from gateway.model import RawMessage

__all__ = ["Forward", "Done", "ForwardCodec", "HEADER", "MAX_FRAME", "decoder", "frame", "forward_frame", "raw_of",
           "read_frame", "socket_path", "wire_fields"]

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def wire_fields(cls: type) -> list[tuple[str, Any]]:
    """``(name, type)`` of the dataclass fields of ``cls`` that travel: all but those marked local."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("local")]


class ForwardCodec:
    """The ``Forward`` struct of a ``RawMessage`` class: ``id`` and then its wire fields, in order."""

    def __init__(self, cls: type = RawMessage) -> None:
        fields = wire_fields(cls)
        self.cls = cls
        self.names = tuple(name for name, _ in fields)
        self.struct: type[msgspec.Struct] = msgspec.defstruct(
            "Forward", [("id", int), *fields], tag="f", array_like=True, module=__name__)
        getter = operator.attrgetter(*self.names)
        self._values = getter if len(self.names) > 1 else (lambda obj: (getter(obj),))

    def forward(self, fid: int, raw: Any) -> msgspec.Struct:
        return self.struct(fid, *self._values(raw))

    def raw(self, msg: Any, **local: Any) -> Any:
        """The payload a ``Forward`` carries, with this process's ``local`` fields (``on_outcome``)."""
        return self.cls(**dict(zip(self.names, self._values(msg))), **local)


_codec = ForwardCodec()
Forward = _codec.struct


class Done(msgspec.Struct, tag="d", array_like=True):
    """The owner's answer for one ``Forward``: its committed outcome, or ``refused``."""

    id: int
    status: str
    ingest_id: int | None = None
    reason: str | None = None


_encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Forward | Done)


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def forward_frame(fid: int, raw: RawMessage) -> bytes:
    return frame(_codec.forward(fid, raw))


def raw_of(msg: Any, **local: Any) -> RawMessage:
    """The ``RawMessage`` of a decoded ``Forward`` frame, with ``local`` fields set (``on_outcome``)."""
    return _codec.raw(msg, **local)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next ``Forward`` or ``Done``."""
    (n,) = HEADER.unpack(await reader.readexactly(4))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return decoder.decode(await reader.readexactly(n))


def socket_path(runtime_dir: str | Path, index: int) -> Path:
    return Path(runtime_dir) / f"w{index}.sock"
