"""The numpy-built binary COPY stream equals a plain struct-packed reference, row by row."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sinks import copybin


def reference(rows: list[tuple[int, str, str, float, int, int]]) -> bytes:
    out = [copybin.HEADER]
    for t, dev, met, val, flg, ing in rows:
        out.append(struct.pack(">h", 6))
        out.append(struct.pack(">iq", 8, (t - copybin.PG_EPOCH_MS) * 1000))
        for s in (dev, met):
            b = s.encode()
            out.append(struct.pack(">i", len(b)) + b)
        out.append(struct.pack(">id", 8, val))
        out.append(struct.pack(">ii", 4, flg))
        out.append(struct.pack(">iq", 8, ing))
    out.append(copybin.TRAILER)
    return b"".join(out)


names = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 253402300799999), names, names,
                          st.floats(allow_nan=False), st.integers(-2**31, 2**31 - 1), st.integers(0, 2**62)),
                min_size=1, max_size=40))
def test_rows_match_reference(rows):
    def factorize(col):
        uniq = list(dict.fromkeys(col))
        return np.array([uniq.index(v) for v in col]), uniq

    cols = list(zip(*rows))
    dc, du = factorize(cols[1])
    mc, mu = factorize(cols[2])
    got = copybin.encode_rows([
        copybin.timestamptz_ms(np.array(cols[0], dtype=np.int64)),
        copybin.text(dc, du),
        copybin.text(mc, mu),
        copybin.fixed(np.array(cols[3]), ">f8"),
        copybin.fixed(np.array(cols[4], dtype=np.int32), ">i4"),
        copybin.fixed(np.array(cols[5], dtype=np.int64), ">i8"),
    ])
    assert got == reference(rows)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 253402300799999), names, names, st.floats(min_value=0.001, max_value=1e4),
                          st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=20),
                          st.integers(0, 255), st.integers(0, 2**62)), min_size=1, max_size=12))
def test_waveform_rows_match_reference(rows):
    out = [copybin.HEADER]
    for t, dev, met, hz, samples, flg, ing in rows:
        out.append(struct.pack(">h", 7))
        out.append(struct.pack(">iq", 8, (t - copybin.PG_EPOCH_MS) * 1000))
        for s in (dev, met):
            b = s.encode()
            out.append(struct.pack(">i", len(b)) + b)
        out.append(struct.pack(">id", 8, hz))
        body = struct.pack(">iiiii", 1, 0, 700, len(samples), 1) + b"".join(struct.pack(">if", 4, v) for v in samples)
        out.append(struct.pack(">i", len(body)) + body)
        out.append(struct.pack(">ii", 4, flg))
        out.append(struct.pack(">iq", 8, ing))
    out.append(copybin.TRAILER)
    lens = [len(r[4]) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    got = copybin.encode_waveform_rows(
        np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows], [r[2] for r in rows],
        np.array([r[3] for r in rows]), np.array([v for r in rows for v in r[4]]), offsets,
        np.array([r[5] for r in rows], dtype=np.int32), np.array([r[6] for r in rows], dtype=np.int64),
    )
    assert got == b"".join(out)
