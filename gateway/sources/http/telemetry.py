"""``POST /v1/telemetry``: answered only once every envelope of the request is committed.

Order of checks (first failure answers): credentials (401/403) and the caller's rate
limit (429), Content-Type/Content-Encoding (415), intake state (503), body size (413) and
time to arrive (408),
body syntax and envelope count (400/413), every envelope validated like an MQTT payload
(400, all of them reported with their index), every envelope's ``device_id`` against the
authenticated device (403, audited, the payload kept in ``rejected``). Only a request
with no fault is taken, whole: nothing of a refused request is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

from aiohttp import web

from gateway.errors import IdentityError, RejectError
from gateway.model import Envelope, Outcome, RawMessage

from .api import ErrorBody, IngestResponse, IngestResult, json_response, operation, ApiError
from .auth import retry_after
from .body import gunzip, media_type, read_body, split_envelopes
from .context import CONTEXT, CORRELATION, PRINCIPAL

__all__ = ["post_telemetry", "PATH"]

PATH = "/v1/telemetry"
_MAX_LISTED = 100


def _resolver(fut: asyncio.Future[Outcome]) -> Callable[[Outcome], None]:
    def resolve(outcome: Outcome) -> None:
        if not fut.done():
            fut.set_result(outcome)

    return resolve


def _at(i: int | None, reason: str) -> str:
    return reason if i is None else f"[{i}].{reason}"


@operation(
    "POST",
    PATH,
    operation_id="postTelemetry",
    summary="Post one telemetry envelope or an array of them",
    description=(
        "The body is one envelope (PROTOCOL section 1) or an array of envelopes, JSON "
        "(`application/json`) or MessagePack (`application/msgpack`), optionally gzip-compressed "
        "(`Content-Encoding: gzip`). Every envelope's `device_id` must be the authenticated device. "
        "The answer (202) comes after the envelopes are committed; posting the same body again "
        "answers with the same ingest ids (`duplicate: true`) and stores nothing twice. A request "
        "with any invalid envelope is refused whole (400), nothing stored. Send `X-Request-Id` or "
        "`X-Correlation-Id` (1-128 of `A-Za-z0-9._:-`) to choose the correlation id."
    ),
    auth="device",
    responses={
        202: ("Committed: one result per envelope, in request order.", IngestResponse),
        400: ("An envelope or the body is invalid; `reason` names the field (`[i].` prefix for arrays).",
              ErrorBody),
        401: ("No credentials, or unknown/revoked ones.", ErrorBody),
        403: ("An envelope claims another device, the certificate's device is unregistered or revoked, "
              "or the credential is an API key (audited).", ErrorBody),
        408: ("The body did not arrive within `http.body_timeout_s`.", ErrorBody),
        413: ("Body (or decompressed body) larger than `http.max_body_bytes`, or more envelopes than "
              "`http.max_envelopes_per_request`.", ErrorBody),
        415: ("Content-Type or Content-Encoding not supported.", ErrorBody),
        429: ("The device's rate limit is exhausted; see Retry-After.", ErrorBody),
        503: ("The database writer is backed up, the commit took longer than `http.commit_timeout_s` "
              "(the envelopes may still be stored: retrying the same body is safe), or shutdown; see Retry-After.",
              ErrorBody),
    },
    request_body=Envelope | list[Envelope],
    request_content_types=("application/json", "application/msgpack"),
)
async def post_telemetry(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    cfg = ctx.cfg
    principal = request[PRINCIPAL]
    me = principal.device_id
    kind, content_type = media_type(request)
    ctx.check_intake()
    body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
    if request.headers.get("Content-Encoding", "").strip().lower() in ("gzip", "x-gzip"):
        body = gunzip(body, cfg.max_body_bytes)
    payloads, is_array = split_envelopes(body, kind, cfg.max_envelopes_per_request)
    now_ms = int(time.time() * 1000)
    raws = [
        RawMessage(
            payload=p,
            source="https",
            principal=principal.name,
            topic_or_path=PATH,
            received_at_ms=now_ms,
            content_type=content_type,
            remote_addr=request.remote,
        )
        for p in payloads
    ]
    decoded = []
    invalid: list[str] = []
    refused: list[tuple[int | None, RawMessage, RejectError, str | None, str]] = []  # (i, raw, exc, claimed, action)
    for i, raw in enumerate(raws):
        idx = i if is_array else None
        try:
            d = ctx.intake.validate(raw)
        except IdentityError as exc:  # the claimed device is unregistered or revoked
            refused.append((idx, raw, RejectError(exc.reason, exc.device_id), exc.device_id, exc.action))
            continue
        except RejectError as exc:
            if exc.device_id is not None and exc.device_id != me:
                reason = f"device_id: {exc.device_id!r} is not the authenticated device {me!r}"
                refused.append((idx, raw, RejectError(reason, exc.device_id), exc.device_id, "identity.mismatch"))
            else:
                invalid.append(_at(idx, exc.reason))
            continue
        if d.device_id != me:
            reason = f"device_id: {d.device_id!r} is not the authenticated device {me!r}"
            refused.append((idx, raw, RejectError(reason, d.device_id), d.device_id, "identity.mismatch"))
            continue
        decoded.append(d)
    if refused:
        for idx, raw, exc, claimed, action in refused:
            ctx.audit(request, principal.actor, action, claimed,
                      {"authenticated_device": me, "index": idx, "reason": exc.reason,
                       "payload_sha256": hashlib.sha256(raw.payload).hexdigest()})
            try:
                # the evidence: the payload kept in ``rejected`` (a plain RejectError: audited above, once)
                ctx.intake.quarantine(raw, exc)
            except RuntimeError:
                pass  # shutting down: the audit entry and the log line remain
        reasons = [_at(idx, exc.reason) for idx, _, exc, _, _ in refused]
        raise ApiError(403, reasons[0], errors=(reasons + invalid)[:_MAX_LISTED] if len(reasons) + len(invalid) > 1
                       else None)
    if invalid:
        raise ApiError(400, invalid[0], errors=invalid[:_MAX_LISTED] if len(invalid) > 1 else None)

    ctx.check_intake()  # reading the body awaited: shutdown may have begun meanwhile
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Outcome]] = []
    for raw in raws:
        fut: asyncio.Future[Outcome] = loop.create_future()
        raw.on_outcome = _resolver(fut)
        futures.append(fut)
    try:
        for raw, d in zip(raws, decoded):
            ctx.intake.accept(raw, d)
    except RuntimeError:
        raise ApiError(503, "gateway: shutting down; retry later (the same body is stored once)",
                       headers={"Retry-After": str(cfg.retry_after_s), "Connection": "close"}) from None
    ctx.waiting.update(futures)  # type: ignore[arg-type]
    try:
        await asyncio.wait(futures, timeout=cfg.commit_timeout_s)
    finally:
        ctx.waiting.difference_update(futures)  # type: ignore[arg-type]
    if not all(f.done() and not f.cancelled() for f in futures):
        raise ApiError(
            503,
            f"gateway: commit not confirmed within {cfg.commit_timeout_s:g} s; the envelopes may still be stored, "
            "retrying the same body is safe",
            headers={"Retry-After": retry_after(cfg.retry_after_s)},
        )
    results = []
    for i, fut in enumerate(futures):
        o = fut.result()
        results.append(IngestResult(index=i, status=o.status, ingest_id=o.ingest_id,
                                    duplicate=o.status == "duplicate", reason=o.reason))
    return json_response(202, IngestResponse(results=results, correlation_id=request[CORRELATION]))
