"""Read operations (scope ``telemetry:read``): devices, latest values, readings, waveforms, alerts.

Every read of patient data writes one ``audit_log`` row (``read.<route>``: the key, the
device or ``patient:<ref>``, the window, and the patients associated with the devices
read) before the answer is sent. A patient read covers each device associated with the
patient within its own association window.
"""

from __future__ import annotations

import time
from itertools import starmap
from typing import Any

from aiohttp import web

from gateway.query.associations import windows
from gateway.query.cursor import Page, encode_cursor
from gateway.query.store import LATEST_LOOKBACK_MS, MINUTE_MS, Windows
from gateway.sources.http.api import ApiError, ErrorBody, json_response, operation
from gateway.sources.http.auth import _call
from gateway.sources.http.context import CONTEXT

from . import ReadSide, audit_read, db, read_side
from .params import LIMITS, Query, params, parse_bucket
from .types import (
    AlertEpisode, AlertsResponse, Block, Bucket, DevicesResponse, DeviceStatus, Latest,
    LatestReading, LatestResponse, OpenAlert, Reading, ReadingsResponse, WaveformsResponse,
)

__all__ = ["get_devices", "get_latest", "get_readings", "get_waveforms", "get_alerts"]

_ERRORS: dict[int, tuple[str, type | None]] = {
    400: ("A query parameter is invalid; `reason` names it.", ErrorBody),
    401: ("No credentials, or unknown/revoked ones.", ErrorBody),
    403: ("A device credential, or an API key without scope `telemetry:read` (audited).", ErrorBody),
    429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
    503: ("The database is unavailable for reads, or the read could not be audited.", ErrorBody),
}


def _read(op_id: str, path: str, summary: str, description: str, body: type, query: dict[str, Any]):  # noqa: ANN202
    return operation("GET", path, operation_id=op_id, summary=summary, description=description, auth="api_key",
                     scope="telemetry:read", responses={200: ("The answer.", body), **_ERRORS}, query_params=query)


async def _windows(read: ReadSide, subject: tuple[str, str], frm: int, to: int) -> Windows:
    kind, value = subject
    if kind == "device":
        return [(value, frm, to)]
    async with read.store.pool.acquire() as conn:
        return await windows(conn, value, frm, to)


def _next(kind: str, p: Page) -> str | None:
    return None if p.next_key is None else encode_cursor(kind, p.next_key, p.skip)


@_read("listDevices", "/v1/devices", "Every device with status, association, open alerts and latest numerics",
       "Registered devices (and unregistered ones with an open association), sorted by location then device id; "
       "`location` keeps those whose current location starts with it. `stale`: no numeric reading for longer than "
       "the profile's `silent` after_s (30 s when it has none).", DevicesResponse,
       params("location", "cursor", limit="devices"))
async def get_devices(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    q = Query(request)
    location = q.text("location")
    limit = q.limit("devices")
    cursor = q.cursor("devices", (bool, str, str))
    p = await db(read.store.devices(location=location, limit=limit, cursor=cursor))
    now = int(time.time() * 1000)
    ids = [r["device_id"] for r in p.rows]
    await audit_read(request, "read.devices", ("location", location or "*"), now - LATEST_LOOKBACK_MS, now + 1, ids,
                     device_ids=ids)
    pairs = [(r["device_id"], m, now - LATEST_LOOKBACK_MS, now + 86_400_000)
             for r in p.rows for m in read.numeric_metrics(r["profile"])]
    latest: dict[str, dict[str, Latest]] = {}
    for r in await db(read.store.latest(pairs)):
        latest.setdefault(r[0], {})[r[1]] = Latest(t=int(r[2]), value=float(r[3]), flags=int(r[4]))
    alerts: dict[str, list[OpenAlert]] = {}
    for a in await db(read.store.open_alerts(ids)):
        alerts.setdefault(a["device_id"], []).append(OpenAlert(
            rule=a["rule"], priority=a["priority"], metric=a["metric"], opened_at=int(a["opened_at"]),
            value=a["trigger_value"]))
    out = []
    for r in p.rows:
        dev = r["device_id"]
        values = latest.get(dev, {})
        seen = max((v.t for v in values.values()), default=None)
        out.append(DeviceStatus(
            device_id=dev, profile=r["profile"], status=r["status"], last_seen=seen,
            stale=seen is None or now - seen > read.silent_after_ms(r["profile"]),
            patient_ref=r["patient_ref"], location=r["location"], open_alerts=alerts.get(dev, []), latest=values))
    return json_response(200, DevicesResponse(devices=out, next_cursor=_next("devices", p)))


@_read("getLatest", "/v1/latest", "The latest value of each numeric metric of a device or a patient",
       "Per device and metric, the latest reading of the last 7 days (for a patient: of each associated device "
       "within its association).", LatestResponse, params("device", "patient"))
async def get_latest(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    q = Query(request)
    subject = q.subject()
    now = int(time.time() * 1000)
    frm, to = now - LATEST_LOOKBACK_MS, now + 86_400_000
    wins = await _windows(read, subject, frm, to)
    registry = request.app[CONTEXT].registry
    pairs = []
    for d, lo, hi in wins:
        dev = await _call(registry.device(d))
        pairs.extend((d, m, lo, hi) for m in read.numeric_metrics(dev.profile if dev is not None else None))
    await audit_read(request, "read.latest", subject, frm, to, [w[0] for w in wins])
    rows = await db(read.store.latest(pairs))
    best: dict[tuple[str, str], Any] = {}
    for r in rows:  # a patient's device may have had two windows: keep the later reading
        if (r[0], r[1]) not in best or r[2] > best[(r[0], r[1])][2]:
            best[(r[0], r[1])] = r
    return json_response(200, LatestResponse(latest=[
        LatestReading(device_id=r[0], metric=r[1], t=int(r[2]), value=float(r[3]), flags=int(r[4]))
        for _, r in sorted(best.items())]))


@_read("getReadings", "/v1/readings", "Numeric readings of a device or patient in a window, raw or bucketed",
       "Without `bucket`: the readings, `flags` include (all), exclude (flags = 0 only) or only (flagged only); "
       "at most one day per request. With `bucket` (1s..1d): min, max, avg and count per bucket, device and metric; "
       "aggregates leave out artifacts (OUT_OF_RANGE, SPIKE, NOT_FINITE) with `flags=include`, keep only "
       "flags = 0 with `exclude`, only flagged readings with `only`. Buckets of whole minutes with `flags=include` "
       "read the per-minute rollups and may span 400 days; others read the raw table, one day at most.",
       ReadingsResponse,
       params("device", "patient", "metric", "from", "to", "bucket", "flags", "cursor", limit="buckets"))
async def get_readings(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    q = Query(request)
    subject = q.subject()
    metric = q.text("metric")
    flags = q.text("flags") or "include"
    bucket_text = q.text("bucket")
    try:
        bucket = None if bucket_text is None else parse_bucket(bucket_text)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    rollups = bucket is not None and bucket % MINUTE_MS == 0 and flags == "include"
    route = "buckets" if bucket is not None else "readings"
    default, top = LIMITS[route]
    limit = q.integer("limit", 1, LIMITS["buckets"][1]) or default
    if limit > top:
        raise ApiError(400, f"limit: must be an integer from 1 to {top} without bucket")
    frm, to = q.window(LIMITS["rollup_window_ms" if rollups else "raw_window_ms"])
    cursor = q.cursor(route, (int, str, str) if bucket is not None else (int, str, str, int))
    wins = await _windows(read, subject, frm, to)
    await audit_read(request, "read.readings", subject, frm, to, [w[0] for w in wins], metric=metric,
                     bucket=bucket_text, flags=flags)
    if bucket is None:
        p = await db(read.store.readings(wins, metric=metric, flags=flags, limit=limit, cursor=cursor))
        return json_response(200, ReadingsResponse(readings=[
            Reading(device_id=r[0], metric=r[1], t=int(r[2]), value=float(r[3]), flags=int(r[4])) for r in p.rows
        ], next_cursor=_next(route, p)))
    p = await db(read.store.buckets(wins, metric=metric, bucket_ms=bucket, flags=flags, limit=limit, cursor=cursor))
    # rows are (device_id, metric, t, min, max, avg, count), Bucket's fields in order
    return json_response(200, ReadingsResponse(buckets=list(starmap(Bucket, p.rows)), next_cursor=_next(route, p)))


@_read("getWaveforms", "/v1/waveforms", "Waveform blocks of a device or patient in a window",
       "Blocks whose t0 is in [from, to), at most one day per request.", WaveformsResponse,
       params("device", "patient", "metric", "from", "to", "cursor", limit="waveforms"))
async def get_waveforms(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    q = Query(request)
    subject = q.subject()
    metric = q.text("metric")
    limit = q.limit("waveforms")
    frm, to = q.window(LIMITS["raw_window_ms"], default_ms=60_000)
    cursor = q.cursor("waveforms", (int, str, str, int))
    wins = await _windows(read, subject, frm, to)
    await audit_read(request, "read.waveforms", subject, frm, to, [w[0] for w in wins], metric=metric)
    p = await db(read.store.waveforms(wins, metric=metric, limit=limit, cursor=cursor))
    return json_response(200, WaveformsResponse(blocks=[
        Block(device_id=r[0], metric=r[1], t0=int(r[2]), hz=float(r[3]), samples=list(r[4]), flags=int(r[5]))
        for r in p.rows], next_cursor=_next("waveforms", p)))


@_read("getAlerts", "/v1/alerts", "Alert episodes of a device or patient: open ones or the history",
       "Episodes opened in [from, to) (default: all time), newest first; `state=open` keeps those still active.",
       AlertsResponse, params("device", "patient", "state", "from", "to", "cursor", limit="alerts"))
async def get_alerts(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    q = Query(request)
    subject = q.subject()
    open_only = (q.text("state") or "all") == "open"
    limit = q.limit("alerts")
    frm, to = q.window(2**53, default_ms=2**53)
    cursor = q.cursor("alerts", (int, int))
    wins = await _windows(read, subject, frm, to)
    await audit_read(request, "read.alerts", subject, frm, to, [w[0] for w in wins], state="open" if open_only else "all")
    p = await db(read.store.alerts(wins, open_only=open_only, limit=limit, cursor=cursor))
    return json_response(200, AlertsResponse(alerts=[
        AlertEpisode(id=r[0], device_id=r[1], rule=r[2], priority=r[3], metric=r[4], opened_at=int(r[5]),
                     cleared_at=None if r[6] is None else int(r[6]), value=r[7]) for r in p.rows
    ], next_cursor=_next("alerts", p)))
