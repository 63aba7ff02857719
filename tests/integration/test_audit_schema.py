"""Migration 2 on a real database: the gateway's role may append to audit_log but never change it.

The gateway's own writes (a batch with readings, rejects and audit events, and the registry
load) are made through a real login role that holds nothing but ``vitalgate_gateway``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from gateway.errors import RegistryError
from gateway.model import AuditEvent, RawMessage
from gateway.pipeline import Pipeline, PipelineSettings
from gateway.profiles import load_profiles
from gateway.registry import Registry, hash_secret, new_token
from gateway.sinks.schema import MIGRATIONS, migrate
from gateway.sinks.timescale import TimescaleSink
from tests.harness import PROFILES, await_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

_roles = itertools.count(1)
T = (int(time.time()) - 60) * 1000


def as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port}"))


@pytest.fixture
def gateway_login(db_dsn: str, pg_cluster):
    """Migrate as the owner, then a LOGIN role granted only vitalgate_gateway; yields its DSN."""

    async def setup() -> str:
        owner = await asyncpg.connect(db_dsn)
        try:
            assert await migrate(owner) == [v for v, _, _ in MIGRATIONS]
            role = f"vg_login_{next(_roles)}_{time.monotonic_ns() % 10**9}"
            await owner.execute(f"CREATE ROLE {role} LOGIN; GRANT vitalgate_gateway TO {role}")
            return role
        finally:
            await owner.close()

    role = asyncio.run(setup())
    yield as_user(db_dsn, role)
    pg_cluster.psql(f"DROP ROLE IF EXISTS {role}")


async def test_the_gateway_role_appends_to_audit_log_but_cannot_change_it(db_dsn, gateway_login):
    gw = await asyncpg.connect(gateway_login)
    try:
        assert await gw.fetchval("SELECT current_user") != "postgres"
        assert await migrate(gw) == []  # up to date: the role, which may create nothing, can start with migrate on
        await gw.execute("INSERT INTO audit_log (actor, action, target, outcome) VALUES ('t', 'auth.failure', 'po-1', 'denied')")
        for sql in ("UPDATE audit_log SET outcome = 'success'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                    "SELECT * FROM audit_log"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table audit_log"):
                await gw.execute(sql)
        # the registry is read-only for the gateway
        assert await gw.fetchval("SELECT count(*) FROM devices") == 0
        for sql in ("INSERT INTO devices (device_id, profile) VALUES ('x', 'pulse_oximeter')", "DELETE FROM api_keys"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await gw.execute(sql)
    finally:
        await gw.close()

    owner = await asyncpg.connect(db_dsn)
    try:
        # defence in depth: the owner (here a superuser) is refused by the trigger
        for sql, op in (("UPDATE audit_log SET outcome = 'success'", "UPDATE"), ("DELETE FROM audit_log", "DELETE"),
                        ("TRUNCATE audit_log", "TRUNCATE")):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"audit_log is append-only: {op} refused"):
                await owner.execute(sql)
        rows = await owner.fetch("SELECT actor, action, target, outcome FROM audit_log")
        assert [tuple(r) for r in rows] == [("t", "auth.failure", "po-1", "denied")]
        assert await migrate(owner) == []  # idempotent, role included
    finally:
        await owner.close()


def _raw(device: str, seq: int, *, topic_device: str | None = None, profile: bool = True) -> RawMessage:
    env: dict = {"v": 1, "device_id": device, "seq": seq, "numerics": [{"t": T + seq * 1000, "values": {"spo2": 90 + seq}}]}
    if profile:
        env["profile"] = "pulse_oximeter"
    td = topic_device or device
    return RawMessage(orjson.dumps(env), "mqtt", td, f"devices/{td}/telemetry", T + seq * 1000, topic_device_id=td,
                      remote_addr="127.0.0.9:5555")


async def test_pipeline_through_the_gateway_role_stores_rejects_and_audits_in_one_transaction(db_dsn, gateway_login):
    owner = await asyncpg.connect(db_dsn)
    try:
        await _pipeline_case(owner, gateway_login)
    finally:
        await owner.close()


async def _pipeline_case(owner: asyncpg.Connection, gateway_login: str) -> None:
    tok = new_token()
    await owner.execute(
        "INSERT INTO devices (device_id, profile, token_id, token_sha256) VALUES ('po-ok', 'pulse_oximeter', $1, $2)",
        tok.id, tok.sha256)
    await owner.execute("INSERT INTO devices (device_id, profile, status, revoked_at) VALUES ('po-rev', 'pulse_oximeter', 'revoked', now())")
    assert hash_secret(tok.secret) == tok.sha256

    sink = TimescaleSink(gateway_login, gateway_id="gw-role", run_migrations=False)
    await sink.start()
    registry = Registry(refresh_s=3600)
    await registry.start(gateway_login)
    assert registry.authenticate_token(tok.text) == registry.device("po-ok")
    pipeline = Pipeline(profiles=load_profiles(PROFILES), sink=sink, registry=registry,
                        settings=PipelineSettings(max_age_s=0.01, require_registration=True))
    writer = asyncio.create_task(pipeline.run())
    try:
        # an audit event alone (a source's 401) is written although the batch has no payload
        pipeline.audit(AuditEvent(at_ms=T, actor="https:anonymous", action="auth.failure", target=None,
                                  outcome="denied", source_addr="10.0.0.1", correlation_id="req-1",
                                  detail={"status": 401, "why": "bad token \x00"}))
        await await_for(lambda: owner.fetchval("SELECT count(*) FROM audit_log"), timeout=10)
        for raw in (_raw("po-ok", 1, profile=False), _raw("po-ghost", 2), _raw("po-rev", 3), _raw("po-ok", 4, topic_device="po-rev"),
                    _raw("po-ok", 5)):
            pipeline.submit(raw)
        await await_for(lambda: pipeline.in_flight == 0, timeout=10)
    finally:
        pipeline.stop()
        await writer
        await registry.close()
        await sink.close()
    readings = await owner.fetch("SELECT device_id, value FROM readings ORDER BY value")
    assert [tuple(r) for r in readings] == [("po-ok", 91.0), ("po-ok", 95.0)]
    assert await owner.fetchval("SELECT array_agg(DISTINCT profile) FROM ingests") == ["pulse_oximeter"]
    rejected = await owner.fetch("SELECT reason, device_id, encode(payload_sha256, 'hex') AS h FROM rejected ORDER BY id")
    assert [(r["reason"], r["device_id"]) for r in rejected] == [
        ("device_id: 'po-ghost' is not registered", "po-ghost"),
        ("device_id: 'po-rev' is revoked", "po-rev"),
        ("device_id: 'po-ok' does not match the device id 'po-rev' of the topic", "po-rev"),
    ]
    audit = await owner.fetch("SELECT * FROM audit_log ORDER BY id")
    first = audit[0]
    assert (first["actor"], first["action"], first["outcome"], first["source_addr"], first["correlation_id"]) == (
        "https:anonymous", "auth.failure", "denied", "10.0.0.1", "req-1")
    assert orjson.loads(first["detail"]) == {"status": 401, "why": "bad token \\x00"}
    assert [(a["actor"], a["action"], a["target"], a["outcome"], a["source_addr"]) for a in audit[1:]] == [
        ("mqtt:po-ghost", "device.unregistered", "po-ghost", "denied", "127.0.0.9:5555"),
        ("mqtt:po-rev", "device.revoked", "po-rev", "denied", "127.0.0.9:5555"),
        ("mqtt:po-rev", "identity.mismatch", "po-ok", "denied", "127.0.0.9:5555"),
    ]
    assert [a["correlation_id"] for a in audit[1:]] == [r["h"] for r in rejected]
    assert orjson.loads(audit[1]["detail"])["reason"] == "device_id: 'po-ghost' is not registered"
    assert pipeline.metrics.audit.labels("device.revoked")._value.get() == 1  # noqa: SLF001
    assert pipeline.metrics.audit.labels("auth.failure")._value.get() == 1  # noqa: SLF001


async def test_the_registry_refuses_to_start_on_an_unmigrated_database(db_dsn):
    reg = Registry()
    with pytest.raises(RegistryError, match=r'relation "devices" does not exist; run `vitalgate db migrate`'):
        await reg.start(db_dsn)
    await reg.close()
