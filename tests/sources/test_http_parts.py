"""HTTPS source building blocks without a server: gzip limits, arrays, certificate names,
rate limits and the OpenAPI document's agreement with the routes."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import msgspec
import orjson
import pytest

from gateway.config import HttpConfig
from gateway.sources.http.api import OPERATIONS, ApiError
from gateway.sources.http.auth import RateLimiter, cert_identity, subject_string
from gateway.sources.http.body import gunzip, split_envelopes
from gateway.sources.http.openapi import build

MIB = 1 << 20


# ------------------------------------------------------------------ gzip


def test_gunzip_round_trip():
    data = orjson.dumps({"v": 1, "device_id": "po-1"}) * 100
    assert gunzip(gzip.compress(data), MIB) == data


def test_gzip_bomb_is_refused_without_inflating_it():
    bomb = gzip.compress(b"\0" * (200 * MIB), compresslevel=9)  # ~200 KiB that expand to 200 MiB
    assert len(bomb) < MIB
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as e:
            gunzip(bomb, MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.status == 413 and "decompresses to more than" in e.value.reason
    assert peak < 4 * MIB  # never more than the limit (plus copies) in memory


def test_gzip_exactly_at_the_limit_passes():
    data = b"x" * MIB
    assert len(gunzip(gzip.compress(data), MIB)) == MIB
    with pytest.raises(ApiError) as e:
        gunzip(gzip.compress(data + b"x"), MIB)
    assert e.value.status == 413


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (b"not gzip at all", "invalid gzip"),
        (gzip.compress(b'{"a": 1}')[:-6], "truncated"),
        (gzip.compress(b"{}") + b"trailing", "after the end"),
    ],
)
def test_bad_gzip_is_a_400_naming_the_problem(blob: bytes, words: str):
    with pytest.raises(ApiError) as e:
        gunzip(blob, MIB)
    assert e.value.status == 400 and words in e.value.reason


def test_raw_deflate_is_not_gzip():
    with pytest.raises(ApiError) as e:
        gunzip(zlib.compress(b"{}"), MIB)
    assert e.value.status == 400


# ------------------------------------------------------------------ arrays


def test_array_elements_keep_their_exact_bytes():
    a = b'{"v":1,"device_id":"po-1","seq":1}'
    b = b'{ "v": 1, "device_id": "po-1", "seq": 2 }'
    payloads, is_array = split_envelopes(b" [" + a + b" ,\n" + b + b"]", "json", 10)
    assert is_array and payloads == [a, b]


def test_msgpack_array_elements_are_the_elements_encodings():
    envs = [{"v": 1, "device_id": "po-1", "seq": i} for i in range(3)]
    payloads, is_array = split_envelopes(msgspec.msgpack.encode(envs), "msgpack", 10)
    assert is_array and payloads == [msgspec.msgpack.encode(e) for e in envs]


def test_single_envelope_is_the_body_itself():
    body = b'{"v":1}'
    assert split_envelopes(body, "json", 1) == ([body], False)
    mp = msgspec.msgpack.encode({"v": 1})
    assert split_envelopes(mp, "msgpack", 1) == ([mp], False)


def test_array_limits_and_syntax():
    with pytest.raises(ApiError) as e:
        split_envelopes(b"[{}, {}, {}]", "json", 2)
    assert e.value.status == 413 and "3 envelopes exceeds the limit of 2" in e.value.reason
    for body, words in ((b"[]", "empty array"), (b"", "empty"), (b"[{}, ", "invalid JSON")):
        with pytest.raises(ApiError) as e:
            split_envelopes(body, "json", 2)
        assert e.value.status == 400 and words in e.value.reason


# ------------------------------------------------------------------ certificates


def _cert(cn: str | None = None, uris: tuple[str, ...] = (), org: str = "Acme") -> dict:
    subject = [(("countryName", "DE"),), (("organizationName", org),)]
    if cn is not None:
        subject.append((("commonName", cn),))
    return {"subject": tuple(subject), "subjectAltName": tuple(("URI", u) for u in uris) + (("DNS", "x.example"),)}


def test_san_uri_names_the_device_before_the_cn():
    assert cert_identity(_cert("po-9", ("urn:vitalgate:device:po-1",))) == ("po-1", "CN=po-9,O=Acme,C=DE")


def test_cn_names_the_device_without_a_device_uri():
    assert cert_identity(_cert("po-2"))[0] == "po-2"


@pytest.mark.parametrize(
    "cert",
    [
        _cert("not a device id"),
        _cert(None),
        _cert("po-1", ("urn:vitalgate:device:po-1", "urn:vitalgate:device:po-2")),  # two devices: ambiguous
        _cert("po-1", ("urn:vitalgate:device:bad id",)),
    ],
)
def test_certificates_that_name_no_device(cert: dict):
    assert cert_identity(cert)[0] is None


def test_subject_is_rfc4514_with_escapes():
    subject = ((("organizationName", "Acme, Inc."),), (("commonName", " po+1"),))
    assert subject_string(subject) == r"CN=\ po\+1,O=Acme\, Inc."


# ------------------------------------------------------------------ rate limit


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [100.0]
    lim = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [lim.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = lim.take("a")
    assert wait == pytest.approx(0.5)
    assert lim.take("b") == 0.0  # per caller
    now[0] += 0.5
    assert lim.take("a") == 0.0
    assert lim.take("a") > 0


def test_token_bucket_memory_is_bounded_by_pruning_idle_callers():
    now = [0.0]
    lim = RateLimiter(10.0, 2, clock=lambda: now[0], max_keys=100)
    for i in range(100):
        lim.take(f"d{i}")
    now[0] += 1.0  # every bucket refilled
    lim.take("new")
    assert len(lim) <= 1


# ------------------------------------------------------------------ OpenAPI


def test_document_lists_every_operation_with_its_statuses_and_security():
    doc = build(HttpConfig(max_envelopes_per_request=7))
    assert doc["openapi"].startswith("3.1")
    assert {(op.path, op.method.lower()) for op in OPERATIONS} == {
        (p, m) for p, ops in doc["paths"].items() for m in ops
    }
    post = doc["paths"]["/v1/telemetry"]["post"]
    assert set(post["responses"]) == {"202", "400", "401", "403", "408", "413", "415", "429", "500", "503"}
    assert post["security"] == [{"deviceToken": []}, {"mutualTLS": []}]
    assert post["responses"]["429"]["headers"].keys() == {"X-Correlation-Id", "Retry-After"}
    assert "WWW-Authenticate" in post["responses"]["401"]["headers"]
    array = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    assert array["maxItems"] == 7
    assert doc["paths"]["/v1/status"]["get"]["security"] == [{"apiKey": ["telemetry:read"]}]
    assert doc["paths"]["/v1/devices/{device_id}"]["get"]["security"] == [{"apiKey": ["admin"]}]
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []
    assert doc["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"


def test_envelope_schema_is_msgspecs():
    doc = build(HttpConfig())
    env = doc["components"]["schemas"]["Envelope"]
    assert env == msgspec.json.schema_components([__import__("gateway.model").model.Envelope],
                                                 ref_template="#/components/schemas/{name}")[1]["Envelope"]
    assert set(env["required"]) == {"v", "device_id"}
    assert env["properties"]["device_id"]["pattern"] == "^[A-Za-z0-9._-]{1,64}$"
    json.dumps(doc)  # plain JSON all the way down
