"""Association operations: list (``telemetry:read``, audited), open and end (``admin``, audited changes)."""

from __future__ import annotations

import re
import time

import msgspec
from aiohttp import web

from gateway.model import DEVICE_ID_PATTERN
from gateway.query import associations as store
from gateway.sources.http.api import ApiError, ErrorBody, json_response, operation
from gateway.sources.http.context import CORRELATION, PRINCIPAL

from . import audit_read, db, read_side
from .params import Query, params
from .types import Association, AssociationsResponse, EndAssociation, NewAssociation

__all__ = ["list_associations", "start_association", "end_association"]

_MAX_BODY = 4096
_PATH = re.compile(r"`\$\.?([^`]*)`")


def _wire(a: store.Association) -> Association:
    return Association(id=a.id, device_id=a.device_id, patient_ref=a.patient_ref, location=a.location,
                       started_at=a.started_at, ended_at=a.ended_at)


async def _body(request: web.Request, tp: type[msgspec.Struct]) -> msgspec.Struct:
    if request.content_type != "application/json":
        raise ApiError(415, "Content-Type: expected application/json")
    data = await request.content.read(_MAX_BODY + 1)
    if len(data) > _MAX_BODY:
        raise ApiError(413, f"body: larger than {_MAX_BODY} bytes")
    try:
        return msgspec.json.decode(data or b"{}", type=tp)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH.search(text)
        where = m.group(1) if m and m.group(1) else "body"
        raise ApiError(400, f"{where}: {_PATH.sub('', text).rstrip(' -')}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"body: invalid JSON ({exc})") from None


_ADMIN_ERRORS: dict[int, tuple[str, type | None]] = {
    400: ("The body is invalid; `reason` names the field.", ErrorBody),
    401: ("No credentials, or unknown/revoked ones.", ErrorBody),
    403: ("A device credential, or an API key without scope `admin` (audited).", ErrorBody),
    413: ("The body is larger than 4 KiB.", ErrorBody),
    415: ("Content-Type is not application/json.", ErrorBody),
    429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
    503: ("The database is unavailable.", ErrorBody),
}


@operation("GET", "/v1/associations", operation_id="listAssociations",
           summary="The associations (device, patient, location, window) of a device or of a patient",
           auth="api_key", scope="telemetry:read", query_params=params("device", "patient"),
           responses={200: ("Oldest first.", AssociationsResponse),
                      400: ("A query parameter is invalid; `reason` names it.", ErrorBody),
                      401: ("No credentials, or unknown/revoked ones.", ErrorBody),
                      403: ("A device credential, or an API key without scope `telemetry:read` (audited).",
                            ErrorBody),
                      429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
                      503: ("The database is unavailable.", ErrorBody)})
async def list_associations(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    kind, value = Query(request).subject()
    await audit_read(request, "read.associations", (kind, value), 0, 2**53, [value] if kind == "device" else [])

    async def fetch() -> list[store.Association]:
        async with read.store.pool.acquire() as conn:
            if kind == "device":
                return await store.list_associations(conn, device_id=value)
            return await store.list_associations(conn, patient_ref=value)

    rows = await db(fetch())
    return json_response(200, AssociationsResponse(associations=[_wire(a) for a in rows]))


@operation("POST", "/v1/associations", operation_id="startAssociation",
           summary="Associate a device with a patient (and a location) from `at` (default now)",
           description="Refused with 409 when it overlaps another association of the device (one at a time: "
                       "end the open one first). Audited as `association.start`.",
           auth="api_key", scope="admin", request_body=NewAssociation, request_content_types=("application/json",),
           responses={201: ("The association.", Association),
                      409: ("It overlaps another association of the device.", ErrorBody), **_ADMIN_ERRORS})
async def start_association(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    body: NewAssociation = await _body(request, NewAssociation)  # type: ignore[assignment]
    at = body.at if body.at is not None else int(time.time() * 1000)

    async def change() -> store.Association:
        async with read.store.pool.acquire() as conn:
            return await store.associate(conn, body.device_id, body.patient_ref, body.location, at,
                                         actor=request[PRINCIPAL].actor, source_addr=request.remote,
                                         correlation_id=request[CORRELATION])

    try:
        a = await db(change())
    except store.AssociationRefused as exc:
        raise ApiError(exc.status, exc.reason) from None
    return json_response(201, _wire(a))


@operation("POST", "/v1/associations/{device_id}/end", operation_id="endAssociation",
           summary="End the device's open association at `at` (default now)",
           description="404 when the device has no open association; 409 when `at` is not after its start. "
                       "Audited as `association.end`.",
           auth="api_key", scope="admin", request_body=EndAssociation, request_content_types=("application/json",),
           path_params={"device_id": DEVICE_ID_PATTERN},
           responses={200: ("The ended association.", Association),
                      404: ("The device has no open association.", ErrorBody),
                      409: ("`at` is not after the association's start.", ErrorBody), **_ADMIN_ERRORS})
async def end_association(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    device_id = request.match_info["device_id"]
    if not re.match(DEVICE_ID_PATTERN, device_id):
        raise ApiError(400, f"device_id: must match {DEVICE_ID_PATTERN}")
    body: EndAssociation = await _body(request, EndAssociation)  # type: ignore[assignment]
    at = body.at if body.at is not None else int(time.time() * 1000)

    async def change() -> store.Association:
        async with read.store.pool.acquire() as conn:
            return await store.dissociate(conn, device_id, at, actor=request[PRINCIPAL].actor,
                                          source_addr=request.remote, correlation_id=request[CORRELATION])

    try:
        a = await db(change())
    except store.AssociationRefused as exc:
        raise ApiError(exc.status, exc.reason) from None
    return json_response(200, _wire(a))
