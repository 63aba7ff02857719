"""HTTPS ingestion against the real gateway, database and TLS stack.

One gateway (TLS, mutual TLS, registration required, MQTT off) on a database of this
module serves every test; each test uses devices of its own, so rate limits and stored
rows never mix. Every status code of ``POST /v1/telemetry`` is produced by the case that
should produce it, over TLS with keep-alive, and every 202 is checked against the rows
in the database right after the answer.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import itertools
import tempfile
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import orjson
import pytest
import pytest_asyncio
import trustme

from tests.harness import REPO, Mosquitto, PostgresCluster
from tests.integration.support import Publisher
from tests.harness.https import HttpsGateway

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

T0 = (int(time.time()) - 1800) * 1000
DEVICES = [f"hx-{i:02d}" for i in range(12)]
_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    name = f"https_{next(_db_numbers)}_{time.monotonic_ns() % 10**8}"
    dsn = pg_cluster.create_database(name)
    workdir = Path(tempfile.mkdtemp(prefix="vitalgate-https-"))
    g = HttpsGateway(
        workdir, dsn, DEVICES,
        settings={
            "VITALGATE_HTTP_MAX_BODY_BYTES": str(1024 * 1024),
            "VITALGATE_HTTP_MAX_ENVELOPES_PER_REQUEST": "50",
            "VITALGATE_HTTP_RATE_LIMIT_PER_S": "2",
            "VITALGATE_HTTP_RATE_LIMIT_BURST": "30",
            "VITALGATE_HTTP_COMMIT_TIMEOUT_S": "2",
            "VITALGATE_MAX_MEMORY_MIB": "64",  # 4 MiB of held payloads before the writer counts as backed up
            "VITALGATE_SHUTDOWN_TIMEOUT_S": "20",
        },
        cert_devices={"cn-dev": "", "uri-dev": "", "bound-dev": "CN=someone,O=Acme Devices", "revoked-dev": "",
                      "gone": ""},
    )
    try:
        g.start()
        from tests.harness.https import cli

        cli(dsn, "devices", "revoke", "revoked-dev")
        cli(dsn, "devices", "revoke", DEVICES[11])
        yield g
        assert g.stop() == 0, g.proc.log_tail() if g.proc else ""
    finally:
        g.stop()
        pg_cluster.drop_database(name)


@pytest_asyncio.fixture(loop_scope="module")
async def session(gw: HttpsGateway) -> AsyncIterator[aiohttp.ClientSession]:
    conn = aiohttp.TCPConnector(ssl=gw.ssl_context(), limit=4)
    async with aiohttp.ClientSession(base_url=gw.url, connector=conn) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def db(gw: HttpsGateway) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(gw.dsn)
    yield conn
    await conn.close()


def envelope(device: str, seq: int, n: int = 10, **extra: object) -> dict:
    return {"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
            "numerics": [{"t": T0 + (seq * n + k) * 1000, "values": {"spo2": 95 + k % 4}} for k in range(n)], **extra}


async def post(s: aiohttp.ClientSession, body: object, *, token: str | None, ct: str = "application/json",
               headers: dict[str, str] | None = None, data: Any = None) -> tuple[int, dict, Any]:
    h = {"Content-Type": ct, **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    payload = data if data is not None else (orjson.dumps(body) if ct == "application/json" else msgspec.msgpack.encode(body))
    async with s.post("/v1/telemetry", data=payload, headers=h) as r:
        return r.status, await r.json(), r.headers.copy()


async def readings_of(db: asyncpg.Connection, device: str) -> int:
    return await db.fetchval("SELECT count(*) FROM readings WHERE device_id = $1", device)


# ------------------------------------------------------------------ 202 and idempotency


async def test_202_comes_after_commit_and_a_retry_stores_once(gw: HttpsGateway, session, db):
    dev = DEVICES[0]
    body = [envelope(dev, s) for s in range(50)]  # 50 envelopes x 10 readings
    status, ans, headers = await post(session, body, token=gw.tokens[dev], headers={"X-Request-Id": "batch-0001"})
    assert status == 202, ans
    # the rows exist at the moment of the answer: no waiting here
    ids = [r["ingest_id"] for r in ans["results"]]
    assert await readings_of(db, dev) == 500
    assert sorted(ids) == sorted(await db.fetchval("SELECT array_agg(id) FROM ingests WHERE device_id = $1", dev))
    assert [r["status"] for r in ans["results"]] == ["stored"] * 50
    assert headers["X-Correlation-Id"] == ans["correlation_id"] == "batch-0001"
    prov = await db.fetchrow(
        "SELECT source, principal, topic_or_path, encoding, gateway_id, n_readings FROM ingests WHERE id = $1", ids[0])
    token_id = gw.tokens[dev].split("_")[1]
    assert dict(prov) == {"source": "https", "principal": token_id, "topic_or_path": "/v1/telemetry",
                          "encoding": "json", "gateway_id": "test-gw", "n_readings": 10}
    # the same body again: same ids, all duplicates, nothing stored twice
    status, again, _ = await post(session, body, token=gw.tokens[dev])
    assert status == 202
    assert [r["ingest_id"] for r in again["results"]] == ids and all(r["duplicate"] for r in again["results"])
    assert await readings_of(db, dev) == 500
    # one envelope of the array posted alone is the same envelope
    status, one, _ = await post(session, None, token=gw.tokens[dev], data=orjson.dumps(body[7]))
    assert status == 202 and one["results"][0] == {"index": 0, "status": "duplicate", "ingest_id": ids[7],
                                                   "duplicate": True, "reason": None}


async def test_msgpack_gzip_body(gw: HttpsGateway, session, db):
    dev = DEVICES[1]
    body = gzip.compress(msgspec.msgpack.encode([envelope(dev, s) for s in range(5)]))
    status, ans, _ = await post(session, None, token=gw.tokens[dev], ct="application/msgpack",
                                headers={"Content-Encoding": "gzip"}, data=body)
    assert status == 202, ans
    assert await readings_of(db, dev) == 50
    assert await db.fetchval("SELECT count(*) FROM ingests WHERE device_id = $1 AND encoding = 'msgpack'", dev) == 5


# ------------------------------------------------------------------ refusals


async def test_400_names_index_and_field_and_stores_nothing(gw: HttpsGateway, session, db):
    dev = DEVICES[2]
    bad = envelope(dev, 3)
    bad["numerics"][1]["values"]["spo2"] = "ninety"
    status, ans, _ = await post(session, [envelope(dev, 0), envelope(dev, 1), envelope(dev, 2), bad], token=gw.tokens[dev])
    assert status == 400 and ans["error"] == "invalid"
    assert ans["reason"] == "[3].numerics[1].values.spo2: expected number, got string"
    assert await readings_of(db, dev) == 0
    assert await db.fetchval("SELECT count(*) FROM rejected WHERE device_id = $1", dev) == 0


async def test_401_for_missing_unknown_and_revoked_credentials(gw: HttpsGateway, session, db):
    before = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'auth.failure'")
    for token in (None, "vgd_0123456789abcdef_" + "A" * 43, gw.tokens[DEVICES[11]]):  # none, unknown, revoked
        status, ans, headers = await post(session, envelope(DEVICES[11], 0), token=token)
        assert status == 401 and ans["error"] == "unauthenticated", ans
        assert headers["WWW-Authenticate"].startswith("Bearer")
    await _wait_audit(db, "auth.failure", before + 3)
    assert await readings_of(db, DEVICES[11]) == 0


async def test_403_for_keys_on_telemetry_and_devices_on_key_operations(gw: HttpsGateway, session, db):
    status, ans, _ = await post(session, envelope(DEVICES[3], 0), token=gw.keys["admin"])
    assert status == 403 and "not an API key" in ans["reason"]
    auth = {"Authorization": f"Bearer {gw.tokens[DEVICES[3]]}"}
    async with session.get("/v1/status", headers=auth) as r:
        assert r.status == 403
    async with session.get("/v1/status", headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as r:
        assert r.status == 403 and "lacks scope 'telemetry:read'" in (await r.json())["reason"]
    async with session.get("/v1/status", headers={"Authorization": f"Bearer {gw.keys['read']}"}) as r:
        assert r.status == 200
        state = await r.json()
        assert state["accepting"] is True and state["backed_up"] is False and state["gateway_id"] == "test-gw"
    async with session.get("/v1/devices/bound-dev", headers={"Authorization": f"Bearer {gw.keys['read']}"}) as r:
        assert r.status == 403
    async with session.get("/v1/devices/bound-dev", headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as r:
        assert r.status == 200
        rec = await r.json()
        assert rec["cert_subject"] == "CN=someone,O=Acme Devices" and rec["status"] == "active"
        assert "token" not in rec and not any("sha" in k for k in rec)
    async with session.get("/v1/devices/nobody", headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as r:
        assert r.status == 404
    await _wait_audit(db, "authz.denied", 4)
    assert await readings_of(db, DEVICES[3]) == 0


async def test_413_for_large_bodies_many_envelopes_and_gzip_bombs(gw: HttpsGateway, session):
    tok = gw.tokens[DEVICES[4]]
    status, ans, _ = await post(session, [envelope(DEVICES[4], s, n=1) for s in range(51)], token=tok)
    assert status == 413 and "51 envelopes exceeds the limit of 50" in ans["reason"]
    status, ans, _ = await post(session, None, token=tok, data=io.BytesIO(b" " * (1024 * 1024 + 1)))
    assert status == 413 and ans["error"] == "too_large"
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 KiB on the wire, 64 MiB inflated
    status, ans, _ = await post(session, None, token=tok, data=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompresses to more than" in ans["reason"]


async def test_415_for_unsupported_types_and_encodings(gw: HttpsGateway, session):
    tok = gw.tokens[DEVICES[4]]
    assert (await post(session, None, token=tok, ct="text/csv", data=b"a,b"))[0] == 415
    assert (await post(session, envelope(DEVICES[4], 0), token=tok, headers={"Content-Encoding": "br"}))[0] == 415


async def test_429_with_retry_after_from_the_device_bucket(gw: HttpsGateway, session, db):
    dev = DEVICES[5]
    conn = aiohttp.TCPConnector(ssl=gw.ssl_context(), limit=60)
    t = time.monotonic()
    async with aiohttp.ClientSession(base_url=gw.url, connector=conn) as many:
        answers = await asyncio.gather(*(post(many, envelope(dev, s, n=1), token=gw.tokens[dev]) for s in range(60)))
    elapsed = time.monotonic() - t
    statuses = [a[0] for a in answers]
    assert set(statuses) == {202, 429}
    assert 30 <= statuses.count(202) <= 30 + 2 * elapsed + 1  # the burst, plus what 2/s refilled meanwhile
    for status, ans, headers in answers:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1 and ans["error"] == "rate_limited"
    assert await readings_of(db, dev) == statuses.count(202)  # every 202 stored, no 429
    # another device is not limited by this one
    assert (await post(session, envelope(DEVICES[6], 0, n=1), token=gw.tokens[DEVICES[6]]))[0] == 202


async def test_503_on_commit_timeout_and_while_backed_up_then_the_retry_is_stored_once(gw: HttpsGateway, session, db):
    dev = DEVICES[7]
    tok = gw.tokens[dev]
    wave = [round(0.5 + (k % 50) / 100, 2) for k in range(40_000)]  # ~200 KiB per envelope
    big = [[{**envelope(dev, 100 + r * 5 + i, n=1), "waveforms": [{"metric": "pleth", "t0": T0 + (100 + r * 5 + i) * 1000,
                                                                  "hz": 125.0, "samples": wave}]} for i in range(4)]
           for r in range(7)]  # 6 requests of ~800 KiB: more than the 4 MiB the writer may hold, then one more
    locker = await asyncpg.connect(gw.dsn)
    tx = locker.transaction()
    await tx.start()
    await locker.execute("LOCK TABLE ingests IN ACCESS EXCLUSIVE MODE")  # the writer cannot commit
    try:
        t = time.monotonic()
        answers = await asyncio.gather(*(post(session, b, token=tok) for b in big[:6]))
        assert all(a[0] == 503 and "not confirmed within 2 s" in a[1]["reason"] for a in answers), answers
        assert time.monotonic() - t >= 2.0
        assert all(a[2]["Retry-After"] == "1" for a in answers)
        status, ans, headers = await post(session, big[6], token=tok)
        assert status == 503 and "backed up" in ans["reason"] and headers["Retry-After"] == "1"
        assert (await post(session, envelope(DEVICES[8], 0), token=gw.tokens[DEVICES[8]]))[0] == 503
    finally:
        await tx.rollback()
        await locker.close()
    # the first six requests' envelopes were taken: they are stored once the lock is gone
    async def stored() -> bool:
        return await db.fetchval("SELECT count(*) FROM ingests WHERE device_id = $1", dev) == 24
    await _until(stored)
    status, ans, _ = await post(session, big[0], token=tok)
    assert status == 202 and all(r["duplicate"] for r in ans["results"])
    status, ans, _ = await post(session, big[6], token=tok)
    assert status == 202 and not any(r["duplicate"] for r in ans["results"])
    assert await db.fetchval("SELECT count(*) FROM ingests WHERE device_id = $1", dev) == 28


# ------------------------------------------------------------------ spoofing


async def test_spoofing_over_https_is_refused_audited_and_stores_nothing(gw: HttpsGateway, session, db):
    me, victim = DEVICES[9], DEVICES[10]
    tok = gw.tokens[me]
    claims = [victim, "revoked-dev", "unregistered-x", victim]
    n_spoofed = 0
    bodies: list[object] = []
    for i, other in enumerate(claims):  # alone, and hidden among the device's own envelopes
        bodies.append(envelope(other, i))
        bodies.append([envelope(me, 10 + i), envelope(other, 20 + i), envelope(me, 30 + i)])
        n_spoofed += 2
    bad = envelope(victim, 99)
    bad["numerics"][0]["values"]["spo2"] = "x"  # invalid too: still a spoof
    bodies.append(bad)
    n_spoofed += 1
    for b in bodies:
        status, ans, _ = await post(session, b, token=tok)
        assert status == 403 and ans["error"] == "forbidden", ans
        assert "device_id" in ans["reason"]
    for dev in (me, victim, "revoked-dev", "unregistered-x"):
        assert await readings_of(db, dev) == 0, dev  # not even the device's own envelopes of a refused request
    async def audited() -> bool:
        n = await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE actor = $1 AND outcome = 'denied' AND action IN "
            "('identity.mismatch', 'device.revoked', 'device.unregistered')", f"https:{tok.split('_')[1]}")
        return n == n_spoofed
    await _until(audited)
    rows = await db.fetch("SELECT action, target, source_addr, detail FROM audit_log WHERE actor = $1 ORDER BY id",
                          f"https:{tok.split('_')[1]}")
    assert {r["source_addr"] for r in rows} == {"127.0.0.1"}
    assert {(r["action"], r["target"]) for r in rows} == {
        ("identity.mismatch", victim), ("device.revoked", "revoked-dev"), ("device.unregistered", "unregistered-x")}
    assert await db.fetchval("SELECT count(*) FROM rejected WHERE principal = $1", tok.split("_")[1]) == n_spoofed


# ------------------------------------------------------------------ mutual TLS


async def _post_with_cert(gw: HttpsGateway, cert: Path | None, body: object, token: str | None = None
                          ) -> tuple[int, dict]:
    conn = aiohttp.TCPConnector(ssl=gw.ssl_context(cert))
    async with aiohttp.ClientSession(base_url=gw.url, connector=conn) as s:
        status, ans, _ = await post(s, body, token=token)
        return status, ans


async def test_mutual_tls_names_the_device_by_san_uri_or_cn(gw: HttpsGateway, db):
    cn = gw.client_ca.issue("cn", cn="cn-dev")
    uri = gw.client_ca.issue("uri", cn="not-this", uri="urn:vitalgate:device:uri-dev")
    status, ans = await _post_with_cert(gw, cn, envelope("cn-dev", 0))
    assert status == 202, ans
    assert await readings_of(db, "cn-dev") == 10
    principal = await db.fetchval("SELECT principal FROM ingests WHERE id = $1", ans["results"][0]["ingest_id"])
    assert principal == "CN=cn-dev,O=Acme Devices"
    status, ans = await _post_with_cert(gw, uri, envelope("uri-dev", 0))
    assert status == 202, ans
    status, ans = await _post_with_cert(gw, uri, envelope("not-this", 0))  # the URI wins over the CN
    assert status == 403
    bound = gw.client_ca.issue("bound", cn="someone")  # the registry binds this subject to bound-dev
    assert (await _post_with_cert(gw, bound, envelope("bound-dev", 0)))[0] == 202
    imposter = gw.client_ca.issue("imposter", cn="bound-dev")  # names bound-dev but lacks its registered subject
    assert (await _post_with_cert(gw, imposter, envelope("bound-dev", 1)))[0] == 403
    assert await readings_of(db, "bound-dev") == 10


async def test_mutual_tls_refuses_wrong_missing_revoked_and_unregistered(gw: HttpsGateway, db):
    wrong = gw.other_ca.issue("wrong", cn="gone")  # valid-looking, signed by another CA: the handshake fails
    with pytest.raises(aiohttp.ClientError):
        await _post_with_cert(gw, wrong, envelope("gone", 0))
    status, ans = await _post_with_cert(gw, None, envelope("gone", 0))  # no certificate, no token
    assert status == 401
    # no certificate but a token: bearer tokens still work on the mutual-TLS port
    status, ans = await _post_with_cert(gw, None, envelope(DEVICES[6], 50), token=gw.tokens[DEVICES[6]])
    assert status == 202
    revoked = gw.client_ca.issue("revoked", cn="revoked-dev")
    status, ans = await _post_with_cert(gw, revoked, envelope("revoked-dev", 0))
    assert status == 403 and "revoked" in ans["reason"]
    stranger = gw.client_ca.issue("stranger", cn="stranger-1")
    status, ans = await _post_with_cert(gw, stranger, envelope("stranger-1", 0))
    assert status == 403 and "not registered" in ans["reason"]
    for dev in ("gone", "revoked-dev", "stranger-1"):
        assert await readings_of(db, dev) == 0
    await _wait_audit(db, "device.unregistered", 1, actor="https:CN=stranger-1,O=Acme Devices")


# ------------------------------------------------------------------ helpers


async def _until(predicate, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate.__name__}"
        await asyncio.sleep(0.05)


async def _wait_audit(db: asyncpg.Connection, action: str, at_least: int, actor: str | None = None) -> None:
    async def enough() -> bool:
        if actor is None:
            n = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = $1", action)
        else:
            n = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = $1 AND actor = $2", action, actor)
        return n >= at_least
    enough.__name__ = f"{at_least} audit entries {action}"
    await _until(enough)


# ------------------------------------------------------------------ start-up errors


@pytest.mark.parametrize("case", ["port taken", "port of a running gateway", "missing certificate",
                                  "key of another certificate"])
async def test_start_up_stops_with_exit_2_naming_the_http_setting(gw: HttpsGateway, case: str, tmp_path: Path):
    assert gw.proc is not None
    env = {**gw.proc.env, "VITALGATE_METRICS_PORT": "0"}
    blocker = None
    if case == "port taken":
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share it
        blocker.listen()
        env["VITALGATE_HTTP_PORT"] = str(blocker.getsockname()[1])
        expected = "http.host/http.port: cannot listen on 127.0.0.1:"
    elif case == "port of a running gateway":  # one gateway's port is shared by its own workers only
        env["VITALGATE_HTTP_PORT"] = str(gw.port)
        expected = "http.host/http.port: cannot listen on 127.0.0.1:"
    elif case == "missing certificate":
        env["VITALGATE_HTTP_TLS_CERT"] = str(tmp_path / "nope.pem")
        expected = "http.tls_cert/http.tls_key/http.tls_client_ca: cannot load"
    else:
        other = trustme.CA().issue_cert("127.0.0.1")
        other.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        env["VITALGATE_HTTP_TLS_CERT"] = str(tmp_path / "cert.pem")  # the key stays the first certificate's
        expected = "http.tls_cert/http.tls_key/http.tls_client_ca: cannot load"
    try:
        r = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "run"], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=60)
    finally:
        if blocker is not None:
            blocker.close()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Start-up failed." in r.stderr and expected in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------ shutdown


async def test_sigterm_answers_requests_in_flight_after_their_commit_and_stops_listening(pg_cluster: PostgresCluster):
    """A request waiting for its commit when SIGTERM arrives gets its 202 once the drain
    commits it; the port stops accepting at once; the gateway exits 0."""
    name = f"https_stop_{time.monotonic_ns() % 10**8}"
    dsn = pg_cluster.create_database(name)
    g = HttpsGateway(Path(tempfile.mkdtemp(prefix="vitalgate-https-stop-")), dsn, ["sd-1"],
                     settings={"VITALGATE_SHUTDOWN_TIMEOUT_S": "30"})
    try:
        g.start()
        assert g.proc is not None
        locker = await asyncpg.connect(dsn)
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE ingests IN ACCESS EXCLUSIVE MODE")
        conn = aiohttp.TCPConnector(ssl=g.ssl_context())
        async with aiohttp.ClientSession(base_url=g.url, connector=conn) as s:
            pending = asyncio.create_task(post(s, [envelope("sd-1", i) for i in range(3)], token=g.tokens["sd-1"]))
            await _until(_write_waits_for_lock(dsn))  # the request is in flight, its commit held by the lock
            assert not pending.done()
            g.proc.proc.send_signal(15)  # type: ignore[union-attr]
            await _until(_log_says(g, "Draining."))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=g.ssl_context())) as fresh:
                async def refused() -> bool:
                    try:
                        async with fresh.get(f"{g.url}/openapi.json"):
                            return False
                    except aiohttp.ClientConnectionError:
                        return True
                await _until(refused, 10)
            assert not pending.done()
            await tx.rollback()
            await locker.close()
            status, ans, _ = await asyncio.wait_for(pending, 30)
        assert status == 202, ans
        check = await asyncpg.connect(dsn)
        try:
            assert await readings_of(check, "sd-1") == 30
        finally:
            await check.close()
        assert g.proc.proc.wait(30) == 0, g.proc.log_tail()  # type: ignore[union-attr]
    finally:
        g.stop()
        pg_cluster.drop_database(name)


def _write_waits_for_lock(dsn: str):  # noqa: ANN202
    """True once a backend of the gateway waits on a lock in a statement on ``ingests``: the
    request's write transaction, which cannot commit while the table is locked. Asked on a
    connection of its own: a transaction sees one snapshot of pg_stat_activity."""
    async def write_waits_for_lock() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                    "AND wait_event_type = 'Lock' AND query LIKE '%ingests%'")
        finally:
            await conn.close()
        return n > 0
    return write_waits_for_lock


def _log_says(g: HttpsGateway, text: str):  # noqa: ANN202
    async def says() -> bool:
        assert g.proc is not None
        return text in g.proc.log_text()
    says.__name__ = f"log line {text!r}"
    return says


# ------------------------------------------------------------------ both transports


async def test_mqtt_and_https_in_one_gateway_share_validation_dedupe_and_provenance(
        pg_cluster: PostgresCluster, broker: Mosquitto):
    """One gateway with both sources: the same envelope bytes arrive over MQTT and then over
    HTTPS and are stored once (the 202 names the MQTT copy's ingest id); provenance says
    which transport stored it and who sent it."""
    name = f"https_mq_{time.monotonic_ns() % 10**8}"
    dsn = pg_cluster.create_database(name)
    g = HttpsGateway(Path(tempfile.mkdtemp(prefix="vitalgate-https-mq-")), dsn, ["both-1"],
                     settings={"VITALGATE_MQTT_ENABLED": "true", "VITALGATE_MQTT_URL": broker.url,
                               "VITALGATE_MQTT_CLIENT_ID": f"gw-both-{time.monotonic_ns()}"})
    try:
        g.start()
        await _until(_log_says(g, "Subscribed."))
        check = await asyncpg.connect(dsn)
        try:
            first, second = (orjson.dumps(envelope("both-1", s)) for s in (1, 2))
            pub = Publisher(broker.port)
            pub.publish("devices/both-1/telemetry", first)
            pub.wait_acked()
            pub.close()

            async def mqtt_stored() -> bool:
                return await check.fetchval("SELECT count(*) FROM ingests WHERE source = 'mqtt'") == 1
            await _until(mqtt_stored)
            mqtt_id = await check.fetchval("SELECT id FROM ingests WHERE source = 'mqtt'")
            async with aiohttp.ClientSession(base_url=g.url, connector=aiohttp.TCPConnector(ssl=g.ssl_context())) as s:
                status, ans, _ = await post(s, None, token=g.tokens["both-1"], data=b"[" + first + b"," + second + b"]")
            assert status == 202, ans
            assert [(r["status"], r["ingest_id"] == mqtt_id) for r in ans["results"]] == [("duplicate", True),
                                                                                        ("stored", False)]
            rows = await check.fetch("SELECT source, principal, topic_or_path FROM ingests ORDER BY id")
            assert [tuple(r) for r in rows] == [("mqtt", "both-1", "devices/both-1/telemetry"),
                                                 ("https", g.tokens["both-1"].split("_")[1], "/v1/telemetry")]
            assert await readings_of(check, "both-1") == 20
        finally:
            await check.close()
    finally:
        g.stop()
        pg_cluster.drop_database(name)


# ------------------------------------------------------------------ workers


async def test_two_workers_share_the_port_and_answer_after_the_owners_commit(pg_cluster: PostgresCluster):
    """``--workers 2``: both workers listen on the port (SO_REUSEPORT); whichever takes a
    request, each envelope is committed by the worker owning its device, and the 202
    (with the ingest ids) comes after that commit."""
    name = f"https_w2_{time.monotonic_ns() % 10**8}"
    dsn = pg_cluster.create_database(name)
    devices = [f"wk-{i}" for i in range(8)]
    g = HttpsGateway(Path(tempfile.mkdtemp(prefix="vitalgate-https-w2-")), dsn, devices, workers=2)
    try:
        g.start()
        assert g.proc is not None
        answers = []
        for round_ in range(3):  # fresh connections: the kernel spreads them over both workers
            conn = aiohttp.TCPConnector(ssl=g.ssl_context(), force_close=True)
            async with aiohttp.ClientSession(base_url=g.url, connector=conn) as s:
                answers += await asyncio.gather(*(
                    post(s, [envelope(d, round_ * 10 + k) for k in range(5)], token=g.tokens[d]) for d in devices))
        assert [a[0] for a in answers] == [202] * 24, answers
        check = await asyncpg.connect(dsn)
        try:
            ids = sorted(r["ingest_id"] for a in answers for r in a[1]["results"])
            assert ids == sorted(await check.fetchval("SELECT array_agg(id) FROM ingests"))
            assert await check.fetchval("SELECT count(*) FROM readings") == 24 * 5 * 10
            # each device's envelopes were committed by one worker, and both workers own some
            owners = await check.fetch("SELECT device_id, array_agg(DISTINCT gateway_id) AS g FROM ingests GROUP BY 1")
            assert all(len(r["g"]) == 1 for r in owners) and len({r["g"][0] for r in owners}) == 2
        finally:
            await check.close()
        assert g.proc.log_text().count("HTTPS listening.") == 2
        forwarded = 0.0
        for port in (g.proc.metrics_port, g.proc.metrics_port + 1):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            forwarded += sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                             if line.startswith("gateway_forwarded_messages_total "))
        assert forwarded > 0  # some requests reached the worker not owning their device
    finally:
        g.stop()
        pg_cluster.drop_database(name)
