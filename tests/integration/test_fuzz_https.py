"""Hostile bodies through the real HTTPS endpoint, over TLS, into a real database.

The fuzz strategies (tests/fuzz/strategies.py) drive ``POST /v1/telemetry`` of a running
gateway (TLS, registration required, a throwaway database; tests/harness/https.py),
each body sent as it is or inside an array beside a valid envelope, with a device's token,
over one keep-alive connection. Every answer must be:
- 202, each result ``stored`` or ``duplicate`` with an ingest id whose rows are in the
  database, of the authenticated device, as many rows as the ingest says (``n_readings``); or
- 4xx with a JSON ``reason`` naming a field (``[1].numerics[0].t: ...``, ``body: ...``,
  ``content-type: ...``), and then nothing of that request stored: the valid envelope beside
  a hostile one is refused with it.
Never a 5xx, never a dropped connection (``requests`` raises on one and the test fails).
The database is checked once at the end, for every answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import tests.fuzz.conftest as fuzz_report
from tests.fuzz.conftest import EXAMPLES, FUZZ, OUTCOMES
from tests.fuzz.strategies import CORPUS, FIELD_ROOTS, PROFILE, T0, hostile_payload, mutated_payload
from tests.harness import PostgresCluster
from tests.harness.https import HttpsGateway, cli

pytestmark = pytest.mark.integration

EXAMPLES_HTTPS = 400
DEVICES = [f"po-{i}" for i in range(5)] + ["po.3_x"]  # the strategies' device ids; po.3_x is revoked
_ROOT = re.compile(r"^(?:\[\d+\]\.)?([a-z_ -]+)(?:\[\d+\]|\.|:)")
HTTP_ROOTS = FIELD_ROOTS | {"body", "content-encoding"}
_NAMED = re.compile(rb"po-[0-4]")


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[HttpsGateway]:
    # the fuzz count is printed at the end even when only this module runs
    if not request.config.pluginmanager.is_registered(fuzz_report):
        request.config.pluginmanager.register(fuzz_report)
    name = f"https_fuzz_{time.monotonic_ns() % 10**8}"
    dsn = pg_cluster.create_database(name)
    g = HttpsGateway(
        Path(tempfile.mkdtemp(prefix="vitalgate-https-fuzz-")), dsn, DEVICES,
        settings={"VITALGATE_HTTP_RATE_LIMIT_PER_S": "100000", "VITALGATE_HTTP_RATE_LIMIT_BURST": "100000",
                  "VITALGATE_HTTP_MAX_ENVELOPES_PER_REQUEST": "20", "VITALGATE_HTTP_MAX_BODY_BYTES": "262144",
                  "VITALGATE_BATCH_MAX_AGE_S": "0.01", "VITALGATE_HTTP_COMMIT_TIMEOUT_S": "30"},
    )
    try:
        g.start()
        cli(dsn, "devices", "revoke", "po.3_x")
        yield g
        assert g.stop() == 0, g.proc.log_tail() if g.proc else ""
    finally:
        g.stop()
        pg_cluster.drop_database(name)


@pytest.fixture(scope="module")
def http(gw: HttpsGateway) -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace the test's CA
    s.verify = str(gw.workdir / "certs" / "server-ca.pem")
    yield s
    s.close()


_companion_seq = iter(range(10**9))


def _companion(device: str, encoding: str) -> bytes:
    """A valid envelope of ``device``, unique in this run (its seq and time)."""
    n = next(_companion_seq)
    env = {"v": 1, "device_id": device, "seq": n, "profile": PROFILE,
           "numerics": [{"t": T0 + n * 1000, "values": {"spo2": 97, "pulse_rate": 70}}]}
    return msgspec.json.encode(env) if encoding == "json" else msgspec.msgpack.encode(env)


def _body(payload: bytes, content_type: str | None, wrap: str, device: str) -> tuple[bytes, bytes | None]:
    """The request body, and the valid envelope sent beside the hostile one (if any)."""
    if wrap == "alone":
        return payload, None
    is_msgpack = content_type is not None and "msgpack" in content_type
    valid = _companion(device, "msgpack" if is_msgpack else "json")
    parts = [payload, valid] if wrap == "first" else [valid, payload]
    if is_msgpack:
        return b"\x92" + b"".join(parts), valid  # a MessagePack array of two
    return b"[" + b",".join(parts) + b"]", valid


def test_every_hostile_body_is_stored_or_refused_naming_a_field(gw: HttpsGateway, http: requests.Session):
    answers: list[tuple[str, int, dict, bytes | None]] = []  # (device, status, answer, companion) per request

    @settings(FUZZ, max_examples=EXAMPLES_HTTPS)
    @given(st.one_of(mutated_payload(), hostile_payload(), st.sampled_from(CORPUS)), st.sampled_from(DEVICES[:5]),
           st.integers(0, 3), st.sampled_from(["alone", "alone", "first", "last"]), st.integers(0, 7))
    def post(case: tuple[bytes, str | None], other: str, own: int, wrap: str, typed: int) -> None:
        payload, content_type = case
        # mostly the token of the device the envelope names, so that more than identity is tested
        named = _NAMED.search(payload)
        device = named.group().decode() if own and named else other
        if content_type is None and typed:  # the strategies leave it out for MQTT 3.1.1; HTTP needs one
            content_type = "application/msgpack" if payload[:1] and 0x80 <= payload[0] <= 0x9f else "application/json"
        body, companion = _body(payload, content_type, wrap, device)
        headers = {"Authorization": f"Bearer {gw.tokens[device]}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        r = http.post(f"{gw.url}/v1/telemetry", data=body, headers=headers, timeout=60)
        EXAMPLES["https"] += 1
        assert r.status_code < 500, (r.status_code, r.text)
        assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
        ans = r.json()
        if r.status_code == 202:
            results = ans["results"]
            assert results and all(x["status"] in ("stored", "duplicate") and x["ingest_id"] for x in results), ans
            OUTCOMES["https-202"] += 1
        else:
            assert 400 <= r.status_code < 500, r.status_code
            reason = ans["reason"]
            m = _ROOT.match(reason)
            assert m and m.group(1) in HTTP_ROOTS, f"reason names no field: {reason!r}"
            assert reason.split(": ", 1)[1].strip(), reason
            OUTCOMES[f"https-{r.status_code}"] += 1
        answers.append((device, r.status_code, ans, companion))

    post()
    asyncio.run(_check_database(gw.dsn, answers))


async def _check_database(dsn: str, answers: list[tuple[str, int, dict, bytes | None]]) -> None:
    """Every 202's ingests hold their rows, of the authenticated device; no refused request left a row."""
    conn = await asyncpg.connect(dsn)
    try:
        stored = {r["id"]: r for r in await conn.fetch(
            "SELECT i.id, i.device_id, i.n_readings, i.payload_sha256,"
            " (SELECT count(*) FROM readings r WHERE r.ingest_id = i.id) AS readings,"
            " (SELECT count(*) FROM waveform_blocks w WHERE w.ingest_id = i.id) AS blocks FROM ingests i")}
        shas = {bytes(r["payload_sha256"]) for r in stored.values()}
        accepted = 0
        for device, status, ans, companion in answers:
            if status == 202:
                for x in ans["results"]:
                    row = stored.get(x["ingest_id"])
                    assert row is not None, f"answered 202 for ingest {x['ingest_id']}, not in the database"
                    assert row["device_id"] == device
                    assert row["readings"] + row["blocks"] == row["n_readings"] > 0, dict(row)
                    accepted += 1
                if companion is not None:
                    assert hashlib.sha256(companion).digest() in shas
            elif companion is not None:
                assert hashlib.sha256(companion).digest() not in shas, f"refused ({status}) but stored: {ans}"
        assert accepted > 0, "no hostile example was stored: the run exercised refusals only"
    finally:
        await conn.close()
