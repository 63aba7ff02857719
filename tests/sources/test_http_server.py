"""The HTTPS source's answers, in process, over plain HTTP, with a stand-in intake.

The intake decodes with the real decoder but commits in memory (and can be told to hold
commits), so these tests pin the source's own logic: the order of checks, the status
codes and bodies, auditing, scopes. tests/integration/test_https.py repeats the
important cases over TLS against the real gateway and database.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import orjson
import pytest
import pytest_asyncio

from gateway.config import HttpConfig
from gateway.decode import Decoded, decode
from gateway.errors import RejectError
from gateway.metrics import Metrics
from gateway.model import AuditEvent, Outcome, RawMessage
from gateway.profiles import load_profiles
from gateway.registry import StaticRegistry
from gateway.sources.http import HttpSource
from gateway.sources.http.ui import UI_PATHS
from tests.harness import PROFILES, await_for

pytestmark = pytest.mark.asyncio
P = load_profiles(PROFILES)
T = (int(time.time()) - 60) * 1000


@dataclass
class StubIntake:
    """Validates like the pipeline; "commits" on the next loop turn unless ``hold`` is set."""

    hold: bool = False
    backed_up: bool = False
    stopping: bool = False
    accepted: list[RawMessage] = field(default_factory=list)
    quarantined: list[tuple[RawMessage, RejectError]] = field(default_factory=list)
    audits: list[AuditEvent] = field(default_factory=list)
    stored: dict[bytes, int] = field(default_factory=dict)
    held: list[tuple[RawMessage, Decoded]] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return len(self.held)

    @property
    def pending_bytes(self) -> int:
        return sum(len(r.payload) for r, _ in self.held)

    def validate(self, raw: RawMessage) -> Decoded:
        return decode(raw.payload, content_type=raw.content_type, profiles=P, topic_device_id=raw.topic_device_id)

    def accept(self, raw: RawMessage, d: Decoded) -> None:
        if self.stopping:
            raise RuntimeError("stopping")
        self.accepted.append(raw)
        self.held.append((raw, d))
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        held, self.held = self.held, []
        for raw, d in held:
            if d.sha256 in self.stored:
                outcome = Outcome("duplicate", self.stored[d.sha256])
            else:
                self.stored[d.sha256] = len(self.stored) + 1
                outcome = Outcome("stored", self.stored[d.sha256])
            assert raw.on_outcome is not None
            raw.on_outcome(outcome)

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        self.quarantined.append((raw, exc))

    def audit(self, event: AuditEvent) -> None:
        self.audits.append(event)

    def actions(self) -> list[str]:
        return [a.action for a in self.audits]


def env(device: str = "po-1", seq: int = 0, spo2: float = 97, **extra: object) -> dict:
    return {"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
            "numerics": [{"t": T + seq * 1000, "values": {"spo2": spo2, "pulse_rate": 70}}], **extra}


@dataclass
class Api:
    source: HttpSource
    intake: StubIntake
    registry: StaticRegistry
    session: aiohttp.ClientSession
    url: str
    token: str
    token2: str
    revoked_token: str
    read_key: str
    admin_key: str
    metrics: Metrics

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def post(self, body: object, *, token: str | None = None, headers: dict[str, str] | None = None,
                   raw: bytes | None = None) -> tuple[int, dict, aiohttp.ClientResponse]:
        h = {"Content-Type": "application/json", **self.auth(token), **(headers or {})}
        data = raw if raw is not None else orjson.dumps(body)
        async with self.session.post(f"{self.url}/v1/telemetry", data=data, headers=h) as r:
            return r.status, await r.json(), r


@pytest_asyncio.fixture
async def api(request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    overrides = getattr(request, "param", {})
    settings = {"enabled": True, "port": 0, "allow_plaintext": True, "max_body_bytes": 64 * 1024,
                "max_envelopes_per_request": 5, "rate_limit_per_s": 1000.0, "rate_limit_burst": 1000,
                "commit_timeout_s": 0.5, **overrides}
    cfg = HttpConfig(**settings)
    registry = StaticRegistry()
    token = registry.add_device("po-1", "pulse_oximeter")
    token2 = registry.add_device("po-2", "pulse_oximeter")
    revoked = registry.add_device("po-3", "pulse_oximeter")
    registry.revoke_device("po-3")
    read_key = registry.add_api_key("dash", ["telemetry:read"])
    admin_key = registry.add_api_key("ops", ["admin"])
    intake = StubIntake()
    metrics = Metrics()
    source = HttpSource(cfg, intake=intake, registry=registry, metrics=metrics, gateway_id="gw-test")
    await source.start()
    runner = asyncio.create_task(source.run())
    async with aiohttp.ClientSession() as session:
        yield Api(source, intake, registry, session, source.url, token, token2, revoked, read_key, admin_key,  # type: ignore[arg-type]
                  metrics)
    source.stop_intake()
    await source.close()
    await runner


async def test_202_after_commit_with_ids_and_duplicates(api: Api):
    status, body, r = await api.post([env(seq=1), env(seq=2)])
    assert status == 202, body
    assert [(x["index"], x["status"], x["ingest_id"], x["duplicate"]) for x in body["results"]] == [
        (0, "stored", 1, False), (1, "stored", 2, False)]
    assert r.headers["X-Correlation-Id"] == body["correlation_id"]
    raw = api.intake.accepted[0]
    assert (raw.source, raw.topic_or_path, raw.remote_addr) == ("https", "/v1/telemetry", "127.0.0.1")
    assert raw.principal == api.registry.device("po-1").token_id
    status, body, _ = await api.post([env(seq=1), env(seq=2)])
    assert status == 202 and [(x["ingest_id"], x["duplicate"]) for x in body["results"]] == [(1, True), (2, True)]
    # one envelope alone has the same bytes as inside the array: the same ingest id
    status, body, _ = await api.post(None, raw=orjson.dumps(env(seq=1)))
    assert status == 202 and body["results"][0]["ingest_id"] == 1


async def test_202_waits_for_the_commit(api: Api):
    api.intake.hold = True
    task = asyncio.create_task(api.post(env(seq=5)))
    await await_for(lambda: api.intake.in_flight == 1, timeout=10)  # taken by the pipeline, not yet committed
    assert not task.done() and api.intake.in_flight == 1
    api.intake.commit()
    status, body, _ = await task
    assert status == 202 and body["results"][0]["status"] == "stored"


async def test_msgpack_and_gzip_bodies(api: Api):
    body = msgspec.msgpack.encode([env(seq=10), env(seq=11)])
    h = {**api.auth(), "Content-Type": "application/msgpack", "Content-Encoding": "gzip"}
    async with api.session.post(f"{api.url}/v1/telemetry", data=gzip.compress(body), headers=h) as r:
        assert r.status == 202, await r.text()
    assert api.intake.accepted[0].payload == msgspec.msgpack.encode(env(seq=10))


async def test_400_names_index_and_field_and_takes_nothing(api: Api):
    bad = env(seq=3)
    bad["numerics"][0]["values"]["spo2"] = "high"
    status, body, _ = await api.post([env(seq=1), env(seq=2), env(seq=4), bad, env(seq=5, profile="nope")])
    assert status == 400
    assert body["error"] == "invalid"
    assert body["reason"] == "[3].numerics[0].values.spo2: expected number, got string"
    assert body["errors"][1].startswith("[4].profile: unknown profile")
    assert api.intake.accepted == [] and api.intake.quarantined == []
    status, body, _ = await api.post(None, raw=b'{"v": 1, "device_id": "po-1"')
    assert status == 400 and body["reason"].startswith("payload: invalid JSON")


async def test_401_without_or_with_bad_credentials_audited(api: Api):
    async with api.session.post(f"{api.url}/v1/telemetry", data=b"{}", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"] == "unauthenticated"
    for token in ("vgd_0000000000000000_" + "x" * 43, api.revoked_token, "sometoken"):
        status, body, r = await api.post(env(), token=token)
        assert status == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"], body
    async with api.session.post(f"{api.url}/v1/telemetry", data=b"{}", headers={"Authorization": "Basic abc"}) as r:
        assert r.status == 401
    assert api.intake.actions() == ["auth.failure"] * 5
    assert {a.source_addr for a in api.intake.audits} == {"127.0.0.1"}
    assert api.intake.accepted == []


async def test_403_spoofed_envelopes_audited_quarantined_nothing_taken(api: Api):
    status, body, r = await api.post([env("po-1", 1), env("po-2", 1), env("po-1", 2), env("ghost", 1)],
                                     headers={"X-Request-Id": "req-42"})
    assert status == 403, body
    assert body["reason"] == "[1].device_id: 'po-2' is not the authenticated device 'po-1'"
    assert len(body["errors"]) == 2 and body["errors"][1].startswith("[3].device_id: 'ghost'")
    assert body["correlation_id"] == r.headers["X-Correlation-Id"] == "req-42"
    assert api.intake.accepted == []
    assert [e.device_id for _, e in api.intake.quarantined] == ["po-2", "ghost"]
    assert [(a.action, a.target, a.correlation_id, a.outcome) for a in api.intake.audits] == [
        ("identity.mismatch", "po-2", "req-42", "denied"), ("identity.mismatch", "ghost", "req-42", "denied")]
    assert api.intake.audits[0].actor == f"https:{api.registry.device('po-1').token_id}"
    # an invalid envelope that claims another device is still a spoof, not a 400
    bad = env("po-2", 9)
    bad["numerics"][0]["values"]["spo2"] = "x"
    status, body, _ = await api.post(bad)
    assert status == 403 and body["reason"].startswith("device_id: 'po-2'")


async def test_api_key_cannot_post_telemetry(api: Api):
    status, body, _ = await api.post(env(), token=api.admin_key)
    assert status == 403 and "not an API key" in body["reason"]
    assert api.intake.actions() == ["authz.denied"]


async def test_413_body_and_envelope_count(api: Api):
    status, body, _ = await api.post([env(seq=i) for i in range(6)])
    assert status == 413 and "6 envelopes exceeds the limit of 5" in body["reason"]
    big = orjson.dumps(env(firmware="x" * 70_000))
    status, body, _ = await api.post(None, raw=big)
    assert status == 413 and body["error"] == "too_large"
    bomb = gzip.compress(b" " * (10 * 1024 * 1024))  # 10 KiB on the wire, 10 MiB inflated
    status, body, _ = await api.post(None, raw=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompresses" in body["reason"]

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(100):
            yield b" " * 1024

    async with api.session.post(f"{api.url}/v1/telemetry", data=chunks(),
                                headers={**api.auth(), "Content-Type": "application/json"}) as r:
        assert r.status == 413


@pytest.mark.parametrize("api", [{"body_timeout_s": 0.3}], indirect=True)
async def test_408_when_the_body_trickles_in(api: Api):
    async def slow():
        yield b'[{"v": 1, '
        await asyncio.sleep(2)
        yield b'"device_id": "po-1"}]'

    t = time.monotonic()
    async with api.session.post(f"{api.url}/v1/telemetry", data=slow(),
                                headers={**api.auth(), "Content-Type": "application/json"}) as r:
        assert r.status == 408 and (await r.json())["reason"] == "body: not received within 0.3 s"
    assert time.monotonic() - t < 1.5
    assert api.intake.accepted == []


async def test_415_content_type_and_encoding(api: Api):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": ""},
                    {"Content-Type": "application/json", "Content-Encoding": "br"}):
        status, body, _ = await api.post(env(), headers=headers)
        assert status == 415 and body["error"] == "unsupported_media_type", headers


@pytest.mark.parametrize("api", [{"rate_limit_per_s": 1.0, "rate_limit_burst": 3}], indirect=True)
async def test_429_with_retry_after_per_device(api: Api):
    statuses = [(await api.post(env(seq=i)))[0] for i in range(4)]
    assert statuses == [202, 202, 202, 429]
    status, body, r = await api.post(env(seq=9))
    assert status == 429 and int(r.headers["Retry-After"]) >= 1 and body["error"] == "rate_limited"
    status, _, _ = await api.post(env("po-2", 1), token=api.token2)  # another device has its own bucket
    assert status == 202


async def test_503_while_backed_up_and_on_commit_timeout(api: Api):
    api.intake.backed_up = True
    status, body, r = await api.post(env())
    assert status == 503 and r.headers["Retry-After"] == "1" and "backed up" in body["reason"]
    assert api.intake.accepted == []
    api.intake.backed_up = False
    api.intake.hold = True
    status, body, r = await api.post(env(seq=7))
    assert status == 503 and "not confirmed within 0.5 s" in body["reason"] and r.headers["Retry-After"] == "1"
    api.intake.commit()  # stored after all: the retry finds it
    api.intake.hold = False
    status, body, _ = await api.post(env(seq=7))
    assert status == 202 and body["results"][0]["duplicate"] is True


async def test_stop_intake_closes_the_port_and_answers_open_connections_503(api: Api):
    assert (await api.post(env()))[0] == 202  # the session now holds a keep-alive connection
    api.source.stop_intake()
    status, body, r = await api.post(env(seq=1))
    assert status == 503 and "shutting down" in body["reason"] and r.headers["Connection"] == "close"
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.post(f"{api.url}/v1/telemetry", data=b"{}")


@pytest.mark.parametrize("api", [{"commit_timeout_s": 30.0}], indirect=True)
async def test_close_answers_requests_still_waiting_with_503(api: Api):
    """The drain ended before their commit: they get 503 (retry is safe), not a hang."""
    api.intake.hold = True
    task = asyncio.create_task(api.post(env(seq=3)))
    await await_for(lambda: api.intake.in_flight == 1, timeout=10)  # taken, waiting for its commit
    assert not task.done()
    api.source.stop_intake()
    await api.source.close()
    status, body, r = await asyncio.wait_for(task, 5)
    assert status == 503 and "not confirmed" in body["reason"] and r.headers["Retry-After"] == "1"


async def test_correlation_id_is_taken_only_when_sane(api: Api):
    _, body, r = await api.post(env(), headers={"X-Correlation-Id": "abc.DEF-1:2"})
    assert r.headers["X-Correlation-Id"] == body["correlation_id"] == "abc.DEF-1:2"
    _, body, r = await api.post(env(seq=1), headers={"X-Request-Id": "bad id\u00e9" * 3})
    assert len(r.headers["X-Correlation-Id"]) == 32 and body["correlation_id"] == r.headers["X-Correlation-Id"]


async def test_scopes_on_status_and_device_endpoints(api: Api):
    async def get(path: str, token: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with api.session.get(f"{api.url}{path}", headers=headers) as r:
            assert "X-Correlation-Id" in r.headers
            return r.status, await r.json()

    status, body = await get("/v1/status", api.read_key)
    assert status == 200 and body["gateway_id"] == "gw-test" and body["backed_up"] is False
    assert body["accepting"] is True and body["in_flight"] == 0
    assert (await get("/v1/status", api.admin_key))[0] == 403  # scopes are independent
    assert (await get("/v1/status", api.token))[0] == 403  # a device token
    assert (await get("/v1/status", None))[0] == 401
    status, body = await get("/v1/devices/po-3", api.admin_key)
    assert status == 200 and body == {"device_id": "po-3", "profile": "pulse_oximeter", "status": "revoked",
                                      "token_id": api.registry.device("po-3").token_id, "cert_subject": None}
    assert (await get("/v1/devices/nobody", api.admin_key))[0] == 404
    assert (await get("/v1/devices/po-1", api.read_key))[0] == 403
    assert (await get("/v1/devices/po-1", api.token))[0] == 403
    assert api.intake.actions() == ["authz.denied"] * 2 + ["auth.failure"] + ["authz.denied"] * 2


async def test_unknown_paths_and_methods_answer_json(api: Api):
    async with api.session.get(f"{api.url}/nope") as r:
        assert r.status == 404 and (await r.json())["error"] == "not_found" and "X-Correlation-Id" in r.headers
    async with api.session.get(f"{api.url}/v1/telemetry") as r:
        assert r.status == 405 and "POST" in r.headers["Allow"] and (await r.json())["error"] == "method_not_allowed"


async def test_openapi_is_served_without_auth(api: Api):
    async with api.session.get(f"{api.url}/openapi.json") as r:
        assert r.status == 200
        doc = await r.json()
    assert "/v1/telemetry" in doc["paths"]


async def test_requests_are_counted_by_status(api: Api):
    await api.post(env())
    await api.post(env(), headers={"Content-Type": "text/plain"})
    value = api.metrics.registry.get_sample_value
    assert value("gateway_http_requests_total", {"status": "202"}) == 1
    assert value("gateway_http_requests_total", {"status": "415"}) == 1


async def test_served_routes_are_exactly_the_documented_operations(api: Api):
    async with api.session.get(f"{api.url}/openapi.json") as r:
        doc = await r.json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(route.method, route.resource.canonical.replace(":[^/]+", ""))  # type: ignore[union-attr]
              for route in api.source._app.router.routes() if route.method != "HEAD"}
    assert served == documented | {("GET", p) for p in UI_PATHS}  # the page is not an API operation
