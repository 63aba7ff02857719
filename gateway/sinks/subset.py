"""Select some envelopes of a ``WriteBatch`` (used to isolate one the database refuses)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gateway.model import NumericColumns, WaveformColumns
from gateway.sinks import WriteBatch

__all__ = ["subset"]


def subset(wb: WriteBatch, envelopes: Sequence[int]) -> WriteBatch:
    """The envelopes ``envelopes`` of ``wb`` with their rows, renumbered; no rejects, no alerts."""
    idx = np.asarray(envelopes, dtype=np.int64)
    remap = np.full(len(wb.items), -1, dtype=np.int64)
    remap[idx] = np.arange(len(idx))
    n_sel = np.flatnonzero(remap[wb.num.env] >= 0) if len(wb.num) else np.empty(0, dtype=np.int64)
    num = wb.num
    new_num = NumericColumns(
        device=num.device[n_sel], metric=num.metric[n_sel], profile=num.profile[n_sel], t=num.t[n_sel],
        value=num.value[n_sel], received_at=num.received_at[n_sel], env=remap[num.env[n_sel]].astype(np.int32),
    )
    wav = wb.wav
    w_sel = np.flatnonzero(remap[wav.env] >= 0) if len(wav) else np.empty(0, dtype=np.int64)
    counts = np.diff(wav.offsets)[w_sel]
    offsets = np.zeros(len(w_sel) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    pieces = [wav.samples[wav.offsets[i]:wav.offsets[i + 1]] for i in w_sel]
    new_wav = WaveformColumns(
        device=wav.device[w_sel], metric=wav.metric[w_sel], profile=wav.profile[w_sel], t0=wav.t0[w_sel],
        hz=wav.hz[w_sel], received_at=wav.received_at[w_sel], env=remap[wav.env[w_sel]].astype(np.int32),
        offsets=offsets, samples=np.concatenate(pieces) if pieces else np.empty(0, dtype=np.float64),
    )
    return WriteBatch(
        items=[wb.items[i] for i in envelopes], raws=[wb.raws[i] for i in envelopes],
        num=new_num, num_flags=wb.num_flags[n_sel], wav=new_wav, wav_flags=wb.wav_flags[w_sel],
    )
