"""The FHIR R4 facade and the FHIR export against a real gateway, database and TLS stack.

One gateway (HTTPS, registration required, MQTT off) on a database of this module; data in
through ``POST /v1/telemetry`` (answered after commit), associations through the CLI. Every
search is compared with SQL over ``readings_all`` and ``waveform_blocks_all``; every resource
received is validated with the FHIR R4 models (``tests.fhir.validate``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

import aiohttp
import asyncpg
import numpy as np
import orjson
import pytest
import pytest_asyncio

from gateway.fhir.mapping import LOINC, MDC
from gateway.sources.http.api import OPERATIONS
from tests.fhir.validate import validate
from tests.harness import PostgresCluster
from tests.harness.https import HttpsGateway, cli, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

T0 = ((int(time.time()) - 7200) // 60 * 60) * 1000 + 17_500
A, B, BP = "fh-a", "fh-b", "fh-bp"
FHIR = "application/fhir+json"


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    with running_gateway(pg_cluster, "fhir", [A, B, BP]) as g:
        yield g


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def session(gw: HttpsGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=gw.ssl_context())) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def db(gw: HttpsGateway) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(gw.dsn)
    yield conn
    await conn.close()


async def post(s: aiohttp.ClientSession, gw: HttpsGateway, envs: list[dict]) -> None:
    async with s.post("/v1/telemetry", data=orjson.dumps(envs),
                      headers={"Authorization": f"Bearer {gw.tokens[envs[0]['device_id']]}",
                               "Content-Type": "application/json"}) as r:
        assert r.status == 202, await r.text()


async def fetch(s: aiohttp.ClientSession, gw: HttpsGateway, path: str, status: int = 200, key: str | None = "read",
                params: list[tuple[str, str]] | dict | None = None) -> dict:
    headers = {"Authorization": f"Bearer {gw.keys[key]}"} if key else {}
    async with s.get(path, params=params, headers=headers) as r:
        body = orjson.loads(await r.read())
        assert r.status == status, body
        assert r.content_type == FHIR, r.content_type
        validate(body)
        return body


async def search(s, gw, params: list[tuple[str, str]]) -> list[dict]:
    """Every page of an Observation search, following ``next`` links."""
    out: list[dict] = []
    url: str | None = "/fhir/r4/Observation"
    query: list[tuple[str, str]] | None = params
    for _ in range(10_000):
        body = await fetch(s, gw, url, params=query)
        assert body["type"] == "searchset"
        out += [e["resource"] for e in body.get("entry", [])]
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        if not nxt:
            return out
        url, query = nxt[0].removeprefix(gw.url), None
    raise AssertionError("paging never ended")


def _ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def summary(obs: dict) -> tuple:
    """What an Observation says, in the database's terms: (device, metric code, t, values)."""
    mdc = next(c["code"] for c in obs["code"]["coding"] if c["system"] == MDC)
    t = _ms(obs["effectiveDateTime"])
    dev = obs["device"]["display"]
    if "component" in obs:
        vals = tuple(sorted((next(c["code"] for c in comp["code"]["coding"] if c["system"] == MDC),
                             comp["valueQuantity"]["value"]) for comp in obs["component"]))
        return (dev, mdc, t, vals)
    if "valueSampledData" in obs:
        # the stored float32 samples, read back from their shortest text
        return (dev, mdc, t, tuple(float(np.float32(x)) for x in obs["valueSampledData"]["data"].split()))
    return (dev, mdc, t, obs["valueQuantity"]["value"])


MDC_OF = {"spo2": "150456", "pulse_rate": "149530", "pleth": "150452", "perfusion_index": "150448",
          "nibp_sys": "150021", "nibp_dia": "150022", "nibp_mean": "150023"}


async def db_summaries(db, wins: list[tuple[str, int, int]], metrics: set[str] | None = None) -> Counter:
    """The same summaries computed with SQL over the views (blood pressure grouped per time)."""
    out: Counter = Counter()
    for d, lo, hi in wins:
        rows = await db.fetch(
            "SELECT metric, (extract(epoch FROM time) * 1000)::bigint AS t, value FROM readings_all WHERE device_id = $1"
            " AND time >= to_timestamp($2 / 1000.0) AND time < to_timestamp($3 / 1000.0)", d, lo, hi)
        bp: dict[int, list] = {}
        for r in rows:
            if metrics is not None and r["metric"] not in metrics:
                continue
            if r["metric"].startswith("nibp_"):
                bp.setdefault(r["t"], []).append((MDC_OF[r["metric"]], r["value"]))
            else:
                code = "149546" if (d, r["metric"]) == (BP, "pulse_rate") else MDC_OF[r["metric"]]  # nibp_cuff's
                out[(d, code, r["t"], r["value"])] += 1
        for t, vals in bp.items():
            out[(d, "150020", t, tuple(sorted(vals)))] += 1
        blocks = await db.fetch(
            "SELECT metric, (extract(epoch FROM time) * 1000)::bigint AS t, samples FROM waveform_blocks_all"
            " WHERE device_id = $1 AND time >= to_timestamp($2 / 1000.0) AND time < to_timestamp($3 / 1000.0)",
            d, lo, hi)
        for b in blocks:
            if metrics is None or b["metric"] in metrics:
                out[(d, MDC_OF[b["metric"]], b["t"], tuple(float(x) for x in b["samples"]))] += 1
    return out


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def loaded(gw, session, db) -> dict:
    """Two oximeters for 120 s (spo2 + pulse at 1 Hz, pleth every 10 s, one spo2 artifact) and a cuff
    (one measurement a minute); patient P-1 wears A, hands it to P-2, gets it back, and wears B and the cuff."""
    for dev in (A, B):
        envs = []
        for i in range(12):
            t = T0 + i * 10_000
            envs.append({"v": 1, "device_id": dev, "seq": i, "profile": "pulse_oximeter",
                         "numerics": [{"t": t + k * 1000, "values": {
                             "spo2": 150 if (dev == A and i == 3 and k == 4) else 95 + (i + k) % 4,
                             "pulse_rate": 60 + k}} for k in range(10)],
                         "waveforms": [{"metric": "pleth", "t0": t, "hz": 125.0,
                                        "samples": [round(0.01 * ((i * 7 + j) % 50), 2) for j in range(125)]}]})
        await post(session, gw, envs)
    await post(session, gw, [{"v": 1, "device_id": BP, "seq": i, "profile": "nibp_cuff", "numerics": [
        {"t": T0 + i * 60_000, "values": {"nibp_sys": 118 + i, "nibp_dia": 76 + i, "nibp_mean": 90 + i,
                                          "pulse_rate": 70 + i}}]} for i in range(3)])
    cli(gw.dsn, "associate", A, "--patient", "P-1", "--at", str(T0 + 5_000))
    cli(gw.dsn, "dissociate", A, "--at", str(T0 + 40_000))
    cli(gw.dsn, "associate", A, "--patient", "P-2", "--at", str(T0 + 40_000))
    cli(gw.dsn, "dissociate", A, "--at", str(T0 + 70_000))
    cli(gw.dsn, "associate", A, "--patient", "P-1", "--at", str(T0 + 70_000))
    cli(gw.dsn, "associate", B, "--patient", "P-1", "--at", str(T0 + 60_000))
    cli(gw.dsn, "associate", BP, "--patient", "P-1", "--at", str(T0))
    end = T0 + 200_000
    return {"P-1": [(A, T0 + 5_000, T0 + 40_000), (A, T0 + 70_000, end), (B, T0 + 60_000, end), (BP, T0, end)],
            "P-2": [(A, T0 + 40_000, T0 + 70_000)], "end": end}


async def test_search_by_patient_equals_the_database_across_a_reassociation(gw, session, db, loaded):
    frm, to = T0 - 1000, loaded["end"]
    got = await search(session, gw, [("patient", "P-1"), ("date", f"ge{iso(frm)}"), ("date", f"lt{iso(to)}"),
                                     ("_count", "17")])
    assert Counter(summary(o) for o in got) == await db_summaries(db, loaded["P-1"])
    assert len(got) > 17 * 5
    ts = [_ms(o["effectiveDateTime"]) for o in got]
    assert ts == sorted(ts)
    assert len({o["id"] for o in got}) == len(got)  # paging walked every Observation exactly once
    assert all(o["subject"]["identifier"]["value"] == "P-1" for o in got)
    bp = [o for o in got if "component" in o]
    assert len(bp) == 3 and all(o["meta"]["profile"] == ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]
                                for o in bp)
    flagged = [o for o in got if "interpretation" in o]
    assert any(o.get("meta", {}).get("security", [{}])[0].get("code") == "UNRELIABLE" and o["valueQuantity"]["value"] == 150
               for o in flagged if "valueQuantity" in o)
    # P-2 had A for 30 s: those readings are P-2's only
    p2 = await search(session, gw, [("subject", "Patient/P-2"), ("date", f"ge{iso(frm)}"), ("date", f"lt{iso(to)}")])
    assert Counter(summary(o) for o in p2) == await db_summaries(db, loaded["P-2"])
    assert not {o["id"] for o in p2} & {o["id"] for o in got}
    rows = await db.fetch("SELECT actor, action, detail FROM audit_log WHERE target = 'patient:P-1'"
                          " AND action = 'read.fhir.observation'")
    assert rows and orjson.loads(rows[0]["detail"])["from"] == frm


async def test_search_by_device_code_dates_count_and_sort(gw, session, db, loaded):
    frm, to = T0 + 12_345, T0 + 97_000
    dates = [("date", f"ge{iso(frm)}"), ("date", f"lt{iso(to)}")]
    asc = await search(session, gw, [("device", A), *dates, ("_count", "9")])
    assert Counter(summary(o) for o in asc) == await db_summaries(db, [(A, frm, to)])
    subjects = {(_ms(o["effectiveDateTime"]), o.get("subject", {}).get("identifier", {}).get("value")) for o in asc}
    assert all(p == ("P-2" if T0 + 40_000 <= t < T0 + 70_000 else "P-1") for t, p in subjects)
    desc = await search(session, gw, [("device", f"Device/{A}"), *dates, ("_count", "50"), ("_sort", "-date")])
    assert [_ms(o["effectiveDateTime"]) for o in desc] == sorted((_ms(o["effectiveDateTime"]) for o in asc),
                                                                 reverse=True)
    assert {o["id"] for o in desc} == {o["id"] for o in asc}
    # by code, in either system, or both at once
    for code in (f"{LOINC}|59408-5", f"{MDC}|150456", "59408-5", f"{LOINC}|2708-6", f"{LOINC}|59408-5,{MDC}|150456"):
        got = await search(session, gw, [("device", A), *dates, ("code", code)])
        assert Counter(summary(o) for o in got) == await db_summaries(db, [(A, frm, to)], {"spo2"}), code
    pleth = await search(session, gw, [("device", A), *dates, ("code", "150452")])
    assert Counter(summary(o) for o in pleth) == await db_summaries(db, [(A, frm, to)], {"pleth"}) and pleth
    assert all(o["valueSampledData"]["period"] == 8.0 for o in pleth)
    panel = await search(session, gw, [("device", BP), ("date", f"ge{iso(T0)}"), ("code", f"{LOINC}|85354-9")])
    assert Counter(summary(o) for o in panel) == await db_summaries(db, [(BP, T0, loaded["end"])],
                                                                    {"nibp_sys", "nibp_dia", "nibp_mean"})
    assert len(panel) == 3
    assert await search(session, gw, [("device", A), *dates, ("code", f"{LOINC}|8480-6")]) == []
    # date bounds: gt/le on whole seconds cover the second
    sec = [("date", f"gt{iso(T0 + 20_500)[:19]}{iso(0)[23:]}"), ("date", f"le{iso(T0 + 29_500)[:19]}{iso(0)[23:]}")]
    got = await search(session, gw, [("device", A), *sec])
    lo, hi = (T0 + 20_500) // 1000 * 1000 + 1000, (T0 + 29_500) // 1000 * 1000 + 1000
    assert Counter(summary(o) for o in got) == await db_summaries(db, [(A, lo, hi)])


async def test_read_by_id_device_and_provenance(gw, session, db, loaded):
    got = await search(session, gw, [("device", BP), ("date", f"ge{iso(T0)}"), ("_count", "2")])
    assert len(got) == 6  # 3 panels and 3 pulse rates
    for obs in got:
        assert await fetch(session, gw, f"/fhir/r4/Observation/{obs['id']}") == obs
    prov = await fetch(session, gw, f"/fhir/r4/Provenance/{got[0]['id']}")
    ingest = await db.fetchrow("SELECT id, payload_sha256, gateway_id, (extract(epoch FROM received_at) * 1000)::bigint"
                               " AS r FROM ingests WHERE device_id = $1 ORDER BY id LIMIT 1", BP)
    assert prov["target"] == [{"reference": f"Observation/{got[0]['id']}"}]
    assert prov["entity"][0]["what"]["identifier"]["value"] == str(ingest["id"])
    assert prov["entity"][0]["extension"][0]["valueString"] == bytes(ingest["payload_sha256"]).hex()
    assert _ms(prov["recorded"]) == ingest["r"]
    assert prov["agent"][1]["who"]["identifier"]["value"] == ingest["gateway_id"]
    dev = await fetch(session, gw, f"/fhir/r4/Device/{BP}")
    assert dev["status"] == "active" and dev["identifier"][0]["value"] == BP
    assert dev["type"]["coding"][0]["code"] == "pulse_oximeter"
    for path in ("/fhir/r4/Observation/1-2-0123456789ab", "/fhir/r4/Device/nobody", "/fhir/r4/Provenance/x"):
        body = await fetch(session, gw, path, status=404)
        assert body["issue"][0]["code"] == "not-found"


async def test_errors_are_operation_outcomes(gw, session, loaded):
    for params, word in (([("device", A), ("patient", "P-1")], "patient|subject|device"), ([("device", A), ("x", "1")], "x"),
                         ([("device", A), ("date", "ge2026-13-01")], "date"), ([("device", A), ("_count", "0")], "_count"),
                         ([("device", A), ("_page", "abc")], "_page"), ([("device", A), ("_sort", "value")], "_sort")):
        body = await fetch(session, gw, "/fhir/r4/Observation", status=400, params=params)
        assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"].startswith(word), body
    body = await fetch(session, gw, "/fhir/r4/Observation", status=401, key=None, params=[("device", A)])
    assert body["issue"][0]["code"] == "login"
    body = await fetch(session, gw, "/fhir/r4/Observation", status=403, key="admin", params=[("device", A)])
    assert body["issue"][0]["code"] == "forbidden"
    # a page token of one search is refused by another
    first = await fetch(session, gw, "/fhir/r4/Observation", params=[("device", A), ("_count", "1"),
                                                                     ("date", f"ge{iso(T0)}")])
    token = [link["url"] for link in first["link"] if link["relation"] == "next"][0].split("_page=")[1]
    await fetch(session, gw, "/fhir/r4/Observation", status=400, params=[("device", B), ("_page", token)])


async def test_capability_statement_matches_the_routes(gw, session):
    cap = await fetch(session, gw, "/fhir/r4/metadata", key=None)
    listed = {(r["type"], i["code"]) for r in cap["rest"][0]["resource"] for i in r["interaction"]}
    routes = set()
    for op in OPERATIONS:
        if op.path.startswith("/fhir/r4/") and op.path != "/fhir/r4/metadata":
            resource = op.path.split("/")[3]
            routes.add((resource, "read" if op.path.endswith("/{id}") else "search-type"))
    assert listed == routes
    search = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Observation")
    op = next(o for o in OPERATIONS if o.path == "/fhir/r4/Observation")
    assert {p["name"] for p in search["searchParam"]} == set(op.query_params) - {"_page"}
    doc = orjson.loads(await (await session.get("/openapi.json")).read())
    assert {p for p in doc["paths"] if p.startswith("/fhir/")} == {o.path for o in OPERATIONS
                                                                  if o.path.startswith("/fhir/")}


async def test_export_writes_the_search_as_ndjson(gw, session, db, loaded):
    frm, to = T0 - 1000, loaded["end"]
    out = cli(gw.dsn, "export", "fhir", "--patient", "P-1", "--from", str(frm), "--to", str(to))
    lines = [orjson.loads(x) for x in out.splitlines()]
    for obs in lines:
        validate(obs)
    got = await search(session, gw, [("patient", "P-1"), ("date", f"ge{iso(frm)}"), ("date", f"lt{iso(to)}"),
                                     ("_count", "1000")])
    assert lines == got and lines
    dev = cli(gw.dsn, "export", "fhir", "--device", A, "--from", str(frm), "--to", str(to), "--code", "150456")
    assert Counter(summary(orjson.loads(x)) for x in dev.splitlines()) == await db_summaries(
        db, [(A, frm, to)], {"spo2"})
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'export.fhir'") == 2
