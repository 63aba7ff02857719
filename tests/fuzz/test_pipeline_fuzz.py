"""The whole pipeline against hostile payloads: every one acknowledged once, stored or rejected naming a field.

Hostile payloads (tests/fuzz/strategies.py) go through the real ``Pipeline`` (``submit`` ->
batching -> dedupe -> checks and alert rules -> write -> acknowledge) in small groups, as
MQTT messages (with a topic identity) and as HTTPS envelopes (without one), with and without
a device registry that refuses unregistered and revoked devices. Storage is an in-memory
``Sink`` + ``StateStore``: the pipeline is the thing under test, the sink a collaborator that
records every write batch (``tests/integration/test_fuzz_https.py`` runs the same strategies
through the real HTTPS endpoint into a real database).

For each payload, after the pipeline drained:
- it was acknowledged exactly once and told its outcome exactly once;
- ``stored``: its ingest id is one the sink gave out, and the write batch holding it carries
  exactly its readings and waveform blocks (device, metric, time, value and samples as sent,
  finite numerics, flags within ``Flag``), for the topic's device when it came with a topic;
- ``duplicate``: the same bytes of the same device were stored in this run;
- ``rejected``: its reason names a field (``numerics[0].t: ...``) and is in the quarantine
  batch written with it; never "could not be decoded", the quarantine of a decoder crash;
- nothing was logged at ERROR (a crash inside the writer or acks would be).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.decode import Decoded
from gateway.model import DEVICE_ID_PATTERN, Flag, Outcome, RawMessage
from gateway.pipeline import Pipeline, PipelineSettings
from gateway.profiles import load_profiles
from gateway.registry import Device, StaticRegistry
from gateway.sinks import History, Rejected, WriteBatch
from tests.fuzz.conftest import EXAMPLES, FUZZ, OUTCOMES
from tests.fuzz.strategies import CORPUS, FIELD_ROOTS, PROFILE, hostile_payload, mutated_payload
from tests.harness import PROFILES

P = load_profiles(PROFILES)
_ROOT = re.compile(r"^(?:\[\d+\]\.)?([a-z_-]+)(?:\[\d+\]|\.|:)")
_DEVICE = re.compile(DEVICE_ID_PATTERN)
_ALL_FLAGS = sum(int(f) for f in Flag)
# the device ids of the strategies' envelopes (CORPUS: po-0 .. po-4); po.3_x is revoked in the registry
TOPIC_DEVICES = [f"po-{i}" for i in range(5)] + ["po.3_x"]


class MemoryStorage:
    """``Sink`` and ``StateStore`` in memory: every committed write batch is kept, ids given out in order."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, bytes], int] = {}
        self.batches: list[tuple[WriteBatch, list[int | None]]] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def known(self, keys: list[tuple[str, bytes]]) -> dict[tuple[str, bytes], int]:
        return {k: self.stored[k] for k in keys if k in self.stored}

    async def history(self, devices, numeric=(), waveform=(), *, runs_ms=0) -> History:  # noqa: ANN001
        return History()

    async def recent(self, horizon_s: float) -> dict[str, tuple[str, int]]:
        return {}

    async def write(self, batch: WriteBatch) -> list[int | None]:
        ids: list[int | None] = []
        for d in batch.items:
            key = (d.device_id, d.sha256)
            if key in self.stored:
                ids.append(None)
            else:
                self.stored[key] = len(self.stored) + 1
                ids.append(self.stored[key])
        self.batches.append((batch, ids))
        return ids


class _Errors(logging.Handler):
    """Collects ERROR records of the gateway's loggers (an exception in the writer, the acks or the decoder)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = _Errors()
logging.getLogger("gateway").addHandler(ERRORS)


@dataclass
class Sent:
    raw: RawMessage
    acks: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


def _registry() -> StaticRegistry:
    return StaticRegistry([Device(d, PROFILE, "revoked" if d == "po.3_x" else "active") for d in TOPIC_DEVICES])


async def _run(cases: list[tuple[bytes, str | None, str | None]], registered: bool) -> tuple[list[Sent], MemoryStorage]:
    storage = MemoryStorage()
    settings = PipelineSettings(max_rows=50, max_age_s=0.001, retry_initial_s=0.001, retry_max_s=0.01,
                                require_registration=registered, default_profile=None if registered else PROFILE)
    pipe = Pipeline(profiles=P, sink=storage, settings=settings, registry=_registry() if registered else None)
    task = asyncio.create_task(pipe.run())
    sent: list[Sent] = []
    now = int(time.time() * 1000)
    for payload, content_type, topic_device in cases:
        s = Sent(RawMessage(payload, "mqtt" if topic_device else "https", topic_device or "tok",
                            f"devices/{topic_device}/telemetry" if topic_device else "/v1/telemetry", now,
                            content_type=content_type, topic_device_id=topic_device))
        s.raw.ack = lambda s=s: setattr(s, "acks", s.acks + 1)
        s.raw.on_outcome = s.outcomes.append
        sent.append(s)
        pipe.submit(s.raw)
    pipe.stop()
    await asyncio.wait_for(task, 30)
    assert pipe.in_flight == 0
    return sent, storage


def _check_stored(s: Sent, storage: MemoryStorage) -> None:
    """The write batch that stored ``s`` carries exactly its readings and blocks, as sent."""
    found = [(b, j) for b, ids in storage.batches for j, r in enumerate(b.raws) if r is s.raw and ids[j] is not None]
    assert len(found) == 1, f"stored {len(found)} times"
    b, j = found[0]
    ids = next(ids for bb, ids in storage.batches if bb is b)
    assert ids[j] == s.outcomes[0].ingest_id
    d: Decoded = b.items[j]
    env = d.envelope
    assert _DEVICE.fullmatch(env.device_id) and env.v == 1
    assert s.raw.topic_device_id is None or env.device_id == s.raw.topic_device_id
    numeric = {k for k, m in d.profile.metrics.items() if m.kind == "numeric"}
    rows = np.flatnonzero(b.num.env == j)
    assert len(rows) == d.n_numeric and len(rows) + len(d.wav_len) > 0
    assert list(b.num.device[rows]) == [env.device_id] * len(rows)
    assert list(b.num.metric[rows]) == d.num_metric and set(d.num_metric) <= numeric
    assert list(b.num.t[rows]) == d.num_t
    sent_values = [v for n in env.numerics for v in n.values.values()]
    assert list(b.num.value[rows]) == sent_values == d.num_value
    assert all(math.isfinite(v) for v in sent_values)
    assert all(0 <= f <= _ALL_FLAGS for f in b.num_flags[rows])
    blocks = np.flatnonzero(b.wav.env == j)
    assert len(blocks) == len(env.waveforms) == len(d.wav_len)
    for k, (i, w) in enumerate(zip(blocks, env.waveforms)):
        samples = b.wav.samples[b.wav.offsets[i]:b.wav.offsets[i + 1]]
        assert b.wav.device[i] == env.device_id and b.wav.metric[i] == w.metric == d.wav_metric[k]
        assert b.wav.hz[i] == w.hz > 0 and math.isfinite(w.hz)
        assert np.array_equal(samples, np.asarray(w.samples, dtype=np.float64), equal_nan=True)
        assert 0 <= b.wav_flags[i] <= _ALL_FLAGS


def _check_rejected(s: Sent, storage: MemoryStorage) -> str:
    reason = s.outcomes[0].reason or ""
    m = _ROOT.match(reason)
    assert m and m.group(1) in FIELD_ROOTS, f"reason names no field: {reason!r}"
    assert ": " in reason and reason.split(": ", 1)[1].strip(), reason
    assert not reason.startswith("payload: could not be decoded ("), f"the decoder crashed: {reason!r}"
    quarantined: list[Rejected] = [r for b, _ in storage.batches for r in b.rejected if r.raw is s.raw]
    assert [r.reason for r in quarantined] == [reason], "a reject is stored in quarantine once, with its reason"
    dev = quarantined[0].device_id
    assert dev is None or _DEVICE.fullmatch(dev), dev
    if s.raw.topic_device_id is not None:
        assert dev == s.raw.topic_device_id
    return "identity" if reason.startswith("device_id:") else "rejected"


# valid envelopes among the hostile ones: the stored path runs too, and a hostile payload
# shares its batch with envelopes that must not suffer for it
payloads = st.one_of(mutated_payload(), hostile_payload(), st.sampled_from(CORPUS))
transports = st.sampled_from([None, None, None, *TOPIC_DEVICES])  # None: HTTPS (no topic identity)


@settings(FUZZ, max_examples=500)
@given(st.lists(st.tuples(payloads, transports), min_size=1, max_size=6), st.booleans(), st.integers(0, 5))
def test_pipeline_acknowledges_every_hostile_payload_once_stored_or_rejected_naming_a_field(cases, registered, repeat):
    flat = [(p, ct, dev) for (p, ct), dev in cases]
    if repeat < len(flat):
        flat.append(flat[repeat])  # a redelivery: stored once, acknowledged twice
    EXAMPLES["pipeline"] += 1
    before = len(ERRORS.records)
    sent, storage = asyncio.run(_run(flat, registered))
    assert ERRORS.records[before:] == [], [r.getMessage() for r in ERRORS.records[before:]]
    stored_payloads: Counter[tuple[str | None, bytes]] = Counter()
    for s in sent:
        assert s.acks == 1, f"acknowledged {s.acks} times"
        assert len(s.outcomes) == 1, s.outcomes
        o = s.outcomes[0]
        if o.status == "stored":
            _check_stored(s, storage)
            stored_payloads[(s.raw.topic_device_id, s.raw.payload)] += 1
            OUTCOMES["pipeline-stored"] += 1
        elif o.status == "duplicate":
            assert any(x.outcomes[0].status == "stored" and x.raw.payload == s.raw.payload for x in sent), \
                "a duplicate of nothing stored"
            OUTCOMES["pipeline-duplicate"] += 1
        else:
            assert o.status == "rejected", o
            OUTCOMES[f"pipeline-{_check_rejected(s, storage)}"] += 1
    assert sum(len(b.items) for b, _ in storage.batches) >= sum(stored_payloads.values())
    assert len(storage.stored) == sum(stored_payloads.values()), "an envelope stored twice"
