"""The query API against the real gateway, database and TLS stack: answers equal the database.

One gateway (HTTPS, registration required, MQTT off) on a database of this module. Data
goes in through ``POST /v1/telemetry`` (answered after commit, so no waiting), associations
through the CLI and the API; every answer of the read routes is compared with SQL over the
same tables, including by patient across two devices and a re-association.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio

from tests.harness import PROFILES, REPO, PostgresCluster
from tests.harness.https import HttpsGateway, cli, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# an hour ago, 17.5 s past a minute: windows and minutes never line up by accident
T0 = ((int(time.time()) - 3600) // 60 * 60) * 1000 + 17_500
DEVICES = ["rd-a", "rd-b", "rd-c", "rd-d"]
_n = itertools.count(1)


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    with running_gateway(pg_cluster, "reads", DEVICES) as g:
        yield g


@pytest_asyncio.fixture(loop_scope="module")
async def session(gw: HttpsGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=gw.ssl_context())) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def db(gw: HttpsGateway) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(gw.dsn)
    yield conn
    await conn.close()


def envelope(device: str, t0: int, n: int, *, seq: int, spo2=lambda k: 95 + k % 4, pleth: bool = False) -> dict:
    env = {"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
           "numerics": [{"t": t0 + k * 1000, "values": {"spo2": spo2(k), "pulse_rate": 60 + k % 7}}
                        for k in range(n)]}
    if pleth:
        env["waveforms"] = [{"metric": "pleth", "t0": t0, "hz": 125.0, "samples": [0.01 * i for i in range(125)]}]
    return env


async def post(s: aiohttp.ClientSession, gw: HttpsGateway, envs: list[dict]) -> list[dict]:
    token = gw.tokens[envs[0]["device_id"]]
    async with s.post("/v1/telemetry", data=orjson.dumps(envs),
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
        body = await r.json()
        assert r.status == 202, body
        return body["results"]


async def get(s: aiohttp.ClientSession, gw: HttpsGateway, path: str, key: str = "read", status: int = 200, **q):
    async with s.get(path, params={k: str(v) for k, v in q.items()},
                     headers={"Authorization": f"Bearer {gw.keys[key]}"}) as r:
        body = await r.json()
        assert r.status == status, body
        return body


async def get_all(s, gw, path: str, field: str, **q) -> list[dict]:
    """Every page of a paginated answer."""
    out: list[dict] = []
    cursor = None
    for _ in range(1000):
        body = await get(s, gw, path, **q, **({"cursor": cursor} if cursor else {}))
        out.extend(body[field])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination never ended")


def _ms(col: str) -> str:
    return f"(extract(epoch FROM {col}) * 1000)::bigint"


async def db_readings(db, wins: list[tuple[str, int, int]], flags_sql: str = "true") -> list[dict]:
    rows = []
    for d, lo, hi in wins:
        rows += await db.fetch(
            f"SELECT device_id, metric, {_ms('time')} AS t, value, flags FROM readings WHERE device_id = $1"
            f" AND time >= to_timestamp($2 / 1000.0) AND time < to_timestamp($3 / 1000.0) AND {flags_sql}", d, lo, hi)
    return sorted((dict(r) for r in rows), key=lambda r: (r["t"], r["device_id"], r["metric"], r["value"], r["flags"]))


async def db_buckets(db, wins, bucket_s: int) -> list[dict]:
    rows = []
    for d, lo, hi in wins:
        rows += await db.fetch(
            f"SELECT device_id, metric, {_ms(f'time_bucket(interval {chr(39)}{bucket_s} s{chr(39)}, time)')} AS t,"
            " min(value) AS min, max(value) AS max, avg(value) AS avg, count(*) AS count FROM readings"
            " WHERE device_id = $1 AND time >= to_timestamp($2 / 1000.0) AND time < to_timestamp($3 / 1000.0)"
            " AND (flags & 131) = 0 GROUP BY 1, 2, 3", d, lo, hi)
    return sorted((dict(r) for r in rows), key=lambda r: (r["t"], r["device_id"], r["metric"]))


def _same_buckets(api: list[dict], ref: list[dict]) -> None:
    assert [(b["device_id"], b["metric"], b["t"], b["min"], b["max"], b["count"]) for b in api] == \
           [(b["device_id"], b["metric"], b["t"], b["min"], b["max"], b["count"]) for b in ref]
    for a, b in zip(api, ref):
        assert a["avg"] == pytest.approx(b["avg"], rel=1e-12)


# ------------------------------------------------------------------ device reads


async def test_readings_buckets_waveforms_latest_alerts_equal_the_database(gw, session, db):
    dev = DEVICES[0]
    # 5 minutes at 1 Hz; spo2 under 90 for 20 s opens spo2_low; one OUT_OF_RANGE value (150)
    low = lambda k: 150 if k == 33 else (85 if 100 <= k < 120 else 95 + k % 4)  # noqa: E731
    envs = [envelope(dev, T0 + i * 10_000, 10, seq=i, spo2=lambda k, i=i: low(i * 10 + k), pleth=i % 3 == 0)
            for i in range(30)]
    for chunk in range(0, 30, 10):
        await post(session, gw, envs[chunk:chunk + 10])
    frm, to = T0 + 2_300, T0 + 290_700
    wins = [(dev, frm, to)]
    raw = await get_all(session, gw, "/v1/readings", "readings", device=dev, **{"from": frm, "to": to}, limit=37)
    ref = await db_readings(db, wins)
    assert len(ref) == 2 * 288 and any(r["flags"] & 1 for r in ref)
    assert sorted(raw, key=lambda r: (r["t"], r["device_id"], r["metric"], r["value"], r["flags"])) == ref
    assert [r["t"] for r in raw] == sorted(r["t"] for r in raw)
    only = await get_all(session, gw, "/v1/readings", "readings", device=dev, **{"from": frm, "to": to}, flags="only")
    assert only == [r for r in raw if r["flags"]] and only
    clean = await get_all(session, gw, "/v1/readings", "readings", device=dev, **{"from": frm, "to": to},
                          flags="exclude", metric="spo2")
    assert clean == [r for r in raw if not r["flags"] and r["metric"] == "spo2"]
    for bucket, seconds in (("1m", 60), ("30s", 30), ("1h", 3600), ("2m", 120)):
        got = await get_all(session, gw, "/v1/readings", "buckets", device=dev, **{"from": frm, "to": to},
                            bucket=bucket, limit=4)
        _same_buckets(got, await db_buckets(db, wins, seconds))
    blocks = await get_all(session, gw, "/v1/waveforms", "blocks", device=dev, **{"from": T0, "to": T0 + 300_000},
                           limit=3)
    ref_blocks = await db.fetch(f"SELECT {_ms('time')} AS t0, samples FROM waveform_blocks WHERE device_id = $1"
                                " ORDER BY time", dev)
    assert [(b["t0"], b["samples"]) for b in blocks] == [(r["t0"], list(r["samples"])) for r in ref_blocks]
    assert len(blocks) == 10
    latest = (await get(session, gw, "/v1/latest", device=dev))["latest"]
    ref_latest = await db.fetch(f"SELECT DISTINCT ON (metric) metric, {_ms('time')} AS t, value FROM readings"
                                " WHERE device_id = $1 ORDER BY metric, time DESC", dev)
    assert [(r["metric"], r["t"], r["value"]) for r in latest] == [tuple(r) for r in ref_latest]
    alerts = (await get(session, gw, "/v1/alerts", device=dev))["alerts"]
    ref_alerts = await db.fetch(f"SELECT rule, {_ms('opened_at')} AS o, {_ms('cleared_at')} AS c, trigger_value"
                                " FROM alerts WHERE device_id = $1 ORDER BY opened_at DESC", dev)
    assert [(a["rule"], a["opened_at"], a["cleared_at"], a["value"]) for a in alerts] == [tuple(r) for r in ref_alerts]
    assert any(a["rule"] == "spo2_low" for a in alerts)
    assert (await get(session, gw, "/v1/alerts", device=dev, state="open"))["alerts"] == \
           [a for a in alerts if a["cleared_at"] is None]


async def test_bad_parameters_name_the_parameter(gw, session):
    for q, word in (({"device": "rd-a", "patient": "P"}, "device|patient"), ({}, "device|patient"),
                    ({"device": "rd-a", "bucket": "2d"}, "bucket"), ({"device": "rd-a", "from": "5", "to": "4"}, "from"),
                    ({"device": "rd-a", "from": "0", "to": str(3 * 86_400_000)}, "to"),
                    ({"device": "rd-a", "cursor": "abc"}, "cursor"), ({"device": "a b"}, "device"),
                    ({"device": "rd-a", "limit": "20000"}, "limit")):
        body = await get(session, gw, "/v1/readings", status=400, **q)
        assert body["reason"].startswith(word), (q, body)
    await get(session, gw, "/v1/readings", key="admin", status=403, device="rd-a")


# ------------------------------------------------------------------ associations and patients


def run_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALGATE_")}
    env.update({"VITALGATE_DATABASE_URL": dsn, "VITALGATE_PROFILES_DIR": str(PROFILES)})
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


async def test_patient_reads_follow_associations_across_two_devices_and_a_reassociation(gw, session, db):
    a, b = DEVICES[1], DEVICES[2]
    t = T0 + 1_000_000
    for dev in (a, b):
        await post(session, gw, [envelope(dev, t + i * 10_000, 10, seq=i) for i in range(30)])  # 300 s each
    # P-1 wears device a for [t+20 s, t+100 s), then b from t+100 s (open); a goes to P-2 from t+150 s,
    # then back to P-1 from t+250 s (re-association)
    cli(gw.dsn, "associate", a, "--patient", "P-1", "--location", "ICU/bed-1", "--at", str(t + 20_000))
    cli(gw.dsn, "dissociate", a, "--at", str(t + 100_000))
    assoc = await get(session, gw, "/v1/associations", key="read", device=b)
    assert assoc == {"associations": []}
    async with session.post("/v1/associations", json={"device_id": b, "patient_ref": "P-1", "location": "ICU/bed-1",
                                                     "at": t + 100_000},
                            headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as r:
        assert r.status == 201, await r.text()
    cli(gw.dsn, "associate", a, "--patient", "P-2", "--at", str(t + 150_000))
    async with session.post(f"/v1/associations/{a}/end", json={"at": t + 250_000},
                            headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as r:
        assert r.status == 200 and (await r.json())["ended_at"] == t + 250_000
    cli(gw.dsn, "associate", a, "--patient", "P-1", "--location", "ICU/bed-2", "--at", str(t + 250_000))
    frm, to = t + 5_500, t + 280_500
    wins = [(a, t + 20_000, t + 100_000), (b, t + 100_000, to), (a, t + 250_000, to)]
    ref = await db_readings(db, [(d, max(lo, frm), hi) for d, lo, hi in wins])
    got = await get_all(session, gw, "/v1/readings", "readings", patient="P-1", **{"from": frm, "to": to}, limit=50)
    assert sorted(got, key=lambda r: (r["t"], r["device_id"], r["metric"], r["value"], r["flags"])) == ref
    assert {r["device_id"] for r in got} == {a, b} and len(ref) == 2 * (80 + 181 + 31)
    got = await get_all(session, gw, "/v1/readings", "buckets", patient="P-1", **{"from": frm, "to": to}, bucket="1m")
    ref_b = []
    for w in wins:  # buckets per device: a's two windows merge into its own buckets
        ref_b += await db_buckets(db, [(w[0], max(w[1], frm), w[2])], 60)
    merged: dict[tuple, dict] = {}
    for r in ref_b:
        k = (r["device_id"], r["metric"], r["t"])
        if k in merged:
            m = merged[k]
            m["avg"] = (m["avg"] * m["count"] + r["avg"] * r["count"]) / (m["count"] + r["count"])
            m.update(min=min(m["min"], r["min"]), max=max(m["max"], r["max"]), count=m["count"] + r["count"])
        else:
            merged[k] = dict(r)
    _same_buckets(got, sorted(merged.values(), key=lambda r: (r["t"], r["device_id"], r["metric"])))
    p2 = await get_all(session, gw, "/v1/readings", "readings", patient="P-2", **{"from": frm, "to": to})
    assert p2 == await db_readings(db, [(a, t + 150_000, t + 250_000)])
    latest = (await get(session, gw, "/v1/latest", patient="P-1"))["latest"]
    assert {(r["device_id"], r["metric"]) for r in latest} == {(a, "spo2"), (a, "pulse_rate"), (b, "spo2"),
                                                               (b, "pulse_rate")}
    hist = (await get(session, gw, "/v1/associations", patient="P-1"))["associations"]
    assert [(h["device_id"], h["started_at"], h["ended_at"], h["location"]) for h in hist] == [
        (a, t + 20_000, t + 100_000, "ICU/bed-1"), (b, t + 100_000, None, "ICU/bed-1"), (a, t + 250_000, None, "ICU/bed-2")]
    devices = (await get(session, gw, "/v1/devices", location="ICU/"))["devices"]
    assert [(d["device_id"], d["patient_ref"], d["location"]) for d in devices] == [
        (b, "P-1", "ICU/bed-1"), (a, "P-1", "ICU/bed-2")]
    assert devices[0]["latest"]["spo2"]["t"] == t + 299_000 and devices[0]["status"] == "active"
    # who looked at P-1: one audit row per read, with the key, the patient and the window
    key_id = gw.keys["read"].split("_")[1]
    rows = await db.fetch("SELECT actor, action, detail FROM audit_log WHERE target = 'patient:P-1' ORDER BY id")
    assert {r["action"] for r in rows} >= {"read.readings", "read.latest", "read.associations"}
    assert all(r["actor"] == f"https:{key_id}" for r in rows)
    first = orjson.loads(rows[0]["detail"])
    assert (first["from"], first["to"], first["patients"]) == (frm, to, ["P-1"])
    # a read by device names the patients associated with it within the window
    await get(session, gw, "/v1/readings", device=a, **{"from": frm, "to": to})
    row = await db.fetchrow("SELECT detail FROM audit_log WHERE action = 'read.readings' AND target = $1"
                            " ORDER BY id DESC LIMIT 1", a)
    assert sorted(orjson.loads(row["detail"])["patients"]) == ["P-1", "P-2"]
    changes = await db.fetch("SELECT action, actor FROM audit_log WHERE action LIKE 'association.%' AND target = $1",
                             a)
    assert [c["action"] for c in changes] == ["association.start", "association.end", "association.start",
                                              "association.end", "association.start"]
    assert any(c["actor"].startswith("https:") for c in changes) and any(c["actor"].startswith("cli:") for c in changes)


async def test_an_overlapping_association_is_refused(gw, session, db):
    dev = DEVICES[3]
    t = T0
    cli(gw.dsn, "associate", dev, "--patient", "P-9", "--at", str(t))
    r = run_cli(gw.dsn, "associate", dev, "--patient", "P-10", "--at", str(t + 60_000))
    assert r.returncode == 1 and "overlaps association" in r.stderr and "'P-9'" in r.stderr, r.stderr
    async with session.post("/v1/associations", json={"device_id": dev, "patient_ref": "P-10"},
                            headers={"Authorization": f"Bearer {gw.keys['admin']}"}) as resp:
        assert resp.status == 409 and (await resp.json())["reason"].startswith("device_id:")
    async with session.post("/v1/associations", json={"device_id": dev, "patient_ref": "P-10"},
                            headers={"Authorization": f"Bearer {gw.keys['read']}"}) as resp:
        assert resp.status == 403
    # the database itself refuses, whoever writes: a closed window overlapping an open one
    with pytest.raises(asyncpg.ExclusionViolationError):
        await db.execute("INSERT INTO associations (device_id, patient_ref, started_at, ended_at)"
                         " VALUES ($1, 'P-11', to_timestamp($2 / 1000.0), to_timestamp($3 / 1000.0))",
                         dev, t - 10_000, t + 10_000)
    r = run_cli(gw.dsn, "dissociate", dev, "--at", str(t - 1))
    assert r.returncode == 1 and r.stderr.startswith("vitalgate dissociate: at:"), r.stderr
    assert run_cli(gw.dsn, "dissociate", dev, "--at", str(t + 1)).returncode == 0
    r = run_cli(gw.dsn, "dissociate", dev)
    assert r.returncode == 1 and "has no open association" in r.stderr
    assert await db.fetchval("SELECT count(*) FROM associations WHERE device_id = $1", dev) == 1


# ------------------------------------------------------------------ rollups


async def test_rollups_stay_exact_under_redelivery_and_late_data(gw, session, db):
    dev = DEVICES[3]
    t = T0 + 2_000_000
    envs = [envelope(dev, t + i * 10_000, 10, seq=i, spo2=lambda k: 150 if k == 4 else 90 + k) for i in range(12)]
    await post(session, gw, envs[:6])
    await post(session, gw, envs[3:9])  # three redelivered, three new
    await post(session, gw, envs[9:])
    late = [envelope(dev, t + 5_500 + i * 20_000, 3, seq=100 + i, spo2=lambda k: 91.5 + k) for i in range(5)]
    await post(session, gw, late)  # late readings: OUT_OF_ORDER, still counted in their minutes
    await post(session, gw, late[:2])  # and redelivered
    assert await db.fetchval("SELECT count(*) FROM readings WHERE device_id = $1 AND flags & 64 <> 0", dev) > 0
    rollups = await db.fetch(f"SELECT metric, {_ms('bucket')} AS t, min, max, sum, count FROM readings_1m"
                             " WHERE device_id = $1 ORDER BY 1, 2", dev)
    ref = await db.fetch(f"SELECT metric, {_ms(chr(39) + 'epoch' + chr(39) + '::timestamptz')} AS _, "
                         f"{_ms('time_bucket(interval ' + chr(39) + '1 minute' + chr(39) + ', time)')} AS t,"
                         " min(value), max(value), sum(value), count(*) FROM readings WHERE device_id = $1"
                         " AND (flags & 131) = 0 GROUP BY 1, 3 ORDER BY 1, 3", dev)
    assert [tuple(r) for r in rollups] == [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in ref]
    # every reading stored once (redeliveries added nothing), the artifacts left out of the rollups
    assert await db.fetchval("SELECT count(*) FROM readings WHERE device_id = $1", dev) == 2 * (120 + 15)
    artifacts = await db.fetchval("SELECT count(*) FROM readings WHERE device_id = $1 AND flags & 131 <> 0", dev)
    assert artifacts >= 12 and sum(r["count"] for r in rollups) == 2 * (120 + 15) - artifacts
