"""The rooms of the pipeline on their own: evaluator dedupe, batch sealing by the injected
clock, settings built from the configuration."""

from __future__ import annotations

import orjson
import pytest

from gateway.batching import Batcher
from gateway.checks import CheckSettings
from gateway.config import GatewayConfig, load, pending_budget
from gateway.decode import decode
from gateway.evaluate import Evaluator, key_of
from gateway.model import RawMessage
from gateway.pipeline import PipelineSettings
from tests.test_pipeline import P, T, ManualClock


def _decoded(seq: int, spo2: float = 97.0):  # noqa: ANN202
    body = orjson.dumps({"v": 1, "device_id": "po-1", "seq": seq, "profile": "pulse_oximeter",
                         "numerics": [{"t": T + seq * 1000, "values": {"spo2": spo2}}]})
    return body, decode(body, content_type="application/json", profiles=P)


def test_the_evaluator_drops_known_keys_and_repeats_before_the_checks() -> None:
    ev = Evaluator(P, PipelineSettings().checks)
    (_, a), (_, b), (_, c) = _decoded(0), _decoded(1), _decoded(2)
    out = ev.evaluate([a, b, a, c], [T, T + 1000, T, T + 2000], known={key_of(c)})
    assert out.keep == [0, 1] and out.items == [a, b] and out.keys == [key_of(a), key_of(b)]
    assert out.num.t.tolist() == [T, T + 1000] and len(out.num_flags) == 2
    # a repeat evaluated again would be OUT_OF_ORDER: the state never saw it twice
    again = ev.evaluate([b], [T + 1000])
    assert again.keep is None and again.num_flags.tolist() == [64]


def test_settings_take_every_default_from_the_configuration() -> None:
    cfg = GatewayConfig()
    assert PipelineSettings() == PipelineSettings.from_config(cfg)
    assert PipelineSettings().max_pending_bytes == pending_budget(cfg.max_memory_mib) == cfg.max_pending_bytes
    # the checks' own defaults (used by code without a configuration) agree with it
    assert CheckSettings() == PipelineSettings().checks
    s = PipelineSettings.from_config(load(None, environ={"VITALGATE_MAX_MEMORY_MIB": "224", "VITALGATE_BATCH_MAX_ROWS": "7",
                                                         "VITALGATE_CHECKS_MAX_CLOCK_SKEW_S": "5"}))
    assert (s.max_pending_bytes, s.max_rows, s.checks.max_clock_skew_s) == (8 << 20, 7, 5.0)


@pytest.mark.asyncio
async def test_a_batch_is_sealed_by_age_on_the_injected_clock() -> None:
    clock = ManualClock(0.0)
    batcher = Batcher(max_rows=100, max_bytes=1 << 20, max_age_s=5.0, clock=clock)
    body, d = _decoded(0)
    raw = RawMessage(body, "mqtt", "po-1", "devices/po-1/telemetry", T)
    batch = batcher.take(raw)
    assert batcher.add(batch, raw, d, key_of(d))
    assert not batcher.add(batcher.take(raw), raw, d, key_of(d)), "a payload already pending is not added twice"
    clock.advance(4.9)
    assert await batcher.next(until=clock.monotonic()) is None, "4.9 s is younger than max_age_s: not sealed"
    clock.advance(0.2)
    assert await batcher.next(until=clock.monotonic()) is batch
    assert len(batch) == 2 and len(batch.items) == 1 and batch.dups
    batcher.release(batch)
    assert (batcher.in_flight, batcher.pending_bytes, batcher.pending_rows) == (0, 0, 0)
