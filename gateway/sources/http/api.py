"""The HTTPS API's wire types, errors and operation table: one source for handlers and OpenAPI.

Every operation is declared once with ``operation()``: method, path, who may call it,
what it answers. The server registers the handlers from ``OPERATIONS`` and
``openapi.document()`` describes the same table, so the document cannot list a route,
a status code or a body the server does not have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from aiohttp import web

__all__ = [
    "ApiError",
    "ErrorBody",
    "IngestResult",
    "IngestResponse",
    "StatusResponse",
    "DeviceRecord",
    "Operation",
    "OPERATIONS",
    "operation",
    "ERROR_WORDS",
    "json_response",
    "CORRELATION_HEADER",
    "ERROR_RENDERERS",
]

CORRELATION_HEADER = "X-Correlation-Id"

# status -> the ``error`` code word of the JSON error body
ERROR_WORDS: dict[int, str] = {
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
}


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every 4xx/5xx answer. ``reason`` names the field at fault where there is one."""

    error: str
    reason: str
    correlation_id: str
    errors: list[str] = []  # arrays: every invalid envelope (up to 100), ``[i].field: message``


class IngestResult(msgspec.Struct, kw_only=True):
    """What became of one envelope of the request, in request order."""

    index: int
    status: Literal["stored", "duplicate", "rejected"]
    ingest_id: int | None  # ``ingests.id``; a duplicate carries the id of the copy stored before
    duplicate: bool
    reason: str | None = None  # ``rejected`` only: refused by the database when stored (``storage: ...``)


class IngestResponse(msgspec.Struct, kw_only=True):
    """202: every envelope of the request is committed (or was already)."""

    results: list[IngestResult]
    correlation_id: str


class StatusResponse(msgspec.Struct, kw_only=True):
    """The writer's state (``GET /v1/status``)."""

    gateway_id: str
    uptime_s: float
    in_flight: int  # payloads taken and not yet committed
    pending_bytes: int  # their payload bytes
    backed_up: bool  # intake answers 503 while true
    accepting: bool  # false once shutdown began


class DeviceRecord(msgspec.Struct, kw_only=True):
    """A device's registry record, without secrets (``GET /v1/devices/{device_id}``)."""

    device_id: str
    profile: str | None
    status: Literal["active", "revoked"]
    token_id: str | None  # identifies the current token; the token itself is never stored
    cert_subject: str | None  # client certificate subject bound to the device, if any


_ENCODER = msgspec.json.Encoder()


def json_response(status: int, body: msgspec.Struct, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode(body), content_type="application/json", headers=headers)


class ApiError(Exception):
    """An answer other than success; the middleware renders it as ``ErrorBody``
    (``reason`` names the field at fault; ``errors`` lists every invalid envelope of an array)."""

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.errors = errors or []


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["none", "device", "api_key"]


@dataclass(frozen=True)
class Operation:
    """One HTTP operation: the handler and everything the OpenAPI document says about it."""

    method: str
    path: str
    operation_id: str
    summary: str
    description: str
    auth: Auth  # device: device token or client certificate; api_key: ``vgk_`` key with ``scope``
    scope: str | None
    handler: Handler
    responses: dict[int, tuple[str, type | None]]  # status -> (description, body type; None = no JSON body)
    request_body: Any = None  # type of the request body (JSON/MessagePack), if any
    request_content_types: tuple[str, ...] = ()
    path_params: dict[str, str] = field(default_factory=dict)  # name -> regex pattern
    query_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> JSON schema (all optional)
    produces: str | None = None  # content type of a non-JSON 200 body (a stream)
    media_type: str = "application/json"  # content type of its JSON bodies (FHIR: application/fhir+json)


OPERATIONS: list[Operation] = []

# path prefix -> renders the error answers under it in that API's own format (status, reason,
# correlation id, headers); the others get ``ErrorBody``
ERROR_RENDERERS: dict[str, Callable[[int, str, str, dict[str, str]], web.Response]] = {}

# Answers every operation can give besides its own.
COMMON_RESPONSES: dict[int, str] = {
    500: "Unexpected server error (logged with the correlation id).",
}


def operation(
    method: str,
    path: str,
    *,
    operation_id: str,
    summary: str,
    description: str = "",
    auth: Auth,
    scope: str | None = None,
    responses: dict[int, tuple[str, type | None]],
    request_body: Any = None,
    request_content_types: tuple[str, ...] = (),
    path_params: dict[str, str] | None = None,
    query_params: dict[str, dict[str, Any]] | None = None,
    produces: str | None = None,
    media_type: str = "application/json",
) -> Callable[[Handler], Handler]:
    """Declare a handler as an operation of the API (see the module docstring)."""

    def register(handler: Handler) -> Handler:
        OPERATIONS.append(
            Operation(
                method=method,
                path=path,
                operation_id=operation_id,
                summary=summary,
                description=description,
                auth=auth,
                scope=scope,
                handler=handler,
                responses=responses,
                request_body=request_body,
                request_content_types=request_content_types,
                path_params=path_params or {},
                query_params=query_params or {},
                produces=produces,
                media_type=media_type,
            )
        )
        return handler

    return register
