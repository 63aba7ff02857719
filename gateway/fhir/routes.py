"""The FHIR R4 routes under /fhir/r4/: metadata, Observation search and read, Device and
Provenance read. API keys with scope ``telemetry:read``; every read but ``metadata`` writes
its ``audit_log`` row (``read.fhir.<resource>``) before the answer, like the query API.
Errors are OperationOutcome resources (``outcome``), the authentication's included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import weakref
from typing import Any

import orjson
from aiohttp import web

from gateway.api import audit_read, db, read_side
from gateway.query.associations import list_associations
from gateway.query.cursor import CursorError, decode_cursor, encode_cursor
from gateway.sources.http.api import ERROR_RENDERERS, ApiError, operation

from . import mapping, store
from .capability import BASE, FHIR_JSON, INTERACTIONS, Interaction, statement
from .mapping import Catalog, ObsKey
from .observations import observations, plan
from .search import (
    MAX_MS, OBSERVATION_PARAMS, PAGE_PARAM, PAGE_SCHEMA, ObservationQuery, SearchError, parse_observation_query,
)
from .types import (
    FhirBundle, FhirCapabilityStatement, FhirDevice, FhirObservation, FhirOperationOutcome, FhirProvenance,
)

__all__ = ["outcome", "fhir_response"]

FHIR_ID = "^[A-Za-z0-9.-]{1,64}$"
_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
          408: "timeout", 413: "too-costly", 415: "not-supported", 429: "throttled", 500: "exception",
          503: "transient"}
_ERRORS: dict[int, tuple[str, type | None]] = {
    400: ("A parameter is invalid; the OperationOutcome's diagnostics name it.", FhirOperationOutcome),
    401: ("No credentials, or unknown/revoked ones.", FhirOperationOutcome),
    403: ("A device credential, or an API key without scope `telemetry:read` (audited).", FhirOperationOutcome),
    429: ("The key's rate limit is exhausted; see Retry-After.", FhirOperationOutcome),
    500: ("Unexpected server error (logged with the correlation id).", FhirOperationOutcome),
    503: ("The database is unavailable for reads, or the read could not be audited.", FhirOperationOutcome),
}
_NOT_FOUND = {404: ("No such resource here.", FhirOperationOutcome)}


def fhir_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON, headers=headers)


def outcome(status: int, reason: str, correlation_id: str, headers: dict[str, str]) -> web.Response:
    """An error as an OperationOutcome (``ERROR_RENDERERS`` calls it for every path under /fhir/)."""
    body = {"resourceType": "OperationOutcome", "id": correlation_id,
            "issue": [{"severity": "error", "code": _ISSUE.get(status, "processing"), "diagnostics": reason}]}
    return fhir_response(status, body, headers)


ERROR_RENDERERS["/fhir/"] = outcome


def interaction(resource: str | None, code: Any, path: str, operation_id: str, summary: str, body: type,  # noqa: ANN401
                *, description: str = "", params: dict[str, tuple[dict[str, Any], str, str]] | None = None,
                path_params: dict[str, str] | None = None, auth: Any = "api_key"):  # noqa: ANN202, ANN401
    """Declare a FHIR route: in the CapabilityStatement (``INTERACTIONS``) and in the operation table."""
    INTERACTIONS.append(Interaction(resource, code, path, dict(params or {})))
    query = {n: s for n, (s, _, _) in (params or {}).items()}
    if params:
        query[PAGE_PARAM] = PAGE_SCHEMA
    responses = {200: ("The resource.", body), **(_NOT_FOUND if path_params else {}), **_ERRORS}
    if auth == "none":
        responses = {200: responses[200], 500: responses[500]}
    return operation("GET", path, operation_id=operation_id, summary=summary, description=description, auth=auth,
                     scope="telemetry:read" if auth == "api_key" else None, responses=responses,
                     query_params=query, path_params=path_params, media_type=FHIR_JSON)


_CATALOGS: weakref.WeakKeyDictionary[Any, Catalog] = weakref.WeakKeyDictionary()


def _catalog(request: web.Request) -> Catalog:
    """The metric facts of the read side's profiles, built once per read side."""
    read = read_side(request)
    cat = _CATALOGS.get(read)
    if cat is None:
        cat = _CATALOGS[read] = Catalog(read.profiles)
    return cat


@interaction(None, "capabilities", f"{BASE}/metadata", "fhirCapabilities",
             "The CapabilityStatement: what this FHIR facade implements", FhirCapabilityStatement, auth="none")
async def get_metadata(request: web.Request) -> web.StreamResponse:
    return fhir_response(200, statement(mapping.instant(int(time.time() * 1000))))


def _page_kind(q: ObservationQuery) -> str:
    return "fhir:" + hashlib.sha256(q.raw.encode()).hexdigest()[:16]


@interaction("Observation", "search-type", f"{BASE}/Observation", "fhirSearchObservation",
             "Observations of a patient or a device: numerics, blood pressure panels, waveforms", FhirBundle,
             description="A `searchset` Bundle, oldest first (`_sort=-date`: newest first), `_count` entries a page "
                         "with a `next` link while more follow. Exactly one of patient, subject, device.",
             params=OBSERVATION_PARAMS)
async def search_observations(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    catalog = _catalog(request)
    query = {k: request.query.getall(k) for k in request.query.keys()}
    try:
        q = parse_observation_query(query, int(time.time() * 1000))
    except SearchError as exc:
        raise ApiError(400, str(exc)) from None
    start = None
    if q.page is not None:
        try:
            key, _ = decode_cursor(_page_kind(q), q.page, (int, str, str, int, int, int, int))
        except CursorError:
            raise ApiError(400, f"{PAGE_PARAM}: not a page of this search") from None
        start = ObsKey(*key[:5])
        q = dataclasses.replace(q, frm=key[5], to=key[6])  # the window of the first page, whatever the clock says

    async def run() -> tuple[list[dict[str, Any]], ObsKey | None, list[str]]:
        async with read.store.pool.acquire() as conn:
            p = await plan(conn, catalog, q.subject, q.codes, q.frm, q.to, desc=q.desc)
            await audit_read(request, "read.fhir.observation", q.subject, q.frm, q.to, p.devices,
                             codes=[f"{s or ''}|{c}" for s, c in q.codes], sort="-date" if q.desc else "date")
            out: list[dict[str, Any]] = []
            following: ObsKey | None = None
            async with conn.transaction(readonly=True):
                async for k, obs in observations(conn, catalog, p, start):
                    if len(out) == q.count:
                        following = k
                        break
                    out.append(obs)
            return out, following, p.devices

    found, following, _ = await db(run())
    base = f"{request.url.origin()}{BASE}"
    own = [(k, v) for k, v in request.query.items() if k != PAGE_PARAM]
    links = [{"relation": "self", "url": str(request.url)}]
    if following is not None:
        token = encode_cursor(_page_kind(q), [following.t, following.device_id, following.group,
                                              following.ingest_id, following.n, q.frm, q.to])
        links.append({"relation": "next", "url": str(request.url.with_query([*own, (PAGE_PARAM, token)]))})
    return fhir_response(200, {
        "resourceType": "Bundle", "type": "searchset", "link": links,
        "entry": [{"fullUrl": f"{base}/Observation/{o['id']}", "resource": o, "search": {"mode": "match"}}
                  for o in found]})


async def _observation(request: web.Request, action: str) -> tuple[ObsKey, dict[str, Any]]:
    """The Observation named by the path's id, audited as ``action``; 404 when there is none."""
    read = read_side(request)
    catalog = _catalog(request)
    text = request.match_info["id"]
    parsed = mapping.parse_observation_id(text)
    if parsed is None:
        raise ApiError(404, f"id: {text!r} is not an Observation id of this server")
    ingest_id, t, h, n = parsed

    async def find() -> tuple[ObsKey, list[mapping.Row]] | None:
        async with read.store.pool.acquire() as conn:
            rows = await store.rows_at(conn, t, ingest_id, catalog.bp_metrics)
        for k, part in mapping.group(rows):
            if mapping.matches(k, h) and k.n == n:
                return k, part
        return None

    hit = await db(find()) if t <= MAX_MS else None
    if hit is None:
        raise ApiError(404, f"id: no Observation {text}")
    k, rows = hit
    await audit_read(request, action, ("device", k.device_id), k.t, k.t + 1, [k.device_id], id=text)

    async def subject() -> str | None:
        async with read.store.pool.acquire() as conn:
            return mapping.patient_at(await list_associations(conn, device_id=k.device_id), k.t)

    return k, mapping.observation(k, rows, catalog, await db(subject()))


@interaction("Observation", "read", f"{BASE}/Observation/{{id}}", "fhirReadObservation",
             "One Observation by its id", FhirObservation, path_params={"id": FHIR_ID})
async def read_observation(request: web.Request) -> web.StreamResponse:
    _, obs = await _observation(request, "read.fhir.observation")
    return fhir_response(200, obs)


@interaction("Provenance", "read", f"{BASE}/Provenance/{{id}}", "fhirReadProvenance",
             "The Provenance of Observation {id}: the device, the gateway and the envelope (payload SHA-256)",
             FhirProvenance, path_params={"id": FHIR_ID},
             description="The Provenance of an Observation has the Observation's id. 404 when the Observation, "
                         "or its ingest (removed by retention), is not there.")
async def read_provenance(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    k, obs = await _observation(request, "read.fhir.provenance")

    async def fetch() -> Any:  # noqa: ANN401
        async with read.store.pool.acquire() as conn:
            return await store.ingest(conn, k.ingest_id)

    ingest = await db(fetch())
    if ingest is None:
        raise ApiError(404, f"id: the envelope of Observation {obs['id']} is no longer kept (retention)")
    return fhir_response(200, mapping.provenance(obs["id"], k, ingest))


@interaction("Device", "read", f"{BASE}/Device/{{id}}", "fhirReadDevice",
             "A device: identifier, status, type from its profile", FhirDevice, path_params={"id": FHIR_ID})
async def read_device(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    fid = request.match_info["id"]

    async def fetch() -> Any:  # noqa: ANN401
        async with read.store.pool.acquire() as conn:
            device_id = fid
            if fid.startswith("x-"):  # an id with characters FHIR ids lack: found by its hash
                ids = await conn.fetch("SELECT device_id FROM devices UNION SELECT device_id FROM associations")
                device_id = next((r[0] for r in ids if mapping.device_fhir_id(r[0]) == fid), fid)
            elif mapping.device_fhir_id(fid) != fid:
                return None
            return await store.device_record(conn, device_id)

    rec = await db(fetch())
    if rec is None:
        raise ApiError(404, f"id: no Device {fid}")
    now = int(time.time() * 1000)
    await audit_read(request, "read.fhir.device", ("device", rec["device_id"]), now, now + 1, [rec["device_id"]])
    prof = read.profiles.get(rec["profile"]) if rec["profile"] else None
    return fhir_response(200, mapping.device(rec["device_id"], rec["status"], prof, rec["profile"]))
