"""COPY input for the two hypertables, each in the form that measured fastest.

``waveform_blocks``: a binary COPY stream built here. Each block is one row whose
``real[]`` array is taken from one numpy conversion of all samples, with one ``struct``
pack per block for the rest; asyncpg's ``copy_records_to_table`` would need a Python list
per block and encodes each sample on its own.

``readings``: row tuples for asyncpg's ``copy_records_to_table``, with ``time`` given as
microseconds since 2000 (the connection's ``timestamptz`` codec, ``TIMESTAMPTZ_AS_US``).
A numpy-built binary stream for readings was measured too and lost, so it was removed.

Measured with ``python -m bench.copybin`` (7 repeats, medians; 2 cores, shared machine;
client CPU = this process's CPU for encode + COPY)::

    batch   table            method      rows  client CPU ms  wall ms   rows/s
    stress  readings         numpy bin  20000          36.5    185.2  107,988
    stress  readings         asyncpg    20000          16.6    124.3  160,846
    icu     readings         numpy bin   5000           4.6     31.5  158,606
    icu     readings         asyncpg     5000           3.9     29.1  171,710
    icu     waveform_blocks  copybin     1500           9.3     27.5   54,511
    icu     waveform_blocks  asyncpg     1500          69.3    125.0   12,003
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["HEADER", "TRAILER", "PG_EPOCH_MS", "TIMESTAMPTZ_AS_US", "reading_records", "ranges", "encode_waveform_rows"]

HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
PG_EPOCH_MS = 946_684_800_000  # 2000-01-01T00:00:00Z in Unix epoch milliseconds
_FLOAT4_OID = 700

# ``Connection.set_type_codec`` arguments: timestamptz in and out as an int of microseconds
# since 2000, its binary form (a datetime per row would cost more than the row's encoding).
TIMESTAMPTZ_AS_US: dict[str, Any] = {
    "typename": "timestamptz", "schema": "pg_catalog", "format": "tuple",
    "encoder": lambda us: (us,), "decoder": lambda t: t[0],
}


def _us(t_ms: np.ndarray) -> list[int]:
    return ((np.asarray(t_ms, dtype=np.int64) - PG_EPOCH_MS) * 1000).tolist()


def reading_records(
    t_ms: np.ndarray, device: np.ndarray, metric: np.ndarray, value: np.ndarray, flags: np.ndarray, ingest_id: np.ndarray
) -> Iterator[tuple[int, str, str, float, int, int]]:
    """Rows of ``readings`` (time, device_id, metric, value, flags, ingest_id) for a connection
    with ``TIMESTAMPTZ_AS_US``."""
    return zip(_us(t_ms), device.tolist(), metric.tolist(), value.tolist(), flags.tolist(), ingest_id.tolist())


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
