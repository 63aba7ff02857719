"""Rows a legal hold kept stay readable through the query API and FHIR after retention.

One gateway (HTTPS, MQTT off) on a database of this module. Readings and a waveform block of
two devices are written 30 days in the past (one 1-hour chunk) with their rollups, one
device is put under a hold, and ``vitalgate retention run`` (horizon 7 days) drops the
chunk. The held device's rows must then answer ``/v1/readings`` (raw, in whole-minute
buckets with partial edge minutes, in 30-second buckets), ``/v1/waveforms`` and a FHIR
Observation search exactly as they were stored; the other device's raw rows are gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio

from tests.harness import REPO, PostgresCluster
from tests.harness.https import HttpsGateway, cli, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

HELD, FREE = "hd-held", "hd-free"
DAY_MS = 86_400_000
# 30 days ago, 10 minutes past an hour: every row in one 1-hour chunk of each hypertable
T0 = (int(time.time() * 1000) - 30 * DAY_MS) // 3_600_000 * 3_600_000 + 600_000
VALUES = [91.0, 92.5, 93.0, 94.5, 95.0, 96.5, 97.0, 98.5]  # one spo2 reading every 20 s
SAMPLES = [0.5, -0.25, 1.0]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    with running_gateway(pg_cluster, "held", [HELD, FREE]) as g:
        yield g


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def session(gw: HttpsGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=gw.ssl_context())) as s:
        yield s


async def _get(s: aiohttp.ClientSession, gw: HttpsGateway, path: str, **q) -> dict:
    async with s.get(path, params={k: str(v) for k, v in q.items()},
                     headers={"Authorization": f"Bearer {gw.keys['read']}"}) as r:
        body = orjson.loads(await r.read())
        assert r.status == 200, body
        return body


async def _seed(dsn: str) -> None:
    """Each device: one ingest, 8 spo2 readings from T0 every 20 s, a pleth block at T0, and
    the rollups the sink would have written with them."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for device in (HELD, FREE):
                ingest = await conn.fetchval(
                    "INSERT INTO ingests (received_at, device_id, source, gateway_id, topic_or_path, payload_sha256,"
                    " payload_bytes, encoding, profile, profile_version, n_readings, n_flagged)"
                    " VALUES (to_timestamp($1 / 1000.0), $2, 'https', 'gw', '/v1/telemetry', sha256(convert_to($2, 'UTF8')),"
                    " 10, 'json', 'pulse_oximeter', '1', $3, 0) RETURNING id", T0, device, len(VALUES))
                await conn.executemany(
                    "INSERT INTO readings VALUES (to_timestamp($1 / 1000.0), $2, 'spo2', $3, 0, $4)",
                    [(T0 + 20_000 * i, device, v, ingest) for i, v in enumerate(VALUES)])
                await conn.execute("INSERT INTO waveform_blocks VALUES (to_timestamp($1 / 1000.0), $2, 'pleth', 125,"
                                   " $3::real[], 0, $4)", T0, device, SAMPLES, ingest)
            await conn.execute(
                "INSERT INTO readings_1m SELECT device_id, metric, time_bucket(interval '1 minute', time),"
                " min(value), max(value), sum(value), count(*) FROM readings GROUP BY 1, 2, 3")
    finally:
        await conn.close()


def _retention_run(dsn: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALGATE_")}
    env["VITALGATE_DATABASE_URL"] = dsn
    for table in ("READINGS", "WAVEFORM_BLOCKS", "INGESTS", "REJECTED"):
        env[f"VITALGATE_RETENTION_{table}_DAYS"] = "7"
    r = subprocess.run([sys.executable, "-m", "gateway", "retention", "run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


async def test_held_rows_stay_readable_after_their_chunk_is_dropped(gw, session):
    await _seed(gw.dsn)
    cli(gw.dsn, "hold", "add", "--device", HELD, "--from", _iso(T0 - 3_600_000), "--to", _iso(T0 + 3_600_000),
        "--reason", "litigation")
    _retention_run(gw.dsn)
    conn = await asyncpg.connect(gw.dsn)
    try:
        window = "time >= to_timestamp($1 / 1000.0) AND time < to_timestamp($2 / 1000.0)"
        assert await conn.fetchval(f"SELECT count(*) FROM readings WHERE {window}", T0 - 600_000, T0 + 3_000_000) == 0
        assert await conn.fetchval("SELECT count(*) FROM readings_held WHERE device_id = $1", HELD) == len(VALUES)
        assert await conn.fetchval("SELECT count(*) FROM waveform_blocks_held WHERE device_id = $1", HELD) == 1
        assert await conn.fetchval("SELECT count(*) FROM readings_held WHERE device_id = $1", FREE) == 0
    finally:
        await conn.close()

    frm, to = T0 - 600_000, T0 + 3_000_000
    raw = (await _get(session, gw, "/v1/readings", device=HELD, **{"from": frm, "to": to}))["readings"]
    assert [(r["t"], r["metric"], r["value"], r["flags"]) for r in raw] == \
           [(T0 + 20_000 * i, "spo2", v, 0) for i, v in enumerate(VALUES)]
    assert (await _get(session, gw, "/v1/readings", device=FREE, **{"from": frm, "to": to}))["readings"] == []

    # whole minutes from the rollups (not under retention); a window starting 30 s into the
    # first minute reads that partial minute from the held rows
    def minutes(lo: int) -> list[tuple]:
        out = []
        for m in range(T0 // 60_000 * 60_000, T0 + 160_000, 60_000):
            vs = [v for i, v in enumerate(VALUES) if max(lo, m) <= T0 + 20_000 * i < m + 60_000]
            if vs:
                out.append((m, min(vs), max(vs), sum(vs) / len(vs), len(vs)))
        return out

    for lo in (frm, T0 + 30_000):
        got = (await _get(session, gw, "/v1/readings", device=HELD, bucket="1m", **{"from": lo, "to": to}))["buckets"]
        assert [(b["t"], b["min"], b["max"], b["avg"], b["count"]) for b in got] == minutes(lo)
    halves = (await _get(session, gw, "/v1/readings", device=HELD, bucket="30s", **{"from": frm, "to": to}))["buckets"]
    assert sum(b["count"] for b in halves) == len(VALUES) and halves[0]["t"] == T0

    blocks = (await _get(session, gw, "/v1/waveforms", device=HELD, **{"from": frm, "to": to}))["blocks"]
    assert [(b["t0"], b["samples"]) for b in blocks] == [(T0, SAMPLES)]
    assert (await _get(session, gw, "/v1/waveforms", device=FREE, **{"from": frm, "to": to}))["blocks"] == []

    async with session.get("/fhir/r4/Observation", params=[("device", HELD), ("date", f"ge{_iso(frm)}"),
                                                           ("date", f"lt{_iso(to)}"), ("_count", "50")],
                           headers={"Authorization": f"Bearer {gw.keys['read']}"}) as r:
        bundle = orjson.loads(await r.read())
        assert r.status == 200, bundle
    obs = [e["resource"] for e in bundle.get("entry", [])]
    numeric = sorted((o["effectiveDateTime"], o["valueQuantity"]["value"]) for o in obs if "valueQuantity" in o)
    assert [(datetime.fromisoformat(t).timestamp() * 1000, v) for t, v in numeric] == \
           [(T0 + 20_000 * i, v) for i, v in enumerate(VALUES)]
    assert [[float(x) for x in o["valueSampledData"]["data"].split()] for o in obs if "valueSampledData" in o] == \
           [SAMPLES]
