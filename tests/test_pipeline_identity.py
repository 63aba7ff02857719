"""Pipeline and the device registry: who may write, the registered profile, the audit trail."""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson
import pytest

from gateway.errors import IdentityError, SinkError
from gateway.model import AuditEvent, RawMessage
from gateway.pipeline import Pipeline, PipelineSettings
from gateway.registry import Device, StaticRegistry
from gateway.sinks import WriteBatch
from tests.test_pipeline import P, MemorySink
from tests.harness import await_for

pytestmark = pytest.mark.asyncio
T = (int(time.time()) - 60) * 1000


class AuditSink(MemorySink):
    """MemorySink that also keeps the audit events and the rejects of each committed write."""

    def __init__(self) -> None:
        super().__init__([])
        self.audit: list[AuditEvent] = []
        self.batches: list[WriteBatch] = []
        self.refuse_audit = False

    async def write(self, batch: WriteBatch):  # noqa: ANN201
        if self.refuse_audit and batch.audit:
            raise SinkError("invalid input syntax for type json", retriable=False, sqlstate="22P02")
        ids = await super().write(batch)
        self.audit += batch.audit
        self.batches.append(batch)
        return ids


def raw(device: str, seq: int, *, topic: str | None = None, profile: str | None = "pulse_oximeter",
        acks: list | None = None) -> RawMessage:
    values = {"body_temp": 37.0} if device.startswith("th-") else {"spo2": 97}
    env: dict = {"v": 1, "device_id": device, "seq": seq, "numerics": [{"t": T + seq * 1000, "values": values}]}
    if profile:
        env["profile"] = profile
    td = topic or device
    return RawMessage(orjson.dumps(env), "mqtt", td, f"devices/{td}/telemetry", T + seq * 1000, topic_device_id=td,
                      ack=None if acks is None else (lambda: acks.append(seq)))


def registry() -> StaticRegistry:
    return StaticRegistry([Device("po-1", "pulse_oximeter", "active"), Device("th-1", "thermometer", "active"),
                           Device("po-r", "pulse_oximeter", "revoked")])


def make(sink: AuditSink, reg: StaticRegistry | None, *, require: bool = True, default: str | None = None) -> Pipeline:
    return Pipeline(profiles=P, sink=sink, registry=reg,
                    settings=PipelineSettings(max_age_s=0.01, require_registration=require, default_profile=default,
                                              retry_initial_s=0.001, retry_max_s=0.01))


async def drain(pipe: Pipeline, task: asyncio.Task) -> None:
    await await_for(lambda: pipe.in_flight == 0, timeout=5)
    pipe.stop()
    await task


async def test_unregistered_revoked_and_spoofed_envelopes_are_rejected_audited_and_acked():
    sink = AuditSink()
    pipe = make(sink, registry())
    task = asyncio.create_task(pipe.run())
    acks: list = []
    cases = [raw("po-1", 1, acks=acks), raw("po-x", 2, acks=acks), raw("po-r", 3, acks=acks),
             raw("po-1", 4, topic="th-1", acks=acks), raw("th-1", 5, profile=None, acks=acks)]
    for r in cases:
        pipe.submit(r)
    await drain(pipe, task)
    assert acks == [1, 2, 3, 4, 5]  # rejects are acknowledged too: redelivery never makes them valid
    assert sorted(d for d, _ in sink.stored) == ["po-1", "th-1"]
    assert sink.rejected == [
        "device_id: 'po-x' is not registered",
        "device_id: 'po-r' is revoked",
        "device_id: 'po-1' does not match the device id 'th-1' of the topic",
    ]
    assert [(e.actor, e.action, e.target, e.outcome) for e in sink.audit] == [
        ("mqtt:po-x", "device.unregistered", "po-x", "denied"),
        ("mqtt:po-r", "device.revoked", "po-r", "denied"),
        ("mqtt:th-1", "identity.mismatch", "po-1", "denied"),  # who (the topic's device) claimed to be whom
    ]
    assert sink.audit[0].correlation_id == hashlib.sha256(cases[1].payload).hexdigest()
    assert sink.audit[0].detail == {"reason": "device_id: 'po-x' is not registered", "source": "mqtt",
                                    "topic_or_path": "devices/po-x/telemetry"}
    # every audit event is in the transaction of its reject
    for b in sink.batches:
        assert len(b.audit) == len(b.rejected)
    stored = {d.envelope.device_id: d.profile.name for b in sink.batches for d in b.items}
    assert stored == {"po-1": "pulse_oximeter", "th-1": "thermometer"}  # th-1 named no profile: the registered one
    assert pipe.metrics.audit.labels("device.unregistered")._value.get() == 1  # noqa: SLF001
    assert pipe.metrics.rejected.labels("mqtt", "device_id")._value.get() == 3  # noqa: SLF001


async def test_validate_raises_identity_errors_naming_the_audit_action():
    pipe = make(AuditSink(), registry())
    with pytest.raises(IdentityError) as exc:
        pipe.validate(raw("po-r", 1))
    assert (exc.value.action, exc.value.reason, exc.value.device_id) == ("device.revoked", "device_id: 'po-r' is revoked", "po-r")
    assert pipe.validate(raw("th-1", 1, profile=None)).profile.name == "thermometer"


async def test_revocation_applies_to_the_next_envelope():
    reg = registry()
    sink = AuditSink()
    pipe = make(sink, reg)
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw("po-1", 1))
    reg.revoke_device("po-1")
    pipe.submit(raw("po-1", 2))
    await drain(pipe, task)
    assert [d for d, _ in sink.stored] == ["po-1"]
    assert sink.rejected == ["device_id: 'po-1' is revoked"]


async def test_without_required_registration_the_registered_profile_is_still_the_default():
    sink = AuditSink()
    pipe = make(sink, registry(), require=False, default="pulse_oximeter")
    task = asyncio.create_task(pipe.run())
    for r in (raw("th-1", 1, profile=None), raw("po-x", 2, profile=None), raw("po-r", 3)):
        pipe.submit(r)
    await drain(pipe, task)
    stored = {d.envelope.device_id: d.profile.name for b in sink.batches for d in b.items}
    assert stored == {"th-1": "thermometer", "po-x": "pulse_oximeter", "po-r": "pulse_oximeter"}
    assert sink.rejected == [] and sink.audit == []


async def test_a_topic_mismatch_is_audited_without_a_registry():
    sink = AuditSink()
    pipe = make(sink, None, require=False)
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw("po-1", 1, topic="po-2"))
    await drain(pipe, task)
    assert [e.action for e in sink.audit] == ["identity.mismatch"]


async def test_registration_without_a_registry_is_a_configuration_error():
    with pytest.raises(ValueError, match="require_registration needs a registry"):
        make(AuditSink(), None, require=True)


async def test_audit_events_from_sources_are_written_without_any_payload(caplog):
    sink = AuditSink()
    pipe = make(sink, registry())
    task = asyncio.create_task(pipe.run())
    ev = AuditEvent(at_ms=T, actor="https:anonymous", action="auth.failure", target=None, outcome="denied",
                    source_addr="10.1.2.3", correlation_id="req-9", detail={"status": 401})
    pipe.audit(ev)
    await await_for(lambda: sink.audit, timeout=5, message="the audit event written")
    assert sink.audit == [ev] and sink.batches[-1].items == [] and sink.batches[-1].rejected == []
    assert pipe.in_flight == 0  # nothing to acknowledge
    pipe.audit(ev)
    pipe.submit(raw("po-1", 1))
    await drain(pipe, task)
    assert sink.audit == [ev, ev]
    assert pipe.metrics.audit.labels("auth.failure")._value.get() == 2  # noqa: SLF001
    pipe.audit(ev)  # after the writer finished: only logged
    assert sink.audit == [ev, ev]
    assert [r.action for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "Audit event after the writer finished; logged here only."] == ["auth.failure"]


async def test_audit_events_taken_while_draining_are_written():
    sink = AuditSink()
    pipe = make(sink, registry())
    task = asyncio.create_task(pipe.run())
    pipe.submit(raw("po-1", 1))
    pipe.stop()
    pipe.audit(AuditEvent(at_ms=T, actor="https:tok", action="authz.denied", target="po-2", outcome="denied"))
    await task
    assert [e.action for e in sink.audit] == ["authz.denied"]


async def test_audit_events_the_database_refuses_are_logged_and_the_rest_is_stored(caplog):
    sink = AuditSink()
    sink.refuse_audit = True
    pipe = make(sink, registry())
    task = asyncio.create_task(pipe.run())
    acks: list = []
    pipe.submit(raw("po-x", 1, acks=acks))
    pipe.submit(raw("po-1", 2, acks=acks))
    await drain(pipe, task)
    assert acks == [1, 2]
    assert [d for d, _ in sink.stored] == ["po-1"] and sink.rejected == ["device_id: 'po-x' is not registered"]
    refused = [r for r in caplog.records if r.getMessage() == "Audit event refused by the database; logged here instead."]
    assert [(r.action, r.target) for r in refused] == [("device.unregistered", "po-x")]  # type: ignore[attr-defined]
