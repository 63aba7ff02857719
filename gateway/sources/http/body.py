"""Request bodies: bounded reads, gzip with a decompressed-size limit, one envelope or an array.

Memory stays bounded: a body is read chunk by chunk and refused (413) as soon as it
passes ``max_body_bytes``; gzip is inflated with ``max_length`` so a small bomb never
expands past the same limit plus one chunk.
"""

from __future__ import annotations

import asyncio
import zlib

import msgspec
from aiohttp import web

from .api import ApiError

__all__ = ["JSON_TYPES", "MSGPACK_TYPES", "media_type", "read_body", "gunzip", "split_envelopes"]

JSON_TYPES = frozenset({"application/json"})
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip"})
_JSON_LIST = msgspec.json.Decoder(list[msgspec.Raw])
_MSGPACK_LIST = msgspec.msgpack.Decoder(list[msgspec.Raw])
_JSON_WS = b" \t\r\n"


def media_type(request: web.Request) -> tuple[str, str]:
    """``(encoding, content type)``: ``json`` or ``msgpack`` from Content-Type; 415 otherwise.
    Also refuses a Content-Encoding other than gzip/identity (415)."""
    raw = request.headers.get("Content-Type", "")
    ct = raw.split(";", 1)[0].strip().lower()
    if ct in JSON_TYPES:
        kind = "json"
    elif ct in MSGPACK_TYPES:
        kind = "msgpack"
    else:
        shown = repr(ct) if ct else "missing"
        raise ApiError(415, f"content-type: {shown} is not supported; use application/json or application/msgpack")
    enc = request.headers.get("Content-Encoding", "").strip().lower()
    if enc not in _ENCODINGS:
        raise ApiError(415, f"content-encoding: {enc!r} is not supported; use gzip or none")
    return kind, ct


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, at most ``limit`` bytes (413 beyond, before reading when Content-Length
    says so), received within ``timeout_s`` (408 otherwise: a slow sender holds no handler)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, f"body: {declared} bytes exceeds the limit of {limit} bytes")
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(64 * 1024):
                buf += chunk
                if len(buf) > limit:
                    raise ApiError(413, f"body: more than the limit of {limit} bytes")
    except TimeoutError:
        raise ApiError(408, f"body: not received within {timeout_s:g} s", headers={"Connection": "close"}) from None
    return bytes(buf)


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate one gzip member, refusing (413) as soon as the output passes ``limit`` bytes."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while True:
            out += d.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise ApiError(413, f"body: decompresses to more than the limit of {limit} bytes")
            if d.eof or not d.unconsumed_tail:
                break
            pending = d.unconsumed_tail
    except zlib.error as exc:
        raise ApiError(400, f"body: invalid gzip data ({exc})") from None
    if not d.eof:
        raise ApiError(400, "body: gzip data is truncated")
    if d.unused_data.strip(b"\x00"):
        raise ApiError(400, "body: data after the end of the gzip stream (one gzip member expected)")
    return bytes(out)


def _is_array(body: bytes, kind: str) -> bool:
    if kind == "json":
        head = body.lstrip(_JSON_WS)[:1]
        return head == b"["
    first = body[0] if body else 0
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def split_envelopes(body: bytes, kind: str, max_envelopes: int) -> tuple[list[bytes], bool]:
    """``(payloads, is_array)``: the body itself, or the exact bytes of each array element.

    Each element keeps its own bytes, so an envelope posted alone, in an array, or again in
    a retry has the same SHA-256 and is stored once.
    """
    if not body:
        raise ApiError(400, "body: empty; send one envelope or an array of envelopes")
    if not _is_array(body, kind):
        return [body], False
    try:
        items = (_JSON_LIST if kind == "json" else _MSGPACK_LIST).decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        what = "JSON" if kind == "json" else "MessagePack"
        detail = str(exc).replace("JSON is malformed: ", "").replace("MessagePack data is malformed: ", "")
        raise ApiError(400, f"body: invalid {what}: {detail}") from None
    except RecursionError:
        raise ApiError(400, "body: nested too deeply") from None
    if not items:
        raise ApiError(400, "body: empty array; send at least one envelope")
    if len(items) > max_envelopes:
        raise ApiError(413, f"body: {len(items)} envelopes exceeds the limit of {max_envelopes} per request")
    return [bytes(memoryview(r)) for r in items], True
