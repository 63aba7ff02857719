"""Frames between workers: a 4-byte big-endian length, then a MessagePack ``Forward`` or ``Done``.

``Forward`` carries one payload and what the receiving transport knew about it;
``Done`` the owner's answer after commit: an ``Outcome`` status (``stored``,
``duplicate``, ``rejected``) or ``refused`` (the owner is shutting down).
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import msgspec

from gateway.model import RawMessage

__all__ = ["Forward", "Done", "HEADER", "MAX_FRAME", "decoder", "frame", "forward_frame", "read_frame", "socket_path"]

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class Forward(msgspec.Struct, tag="f", array_like=True):
    """A payload for the worker owning its device, with what the receiving transport knew."""

    id: int
    payload: bytes
    source: str
    principal: str | None
    topic: str
    received_at_ms: int
    content_type: str | None
    topic_device_id: str | None
    remote_addr: str | None


class Done(msgspec.Struct, tag="d", array_like=True):
    """The owner's answer for one ``Forward``: its committed outcome, or ``refused``."""

    id: int
    status: str
    ingest_id: int | None = None
    reason: str | None = None


_encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Forward | Done)


def frame(msg: Forward | Done) -> bytes:
    body = _encoder.encode(msg)
    return HEADER.pack(len(body)) + body


def forward_frame(fid: int, raw: RawMessage) -> bytes:
    return frame(Forward(fid, raw.payload, raw.source, raw.principal, raw.topic_or_path, raw.received_at_ms,
                          raw.content_type, raw.topic_device_id, raw.remote_addr))


async def read_frame(reader: asyncio.StreamReader) -> Forward | Done:
    (n,) = HEADER.unpack(await reader.readexactly(4))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return decoder.decode(await reader.readexactly(n))


def socket_path(runtime_dir: str | Path, index: int) -> Path:
    return Path(runtime_dir) / f"w{index}.sock"
