"""Operations for API keys: the writer's state and registry records (scope-checked)."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.model import DEVICE_ID_PATTERN

from .api import ApiError, DeviceRecord, ErrorBody, StatusResponse, json_response, operation
from .auth import _call
from .context import CONTEXT

__all__ = ["get_status", "get_device"]



@operation(
    "GET",
    "/v1/status",
    operation_id="getStatus",
    summary="The writer's state: in-flight payloads, pending bytes, backpressure, uptime",
    auth="api_key",
    scope="telemetry:read",
    responses={
        200: ("The writer's state.", StatusResponse),
        401: ("No credentials, or unknown/revoked ones.", ErrorBody),
        403: ("The caller is a device credential, or an API key without scope `telemetry:read` (audited).",
              ErrorBody),
        429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
    },
)
async def get_status(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    intake = ctx.intake
    return json_response(200, StatusResponse(
        gateway_id=ctx.gateway_id,
        uptime_s=round(time.monotonic() - ctx.started, 3),
        in_flight=intake.in_flight,
        pending_bytes=intake.pending_bytes,
        backed_up=intake.backed_up,
        accepting=ctx.accepting,
    ))


@operation(
    "GET",
    "/v1/devices/{device_id}",
    operation_id="getDevice",
    summary="A device's registry record, without secrets",
    auth="api_key",
    scope="admin",
    responses={
        200: ("The registry record.", DeviceRecord),
        401: ("No credentials, or unknown/revoked ones.", ErrorBody),
        403: ("The caller is a device credential, or an API key without scope `admin` (audited).", ErrorBody),
        404: ("No device with this id.", ErrorBody),
        429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
    },
    path_params={"device_id": DEVICE_ID_PATTERN},
)
async def get_device(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    device_id = request.match_info["device_id"]
    dev = await _call(ctx.registry.device(device_id))
    if dev is None:
        raise ApiError(404, f"device_id: no device {device_id!r} in the registry")
    return json_response(200, DeviceRecord(
        device_id=dev.device_id,
        profile=dev.profile,
        status=dev.status,  # type: ignore[arg-type]
        token_id=dev.token_id,
        cert_subject=dev.cert_subject,
    ))
