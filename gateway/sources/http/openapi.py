"""The OpenAPI 3.1 document, generated from the operation table and the msgspec types.

Schemas come from ``msgspec.json.schema_components`` over the very types the handlers
decode and encode (``Envelope``, ``IngestResponse``, ``ErrorBody``, ...); paths, status
codes, security and the headers every answer carries come from ``api.OPERATIONS``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway import __version__
from gateway.config import HttpConfig
from gateway.model import Envelope

from .api import COMMON_RESPONSES, CORRELATION_HEADER, OPERATIONS, ErrorBody, Operation

__all__ = ["document", "build"]

_REF = "#/components/schemas/{name}"

_SECURITY_SCHEMES: dict[str, Any] = {
    "deviceToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "vgd_...",
        "description": "A device token (`vitalgate devices add` shows it once). The device is the token's owner.",
    },
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "vgk_...",
        "description": "An API key; each operation names the scope it needs (`telemetry:read`, `admin`).",
    },
    "mutualTLS": {
        "type": "mutualTLS",
        "description": (
            "A client certificate signed by the CA in `http.tls_client_ca`. The device is the one registered "
            "with a `cert_subject` the certificate carries (its RFC 4514 subject, CN or a SAN URI), else the "
            "certificate's SAN URI `urn:vitalgate:device:<id>`, else its subject CN."
        ),
    },
}

_HEADERS: dict[str, Any] = {
    CORRELATION_HEADER: {
        "description": "The request's correlation id (the client's `X-Request-Id`/`X-Correlation-Id` when sane); "
                       "also in audit entries and logs.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "WWW-Authenticate": {
        "description": "The bearer challenge.",
        "required": True,
        "schema": {"type": "string"},
    },
}


def _headers_for(status: int) -> dict[str, Any]:
    names = [CORRELATION_HEADER]
    if status in (429, 503):
        names.append("Retry-After")
    if status == 401:
        names.append("WWW-Authenticate")
    return {n: {"$ref": f"#/components/headers/{n}"} for n in names}


def _security(op: Operation) -> list[dict[str, list[str]]]:
    if op.auth == "device":
        return [{"deviceToken": []}, {"mutualTLS": []}]
    if op.auth == "api_key":
        return [{"apiKey": [op.scope] if op.scope else []}]
    return []


def _schema_of(tp: type | None) -> dict[str, Any] | None:
    return None if tp is None else {"$ref": _REF.format(name=tp.__name__)}


def build(cfg: HttpConfig) -> dict[str, Any]:
    """The document as a dict (``document()`` serializes it)."""
    body_types: set[Any] = {ErrorBody, Envelope}
    for op in OPERATIONS:
        body_types.update(t for _, t in op.responses.values() if t is not None)
        if isinstance(op.request_body, type) and issubclass(op.request_body, msgspec.Struct):
            body_types.add(op.request_body)  # a plain JSON body: its Struct's own schema
    ordered = sorted(body_types, key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(ordered, ref_template=_REF)
    envelope_ref = {"$ref": _REF.format(name="Envelope")}
    request_schemas: dict[Any, dict[str, Any]] = {
        Envelope | list[Envelope]: {
            "oneOf": [
                envelope_ref,
                {"type": "array", "items": envelope_ref, "minItems": 1, "maxItems": cfg.max_envelopes_per_request},
            ]
        }
    }
    request_schemas.update({t: {"$ref": _REF.format(name=t.__name__)} for t in body_types
                            if isinstance(t, type) and t not in request_schemas})
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "security": _security(op),
            "responses": {},
        }
        if op.description:
            entry["description"] = op.description
        if op.path_params:
            entry["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}
                for name, pattern in op.path_params.items()
            ]
        if op.query_params:
            entry.setdefault("parameters", []).extend(
                {"name": name, "in": "query", "required": False, "schema": schema}
                for name, schema in op.query_params.items()
            )
        if op.request_body is not None:
            schema = request_schemas[op.request_body]
            entry["requestBody"] = {
                "required": True,
                "content": {ct: {"schema": schema} for ct in op.request_content_types},
            }
        responses = dict(op.responses)
        for status, text in COMMON_RESPONSES.items():
            responses.setdefault(status, (text, ErrorBody))
        for status in sorted(responses):
            text, tp = responses[status]
            resp: dict[str, Any] = {"description": text, "headers": _headers_for(status)}
            schema = _schema_of(tp)
            if schema is not None:
                resp["content"] = {op.media_type: {"schema": schema}}
            elif op.produces is not None and status == 200:
                resp["content"] = {op.produces: {"schema": {"type": "string"}}}
            elif op.operation_id == "getOpenApi" and status == 200:
                resp["content"] = {"application/json": {"schema": {"type": "object"}}}
            entry["responses"][str(status)] = resp
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vitalgate HTTPS ingestion",
            "version": __version__,
            "description": (
                "Telemetry from connected medical devices (PROTOCOL version 1). Every answer carries "
                f"`{CORRELATION_HEADER}`; every error body is `ErrorBody` (under /fhir/r4/: a FHIR OperationOutcome)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": _SECURITY_SCHEMES,
            "headers": _HEADERS,
        },
    }


def document(cfg: HttpConfig) -> bytes:
    """The document as JSON bytes, built once per source."""
    return msgspec.json.encode(build(cfg))
