"""copybin's waveform COPY stream equals a plain struct-packed reference; its helpers do what they say."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sinks import copybin


names = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6)), min_size=1, max_size=30))
def test_ranges_concatenate_aranges(pairs):
    starts = np.array([p[0] for p in pairs], dtype=np.int64)
    lengths = np.array([p[1] for p in pairs], dtype=np.int64)
    expected = [i for s, n in pairs for i in range(s, s + n)]
    assert copybin.ranges(starts, lengths).tolist() == expected


def test_reading_records_carry_time_as_microseconds_since_2000():
    rows = list(copybin.reading_records(
        np.array([copybin.PG_EPOCH_MS, 1_700_000_000_123], dtype=np.int64), np.array(["po-1", "po-2"], dtype=object),
        np.array(["spo2", "pulse_rate"], dtype=object), np.array([97.0, 61.5]), np.array([0, 3], dtype=np.int32),
        np.array([7, 8], dtype=np.int64),
    ))
    assert rows == [(0, "po-1", "spo2", 97.0, 0, 7), ((1_700_000_000_123 - copybin.PG_EPOCH_MS) * 1000, "po-2", "pulse_rate", 61.5, 3, 8)]
    assert all(type(v) in (int, float, str) for row in rows for v in row)  # plain Python values for asyncpg


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
