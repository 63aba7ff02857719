"""PostgreSQL binary COPY streams built from numpy columns, without a per-row Python loop.

A binary COPY row is ``int16 field count`` then, per field, ``int32 length`` and the
value in network byte order. Rows here mix fixed-width fields (timestamps, numbers) and
variable-width ones (text from a small set of distinct strings, ``real[]`` arrays), so
each field becomes a flat byte array plus a per-row length, and one vectorized scatter
assembles the rows.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

__all__ = [
    "HEADER", "TRAILER", "PG_EPOCH_MS", "fixed", "timestamptz_ms", "text", "factorize", "encode_rows",
    "encode_reading_rows", "encode_waveform_rows",
]

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z in Unix epoch milliseconds
_FLOAT4_OID = 700

# A field: (per-row byte lengths, flat bytes of all rows, fixed width or 0)
Field = tuple[np.ndarray, np.ndarray, int]


def fixed(values: np.ndarray, dtype: str) -> Field:
    """A fixed-width field (``>i4``, ``>i8``, ``>f8``, ...), each value prefixed with its length."""
    n = len(values)
    width = np.dtype(dtype).itemsize
    rec = np.empty(n, dtype=[("len", ">i4"), ("v", dtype)])
    rec["len"] = width
    rec["v"] = values
    return np.full(n, width + 4, dtype=np.int64), rec.view(np.uint8), width + 4


def timestamptz_ms(ms: np.ndarray) -> Field:
    """``timestamptz`` from Unix epoch milliseconds (PostgreSQL counts microseconds from 2000)."""
    return fixed((np.asarray(ms, dtype=np.int64) - PG_EPOCH_MS) * 1000, ">i8")


def text(codes: np.ndarray, uniques: Sequence[str]) -> Field:
    """A text field given as codes into ``uniques`` (as from ``np.unique(..., return_inverse=True)``)."""
    encoded = [u.encode() for u in uniques]
    u_len = np.array([len(e) + 4 for e in encoded], dtype=np.int64)
    pool = b"".join(len(e).to_bytes(4, "big") + e for e in encoded)
    pool_arr = np.frombuffer(pool, dtype=np.uint8)
    u_start = np.zeros(len(encoded), dtype=np.int64)
    np.cumsum(u_len[:-1], out=u_start[1:])
    lengths = u_len[codes]
    flat = pool_arr[_ranges(u_start[codes], lengths)]
    return lengths, flat, 0


def factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes into a list of distinct strings (few distinct values, many rows)."""
    uniques, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), uniques.tolist()


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each (s, l), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    idx = np.ones(total, dtype=np.int64)
    nz = lengths > 0
    s, l, e = starts[nz], lengths[nz], ends[nz]
    idx[0] = s[0]
    # at each row boundary, jump from the previous row's last index to this row's start
    idx[(e - l)[1:]] = s[1:] - (s[:-1] + l[:-1] - 1)
    return np.cumsum(idx)


def encode_rows(fields: Sequence[Field], *, header: bool = True) -> bytes:
    """Assemble rows of the given fields into one binary COPY stream."""
    n = len(fields[0][0])
    row_len = np.full(n, 2, dtype=np.int64)
    for lengths, _, _ in fields:
        row_len += lengths
    row_start = np.zeros(n, dtype=np.int64)
    np.cumsum(row_len[:-1], out=row_start[1:])
    body = np.empty(int(row_len.sum()), dtype=np.uint8)
    count = np.array([len(fields)], dtype=">i2").view(np.uint8)
    body[(row_start[:, None] + np.arange(2)).ravel()] = np.tile(count, n)
    pos = row_start + 2
    for lengths, flat, width in fields:
        if width:
            body[(pos[:, None] + np.arange(width)).ravel()] = flat
        else:
            body[_ranges(pos, lengths)] = flat
        pos = pos + lengths
    parts = [HEADER] if header else []
    parts.append(body.tobytes())
    parts.append(TRAILER)
    return b"".join(parts)


def encode_reading_rows(
    t_ms: np.ndarray,
    device: tuple[np.ndarray, Sequence[str]],
    metric: np.ndarray,
    value: np.ndarray,
    flags: np.ndarray,
    ingest_id: np.ndarray,
) -> bytes:
    """Rows of ``readings`` (time, device_id, metric, value, flags, ingest_id).

    ``device`` is given as (codes, distinct names): the sink factorizes the batch's few
    envelopes rather than every reading.
    """
    mcodes, muniq = factorize(metric)
    return encode_rows([
        timestamptz_ms(t_ms),
        text(*device),
        text(mcodes, muniq),
        fixed(value, ">f8"),
        fixed(flags, ">i4"),
        fixed(ingest_id, ">i8"),
    ])


_WAVE_HEAD = struct.Struct(">hiq")  # field count, time length, time
_WAVE_HZ = struct.Struct(">id")
_WAVE_ARRAY = struct.Struct(">iiiiii")  # byte length, ndim, flags, element oid, dim, lower bound
_WAVE_TAIL = struct.Struct(">iiiq")  # flags length, flags, ingest length, ingest id


def encode_waveform_rows(
    t_ms: np.ndarray,
    device: Sequence[str],
    metric: Sequence[str],
    hz: np.ndarray,
    samples: np.ndarray,
    offsets: np.ndarray,
    flags: np.ndarray,
    ingest_id: np.ndarray,
) -> bytes:
    """Rows of ``waveform_blocks`` (time, device_id, metric, hz, samples real[], flags, ingest_id).

    One Python step per block (blocks carry tens to hundreds of samples each); the samples
    themselves are converted once, in one numpy operation, so memory stays proportional to
    the stream instead of to index arrays over every byte.
    """
    elems = np.empty(len(samples), dtype=[("len", ">i4"), ("v", ">f4")])
    elems["len"] = 4
    elems["v"] = samples
    eb = elems.tobytes()
    us = ((np.asarray(t_ms, dtype=np.int64) - PG_EPOCH_MS) * 1000).tolist()
    offs = np.asarray(offsets, dtype=np.int64).tolist()
    texts: dict[str, bytes] = {}

    def text_field(value: str) -> bytes:
        b = texts.get(value)
        if b is None:
            raw = value.encode()
            b = texts[value] = len(raw).to_bytes(4, "big") + raw
        return b

    parts = [HEADER]
    for i, (t, d, m, h, f, g) in enumerate(zip(us, device, metric, hz.tolist(), flags.tolist(), ingest_id.tolist())):
        start, end = offs[i], offs[i + 1]
        n = end - start
        parts.append(_WAVE_HEAD.pack(7, 8, t))
        parts.append(text_field(d))
        parts.append(text_field(m))
        parts.append(_WAVE_HZ.pack(8, h))
        parts.append(_WAVE_ARRAY.pack(20 + 8 * n, 1, 0, _FLOAT4_OID, n, 1))
        parts.append(eb[start * 8:end * 8])
        parts.append(_WAVE_TAIL.pack(4, f, 8, g))
    parts.append(TRAILER)
    return b"".join(parts)
