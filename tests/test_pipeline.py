"""Pipeline behaviour against an in-memory sink: ack only after commit, retry, isolation, dedupe, drain."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from gateway.errors import SinkError
from gateway.model import RawMessage
from gateway.pipeline import Pipeline, PipelineSettings
from gateway.profiles import load_profiles
from gateway.sinks import History, OpenEpisode, WriteBatch
from tests.harness import PROFILES, await_for

pytestmark = pytest.mark.asyncio
P = load_profiles(PROFILES)
T = (int(time.time()) - 60) * 1000


class MemorySink:
    """Stores batches in lists; can be told to fail. Records commits and acks in one event log."""

    def __init__(self, events: list[tuple[str, object]]) -> None:
        self.events = events
        self.stored: dict[tuple[str, bytes], int] = {}
        self.rejected: list[str] = []
        self.fail_next: list[SinkError] = []
        self.refuse_device: str | None = None
        self.writes = 0
        self.delays: list[float] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def known(self, keys):  # noqa: ANN001, ANN201
        return {k: self.stored[k] for k in keys if k in self.stored}

    async def history(self, devices, numeric=(), waveform=(), runs_ms=0):  # noqa: ANN001, ANN201
        return History()

    async def write(self, batch: WriteBatch):  # noqa: ANN201
        self.writes += 1
        await asyncio.sleep(self.delays.pop(0) if self.delays else 0)
        if self.fail_next:
            raise self.fail_next.pop(0)
        if self.refuse_device and any(d.device_id == self.refuse_device for d in batch.items):
            raise SinkError("invalid input syntax", retriable=False, sqlstate="22P02")
        ids = []
        for d in batch.items:
            key = (d.device_id, d.sha256)
            if key in self.stored:
                ids.append(None)
            else:
                self.stored[key] = len(self.stored) + 1
                ids.append(self.stored[key])
        self.rejected += [r.reason for r in batch.rejected]
        self.events.append(("commit", [d.envelope.seq for d in batch.items]))
        return ids


def raw(seq: int, events: list, device: str = "po-1", payload: bytes | None = None) -> RawMessage:
    body = payload if payload is not None else orjson.dumps(
        {"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
         "numerics": [{"t": T + seq * 1000, "values": {"spo2": 97, "pulse_rate": 70}}]})
    return RawMessage(body, "mqtt", device, f"devices/{device}/telemetry", T + seq * 1000,
                      topic_device_id=device, ack=lambda: events.append(("ack", seq)))


def make(sink: MemorySink, **kw: object) -> Pipeline:
    settings = PipelineSettings(max_rows=kw.pop("max_rows", 100), max_age_s=kw.pop("max_age_s", 0.01),  # type: ignore[arg-type]
                                retry_initial_s=0.001, retry_max_s=0.01, require_registration=False)
    return Pipeline(profiles=P, sink=sink, settings=settings)


def committed(events: list, seq: int) -> int:
    """Index of the commit event holding seq."""
    return next(i for i, (kind, v) in enumerate(events) if kind == "commit" and seq in v)  # type: ignore[operator]


async def test_every_ack_follows_the_commit_of_its_envelope():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink, max_rows=7)
    task = asyncio.create_task(pipe.run())
    for s in range(50):
        pipe.submit(raw(s, events))
        if s % 5 == 0:
            await asyncio.sleep(0)
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    acks = [(i, v) for i, (kind, v) in enumerate(events) if kind == "ack"]
    assert [v for _, v in acks] == list(range(50)), "acks in arrival order, each once"
    for i, seq in acks:
        assert committed(events, seq) < i
    assert sink.writes > 1


async def test_retriable_failure_holds_acks_until_a_write_succeeds():
    events: list = []
    sink = MemorySink(events)
    sink.fail_next = [SinkError("connection refused", retriable=True)] * 3
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    for s in range(5):
        pipe.submit(raw(s, events))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    assert sink.writes == 4
    assert [e for e in events if e[0] == "ack"] == [("ack", s) for s in range(5)]
    assert pipe.metrics.write_errors.labels("true")._value.get() == 3
    pipe.stop()
    await task


async def test_an_envelope_the_database_refuses_is_quarantined_and_its_neighbours_stored():
    events: list = []
    sink = MemorySink(events)
    sink.refuse_device = "po-7"
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    for s in range(10):
        pipe.submit(raw(s, events, device="po-7" if s == 4 else "po-1"))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert sorted(d for d, _ in sink.stored) == ["po-1"] * 9
    assert sink.rejected == ["storage: invalid input syntax"]
    assert [v for k, v in events if k == "ack"] == list(range(10))


async def test_duplicates_are_acked_without_being_stored_twice():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink, max_age_s=0.05)
    task = asyncio.create_task(pipe.run())
    first = raw(1, events)
    pipe.submit(first)
    pipe.submit(raw(1, events, payload=first.payload))  # pending duplicate
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.submit(raw(1, events, payload=first.payload))  # stored duplicate
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert len(sink.stored) == 1
    assert [k for k, _ in events].count("ack") == 3
    m = pipe.metrics.envelopes
    assert m.labels("mqtt", "stored")._value.get() == 1
    assert m.labels("mqtt", "duplicate")._value.get() == 2


async def test_rejects_are_stored_and_acked_in_order_with_the_rest():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw(0, events))
    pipe.submit(raw(1, events, payload=b"{oops"))
    pipe.submit(raw(2, events))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert sink.rejected == ["payload: invalid JSON: object keys must be strings (byte 1)"]
    assert [v for k, v in events if k == "ack"] == [0, 1, 2]


async def test_stop_drains_what_was_taken_and_refuses_more():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink, max_age_s=60.0, max_rows=10_000)
    task = asyncio.create_task(pipe.run())
    for s in range(20):
        pipe.submit(raw(s, events))
    pipe.stop()
    await asyncio.wait_for(task, 5)
    assert len(sink.stored) == 20
    assert pipe.in_flight == 0
    with pytest.raises(RuntimeError):
        pipe.submit(raw(99, events))


async def test_a_permanent_error_not_about_the_data_holds_the_batch_instead_of_quarantining_it():
    events: list = []
    sink = MemorySink(events)
    sink.fail_next = [SinkError("cannot execute COPY in a read-only transaction", retriable=False, sqlstate="25006")] * 3
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    for s in range(4):
        pipe.submit(raw(s, events))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert len(sink.stored) == 4 and sink.rejected == []
    assert [v for k, v in events if k == "ack"] == [0, 1, 2, 3]


async def test_a_payload_the_decoder_chokes_on_is_quarantined_not_raised():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw(0, events, payload=b'{"v":1,"device_id":"po-1","firmware":"v2.4\xe9","numerics":[]}'))
    pipe.submit(raw(1, events, payload=b'{"x":' + b"[" * 1200 + b"]" * 1200 + b"}"))
    pipe.submit(raw(2, events))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert sink.rejected == ["payload: a string is not valid UTF-8", "payload: nested too deeply"]
    assert [v for k, v in events if k == "ack"] == [0, 1, 2]


async def test_concurrent_writes_committing_out_of_order_still_ack_in_arrival_order():
    events: list = []
    sink = MemorySink(events)
    sink.delays = [0.05, 0.0, 0.03, 0.0, 0.02, 0.0]  # every other batch commits before the one sent ahead of it
    pipe = make(sink, max_rows=6)
    task = asyncio.create_task(pipe.run())
    for s in range(18):
        pipe.submit(raw(s, events))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    commits = [v for k, v in events if k == "commit"]
    assert commits != sorted(commits), "the sink must have committed out of order for this test to mean anything"
    acks = [(i, v) for i, (kind, v) in enumerate(events) if kind == "ack"]
    assert [v for _, v in acks] == list(range(18))
    for i, seq in acks:
        assert committed(events, seq) < i


class HistorySink(MemorySink):
    """A MemorySink that knows a stored past: spo2 91.5 at ``T + 98 s`` and an open spo2_low."""

    def __init__(self, events: list[tuple[str, object]]) -> None:
        super().__init__(events)
        self.lookups: list[list[str]] = []
        self.alerts: list = []
        self.flags: list[int] = []

    async def history(self, devices, numeric=(), waveform=(), runs_ms=0):  # noqa: ANN001, ANN201
        self.lookups.append(list(devices))
        assert ("po-1", "spo2") in numeric or "po-1" not in devices
        assert {m for d, m in waveform} <= {"pleth"}
        h = History()
        if "po-1" in devices:
            h.numeric = [("po-1", "spo2", T + 98_000, 91.5)]
            h.numeric_ref = [("po-1", "spo2", T + 98_000, 91.5)]
            h.latest = {"po-1": T + 98_000}
            h.open_alerts = [OpenEpisode("po-1", "spo2_low", "spo2", "high", T + 90_000, 88.0)]
        if "po-2" in devices:
            h.numeric = [("po-2", "spo2", T + 200_000, 97.0)]
        return h

    async def write(self, batch: WriteBatch):  # noqa: ANN201
        ids = await super().write(batch)
        self.alerts += batch.alerts
        self.flags += batch.num_flags.tolist()
        return ids


async def test_state_of_a_device_is_restored_from_the_sink_the_first_time_it_is_seen():
    events: list = []
    sink = HistorySink(events)
    pipe = make(sink, max_rows=2)
    task = asyncio.create_task(pipe.run())
    # seq 101: spo2 97 clears the stored episode; seq 0: t = T, older than the stored reading
    for s, dev in ((101, "po-1"), (0, "po-1"), (102, "po-2"), (103, "po-1"), (104, "po-2")):
        pipe.submit(raw(s, events, device=dev))
        await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert sink.lookups == [["po-1"], ["po-2"]], "one lookup per device, the first time it is seen"
    # seq 0 (spo2, pulse_rate) is older than the stored spo2 and than seq 101: OUT_OF_ORDER both
    assert sink.flags[:4] == [0, 0, 64, 64]
    # seq 102 of po-2: spo2 older than po-2's stored one (OUT_OF_ORDER), pulse_rate without history
    assert sink.flags[4:6] == [64, 0]
    assert [(a.event, a.device_id, a.rule, a.at) for a in sink.alerts] == [("close", "po-1", "spo2_low", T + 101_000)]


async def test_recent_devices_are_restored_and_armed_before_any_reading():
    events: list = []
    sink = HistorySink(events)
    sink.recent_asked: list[float] = []

    async def recent(horizon_s: float) -> dict[str, tuple[str, int]]:
        sink.recent_asked.append(horizon_s)
        return {"po-1": ("pulse_oximeter", T + 98_000), "po-2": ("no_such_profile", T), "po-3": ("pulse_oximeter", T)}

    sink.recent = recent  # type: ignore[method-assign]
    clock = ManualClock(T / 1000 + 200)  # past po-1's latest reading + 30 s (probe_silent)
    pipe = Pipeline(profiles=P, sink=sink, clock=clock, settings=PipelineSettings(
        max_age_s=0.01, retry_initial_s=0.001, retry_max_s=0.01, tick_s=1.0, require_registration=False))
    assert await pipe.restore_recent(3600.0, owns=lambda d: d != "po-3") == ["po-1"]
    assert sink.recent_asked == [3600.0] and sink.lookups == [["po-1"]]
    task = asyncio.create_task(pipe.run())

    def ticked() -> bool:
        clock.advance(0.5)  # drives the writer's tick, whenever it has started
        return any(a.rule == "probe_silent" for a in sink.alerts)

    await await_for(ticked, timeout=5, message="the silent episode of the quiet device opened")
    pipe.submit(raw(103, events, device="po-1"))  # restored already: no second lookup
    clock.advance(0.1)  # the batch's age is past max_age_s
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    assert sink.lookups == [["po-1"]]
    assert [(a.event, a.rule, a.at) for a in sink.alerts if a.rule == "probe_silent"] == [
        ("open", "probe_silent", T + 128_000), ("close", "probe_silent", T + 103_000)]


async def test_a_refused_duplicate_lookup_holds_the_batch_instead_of_ending_the_writer():
    events: list = []
    sink = MemorySink(events)
    refusals = [SinkError("pg_hba.conf rejects connection", retriable=False, sqlstate="28000")] * 3
    known = sink.known

    async def refusing(keys):  # noqa: ANN001, ANN202
        if refusals:
            raise refusals.pop()
        return await known(keys)

    sink.known = refusing  # type: ignore[method-assign]
    pipe = make(sink)
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw(0, events))
    await await_for(lambda: pipe.in_flight == 0 or task.done(), timeout=5)
    assert not task.done(), task
    assert not refusals and ("ack", 0) in events
    pipe.stop()
    await task


async def test_outcomes_name_the_ingest_id_or_the_reason_of_each_payload():
    events: list = []
    sink = MemorySink(events)
    pipe = make(sink, max_rows=2)
    task = asyncio.create_task(pipe.run())
    got: dict[str, object] = {}

    def tagged(name: str, r: RawMessage) -> RawMessage:
        r.on_outcome = lambda o: got.__setitem__(name, o)
        return r

    first = raw(0, events)
    pipe.submit(tagged("first", first))
    pipe.submit(tagged("same-window", raw(0, events, payload=first.payload)))
    pipe.submit(tagged("bad", raw(1, events, payload=b'{"v":1,"device_id":"po-1","numerics":[{"t":1,"values":{"spo2":"x"}}]}')))
    pipe.submit(tagged("other", raw(2, events)))
    assert pipe.pending_bytes > 0
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.submit(tagged("later", raw(0, events, payload=first.payload)))
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task
    stored_id = sink.stored[("po-1", __import__("hashlib").sha256(first.payload).digest())]
    assert got["first"].status == "stored" and got["first"].ingest_id == stored_id
    assert got["same-window"].status == "duplicate" and got["same-window"].ingest_id == stored_id
    assert got["later"].status == "duplicate" and got["later"].ingest_id == stored_id
    assert got["other"].status == "stored" and got["other"].ingest_id not in (None, stored_id)
    assert got["bad"].status == "rejected" and got["bad"].reason.startswith("numerics[0].values.spo2:")
    assert pipe.pending_bytes == 0


class AlertSink(MemorySink):
    def __init__(self, events: list[tuple[str, object]]) -> None:
        super().__init__(events)
        self.alerts: list = []

    async def write(self, batch: WriteBatch):  # noqa: ANN201
        ids = await super().write(batch)
        self.alerts += batch.alerts
        return ids


def envelope_at(t_ms: int, seq: int, device: str = "po-1") -> RawMessage:
    body = orjson.dumps({"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
                         "numerics": [{"t": t_ms, "values": {"spo2": 97, "pulse_rate": 70}}]})
    return RawMessage(body, "mqtt", device, f"devices/{device}/telemetry", t_ms, topic_device_id=device)


class ManualClock:
    """A ``Clock`` the test moves: ``advance`` moves monotonic and wall time together."""

    def __init__(self, wall: float) -> None:
        self._mono = 0.0
        self._wall = wall

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def advance(self, s: float) -> None:
        self._mono += s
        self._wall += s


async def test_silent_checks_wait_while_a_backlog_drains_and_open_with_the_contract_time_after():
    """probe_silent (after_s 30). While the gateway takes 60-s-old readings (a backlog) its
    silent tick waits: the devices' messages are at the broker, not missing. Once old readings
    stop for ``behind_hold_s``, the tick runs and each quiet device opens with
    at = latest + 30 s, as the contract says. The test moves the pipeline's clock by hand."""
    now = float(T + 500_000) / 1000
    clock = ManualClock(now)
    sink = AlertSink([])
    pipe = Pipeline(profiles=P, sink=sink, clock=clock, settings=PipelineSettings(
        max_age_s=0.01, retry_initial_s=0.001, retry_max_s=0.01, tick_s=0.02, behind_hold_s=0.3,
        require_registration=False))
    ticker = pipe.ticker
    task = asyncio.create_task(pipe.run())
    old = int(now * 1000) - 60_000
    for k in range(8):
        pipe.submit(envelope_at(old + k * 10, k))
        clock.advance(0.1)  # input pacing: a backlog of old readings keeps arriving for 0.8 s
        await await_for(lambda: pipe.in_flight == 0, timeout=5)
        deferred = ticker.deferred
        clock.advance(0.02)  # a tick is due
        await await_for(lambda: ticker.deferred > deferred, timeout=5, message="a tick came due while behind")
        assert not sink.alerts, "no silent episode while the gateway is behind"
    caught_up = clock.monotonic()
    clock.advance(0.2)  # within the hold after the last old batch
    deferred = ticker.deferred
    await await_for(lambda: ticker.deferred > deferred, timeout=5, message="a tick came due within the hold")
    assert not sink.alerts, "the tick waits out the hold after the last old batch"
    clock.advance(0.2)
    await await_for(lambda: bool(sink.alerts), timeout=5)
    assert clock.monotonic() - caught_up >= 0.2, "the tick waited out the hold after the last old batch"
    assert [(a.event, a.device_id, a.rule, a.at) for a in sink.alerts] == [("open", "po-1", "probe_silent", old + 70 + 30_000)]
    pipe.stop()
    await task
