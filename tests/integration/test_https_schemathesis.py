"""schemathesis against the OpenAPI document a running gateway serves, over TLS.

Every operation of the served ``/openapi.json`` gets schema-valid (positive) and
schema-violating (negative) requests generated from the document, sent with a valid
device token (telemetry) or API key (the key operations). The checks: no 5xx, status
codes, content types, headers and bodies as the document declares them, and no 2xx
for a request the document says is invalid.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness.https import UNLIMITED, HttpsGateway, running_gateway
from tests.harness import PostgresCluster

pytestmark = pytest.mark.integration

EXAMPLES = 50
READ_OPERATIONS = {"GET /v1/devices", "GET /v1/latest", "GET /v1/readings", "GET /v1/waveforms", "GET /v1/alerts",
                   "GET /v1/associations", "POST /v1/associations", "POST /v1/associations/{device_id}/end",
                   "GET /v1/stream"}
FHIR_OPERATIONS = {"GET /fhir/r4/metadata", "GET /fhir/r4/Observation", "GET /fhir/r4/Observation/{id}",
                   "GET /fhir/r4/Device/{id}", "GET /fhir/r4/Provenance/{id}"}
# Operations whose valid requests depend on several parameters together, which OpenAPI cannot
# state: a FHIR search takes exactly one of patient, subject and device. Generated requests
# mostly miss that, so the handler's 400 (an OperationOutcome naming the parameter) is what
# shows they got past authentication.
CROSS_FIELD = {"GET /fhir/r4/Observation"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    settings = {**UNLIMITED, "VITALGATE_HTTP_MAX_ENVELOPES_PER_REQUEST": "20", "VITALGATE_HTTP_MAX_BODY_BYTES": "262144"}
    with running_gateway(pg_cluster, "https_st", ["st-1"], settings=settings) as g:
        yield g


def _credential(gw: HttpsGateway, method: str, path: str) -> dict[str, str]:
    if path in ("/openapi.json", "/fhir/r4/metadata"):
        return {}
    if path == "/v1/telemetry":
        secret = gw.tokens["st-1"]
    elif path == "/v1/devices/{device_id}" or method == "POST":
        secret = gw.keys["admin"]
    else:
        secret = gw.keys["read"]
    return {"Authorization": f"Bearer {secret}"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_served_document_holds_for_generated_requests(gw: HttpsGateway, mode: GenerationMode):
    ca = str(gw.workdir / "certs" / "server-ca.pem")
    http = requests.Session()
    http.verify = ca
    doc = http.get(f"{gw.url}/openapi.json", timeout=10, verify=ca).json()
    schema = schemathesis.openapi.from_dict(doc)
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    seen: dict[str, set[int]] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} == {"POST /v1/telemetry", "GET /v1/status", "GET /v1/devices/{device_id}",
                                              "GET /openapi.json", *READ_OPERATIONS, *FHIR_OPERATIONS}
    for op in operations:
        headers = _credential(gw, op.method.upper(), op.path)
        statuses = seen.setdefault(op.label, set())

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def exercise(case: schemathesis.Case) -> None:
            stream = op.path == "/v1/stream"  # an endless body: headers only, then hang up
            response = case.call(base_url=gw.url, session=http, headers=headers, timeout=30, verify=ca,
                                 stream=stream)
            statuses.add(response.status_code)
            if stream and response.status_code == 200:
                assert response.headers["content-type"][0].startswith("text/event-stream"), response.headers
                return
            case.validate_response(response, checks=checks, headers=headers)

        try:
            exercise()
        except Exception as exc:
            if "Unsatisfiable" in type(exc).__name__ and mode is GenerationMode.NEGATIVE:
                continue  # nothing in this operation can be made invalid (GET /openapi.json, metadata)
            raise
    assert all(s < 500 for ss in seen.values() for s in ss), seen
    if mode is GenerationMode.POSITIVE:  # the generated requests reached the handlers, not just the auth
        assert seen["GET /v1/status"] == {200}
        assert seen["POST /v1/telemetry"] & {400, 403}
        for label in READ_OPERATIONS | FHIR_OPERATIONS:
            reached = {200, 201, 404, 409}
            if label in CROSS_FIELD:  # a 400 there is the handler's answer (the key was accepted)
                reached.add(400)
            assert seen[label] & reached, (label, seen[label])
    assert gw.proc is not None and "Request failed unexpectedly" not in gw.proc.log_text()
