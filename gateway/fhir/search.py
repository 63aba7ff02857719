"""Search parameters of ``GET /fhir/r4/Observation``: their OpenAPI schemas and their parsing.

Each parameter is declared once (``OBSERVATION_PARAMS``); the operation table, the
CapabilityStatement and the parser all read it, so none of them can list a parameter the
others do not. Parsing is strict: a parameter this server does not know is refused (400)
rather than ignored, since an ignored filter would return data the client did not ask for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.model import DEVICE_ID_PATTERN

__all__ = ["OBSERVATION_PARAMS", "PAGE_PARAM", "PAGE_SCHEMA", "SearchError", "parse_codes", "ObservationQuery", "parse_observation_query",
           "parse_reference", "DEFAULT_COUNT", "MAX_COUNT", "DEFAULT_WINDOW_MS", "MAX_MS"]

DEFAULT_COUNT = 100
MAX_COUNT = 1000
DEFAULT_WINDOW_MS = 86_400_000  # without a lower date bound: the day before the upper one
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
PAGE_PARAM = "_page"  # the paging token of the Bundle's links (not a search parameter)

_PATIENT = r"(Patient/)?[^\u0000-\u001f]{1,128}"
_DEVICE = r"(Device/)?" + DEVICE_ID_PATTERN.strip("^$")
_TOKEN = r"([^|,\u0000-\u001f]{1,200}\|)?[A-Za-z0-9.\-]{1,64}"
_DATE = (r"(ge|gt|le|lt)[0-9]{4}-[0-9]{2}-[0-9]{2}"
         r"(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,3})?)?(Z|[+-][0-9]{2}:[0-9]{2}))?")

# name -> (OpenAPI schema, CapabilityStatement type, documentation)
OBSERVATION_PARAMS: dict[str, tuple[dict[str, Any], str, str]] = {
    "patient": ({"type": "string", "pattern": f"^{_PATIENT}$"}, "reference",
                "The patient (`patient_ref` of the associations, or `Patient/<ref>`): each device's readings "
                "within its association with the patient."),
    "subject": ({"type": "string", "pattern": f"^{_PATIENT}$"}, "reference", "Same as `patient`."),
    "device": ({"type": "string", "pattern": f"^{_DEVICE}$"}, "reference",
               "The device (`<device_id>` or `Device/<device_id>`)."),
    "code": ({"type": "string", "pattern": f"^{_TOKEN}(,{_TOKEN}){{0,19}}$"}, "token",
             "`system|code` or `code`, comma-separated (any of them): LOINC (http://loinc.org) or MDC "
             "(urn:iso:std:iso:11073:10101)."),
    "date": ({"type": "array", "items": {"type": "string", "pattern": f"^{_DATE}$"}, "minItems": 1, "maxItems": 4},
             "date", "effective time with prefix ge, gt, le or lt; repeat for a range. Without a lower bound, the "
             "day before the upper bound (default now + 1 day)."),
    "_count": ({"type": "integer", "minimum": 1, "maximum": MAX_COUNT, "default": DEFAULT_COUNT}, "number",
               f"Observations per page (default {DEFAULT_COUNT}, at most {MAX_COUNT})."),
    "_sort": ({"type": "string", "enum": ["date", "-date"]}, "string",
              "`date` (oldest first, the default) or `-date` (newest first)."),
}
PAGE_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 512}

_RE = {n: re.compile(s["pattern"]) for n, (s, _, _) in OBSERVATION_PARAMS.items() if "pattern" in s}
_DATE_RE = re.compile(f"^{_DATE}$")
_INT = re.compile(r"^[0-9]{1,9}$")


class SearchError(ValueError):
    """A parameter is invalid; the message names it."""


@dataclass(frozen=True)
class ObservationQuery:
    subject: tuple[str, str]  # ("patient", ref) or ("device", id)
    codes: list[tuple[str | None, str]] = field(default_factory=list)  # (system or None, code); empty: any
    frm: int = 0
    to: int = 0
    count: int = DEFAULT_COUNT
    desc: bool = False
    page: str | None = None

    raw: str = ""  # the parameters as given, without the page: what a page token is bound to


def parse_reference(kind: str, text: str) -> str:
    """``Patient/REF`` / ``Device/ID`` or the bare value -> the value."""
    prefix = "Patient/" if kind == "patient" else "Device/"
    return text[len(prefix):] if text.startswith(prefix) else text


_DATE_PARTS = re.compile(r"^(ge|gt|le|lt)([0-9]{4}-[0-9]{2}-[0-9]{2})"
                         r"(?:T([0-9]{2}:[0-9]{2})(?::([0-9]{2})(?:\.([0-9]{1,3}))?)?(Z|[+-][0-9]{2}:[0-9]{2}))?$")


def _date_bound(text: str) -> tuple[str, int]:
    """``ge2026-01-01`` -> ("from", epoch ms): the value covers the instants of its own precision
    (a day, minute, second or millisecond) and the prefix takes that range's start or end."""
    m = _DATE_PARTS.match(text)
    if m is None:
        raise SearchError(f"date: {text!r}: expected ge, gt, le or lt and a date or a date-time with offset")
    prefix, day, hm, sec, frac, zone = m.groups()
    try:
        if hm is None:
            start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
            step = timedelta(days=1)
        else:
            start = datetime.fromisoformat(f"{day}T{hm}:{sec or '00'}.{(frac or '0').ljust(3, '0')}"
                                           f"{'+00:00' if zone == 'Z' else zone}")
            step = (timedelta(milliseconds=1) if frac else timedelta(seconds=1) if sec else timedelta(minutes=1))
        lo = round(start.timestamp() * 1000)
        hi = round((start + step).timestamp() * 1000)
    except (ValueError, OverflowError):
        raise SearchError(f"date: {text!r} is not a valid date") from None
    # [lo, hi) is what the value covers: ge -> t >= lo, gt -> t >= hi, le -> t < hi, lt -> t < lo
    return {"ge": ("from", lo), "gt": ("from", hi), "le": ("to", hi), "lt": ("to", lo)}[prefix]


def parse_codes(text: str) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for token in text.split(","):
        system, bar, code = token.rpartition("|")
        out.append((system if bar and system else None, code))
    return out


def parse_observation_query(query: Mapping[str, Sequence[str]], now_ms: int) -> ObservationQuery:
    """The search of ``query`` (name -> values); ``SearchError`` naming the parameter at fault."""
    for name in query:
        if name not in OBSERVATION_PARAMS and name != PAGE_PARAM:
            raise SearchError(f"{name}: not a search parameter of Observation here; see /fhir/r4/metadata")
    for name, values in query.items():
        if name != "date" and len(values) > 1:
            raise SearchError(f"{name}: given more than once")
        for v in values:
            rx = _RE.get(name)
            if rx is not None and not rx.match(v):
                raise SearchError(f"{name}: {v!r} does not match {OBSERVATION_PARAMS[name][0]['pattern']}")
    given = [n for n in ("patient", "subject", "device") if n in query]
    if len(given) != 1:
        raise SearchError("patient|subject|device: give exactly one of patient, subject, device")
    name = given[0]
    kind = "device" if name == "device" else "patient"
    subject = (kind, parse_reference(kind, query[name][0]))
    frm: int | None = None
    to: int | None = None
    dates = query.get("date", [])
    if len(dates) > 4:
        raise SearchError("date: at most 4 values")
    for text in dates:
        side, ms = _date_bound(text)
        if side == "from":
            frm = ms if frm is None else max(frm, ms)
        else:
            to = ms if to is None else min(to, ms)
    to = min(MAX_MS, now_ms + 86_400_000) if to is None else to
    frm = max(0, to - DEFAULT_WINDOW_MS) if frm is None else frm
    frm, to = max(0, frm), min(MAX_MS + 1, to)
    count = DEFAULT_COUNT
    if "_count" in query:
        text = query["_count"][0]
        if not _INT.match(text) or not 1 <= int(text) <= MAX_COUNT:
            raise SearchError(f"_count: must be an integer from 1 to {MAX_COUNT}")
        count = int(text)
    sort = query.get("_sort", ["date"])[0]
    if sort not in ("date", "-date"):
        raise SearchError("_sort: must be date or -date")
    page = query.get(PAGE_PARAM, [None])[0]
    if page is not None and not 1 <= len(page) <= 512:
        raise SearchError(f"{PAGE_PARAM}: not a page of this search")
    codes = parse_codes(query["code"][0]) if "code" in query else []
    raw = "&".join(f"{k}={v}" for k in sorted(query) if k not in (PAGE_PARAM, "_count") for v in query[k])
    return ObservationQuery(subject=subject, codes=codes, frm=frm, to=max(frm, to), count=count,
                            desc=sort == "-date", page=page, raw=raw)
