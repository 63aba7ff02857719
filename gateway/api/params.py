"""Query parameters of the read API: their OpenAPI schemas and their parsing, from one table.

Each parameter is declared once (``SCHEMAS``); ``Query`` parses a request's parameters
against the same rules and raises ``ApiError(400)`` naming the parameter at fault, so a
request the document calls invalid is never answered with data.
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from gateway.model import DEVICE_ID_PATTERN
from gateway.query.cursor import CursorError, decode_cursor
from gateway.sources.http.api import OPERATIONS, ApiError

from .types import MAX_MS, METRIC_PATTERN, PATIENT_PATTERN

__all__ = ["SCHEMAS", "Query", "params", "parse_bucket", "LIMITS"]

DAY_MS = 86_400_000
# Documented limits (README "Reading the data"): page sizes and window lengths.
LIMITS = {
    "readings": (1000, 10_000),  # (default, max) rows per page
    "buckets": (10_000, 100_000),
    "waveforms": (100, 1000),
    "alerts": (100, 1000),
    "devices": (100, 1000),
    "raw_window_ms": DAY_MS,  # readings, sub-minute buckets, waveforms: at most one day per request
    "rollup_window_ms": 400 * DAY_MS,  # buckets of whole minutes (rollups): at most 400 days
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "device": {"type": "string", "pattern": DEVICE_ID_PATTERN},
    "patient": {"type": "string", "pattern": PATIENT_PATTERN},
    "location": {"type": "string", "pattern": PATIENT_PATTERN},
    "metric": {"type": "string", "pattern": METRIC_PATTERN},
    "from": {"type": "integer", "minimum": 0, "maximum": MAX_MS, "description": "epoch ms, inclusive"},
    "to": {"type": "integer", "minimum": 0, "maximum": MAX_MS, "description": "epoch ms, exclusive"},
    "bucket": {"type": "string", "pattern": "^[0-9]{1,5}[smhd]$",
               "description": "bucket width from 1s to 1d, e.g. 30s, 1m, 15m, 1h, 1d"},
    "flags": {"type": "string", "enum": ["include", "exclude", "only"]},
    "state": {"type": "string", "enum": ["open", "all"]},
    "cursor": {"type": "string", "minLength": 1, "maxLength": 512},
}

_RE = {k: re.compile(v["pattern"]) for k, v in SCHEMAS.items() if "pattern" in v}
_INT = re.compile(r"^[0-9]{1,16}$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}


def params(*names: str, limit: str | None = None) -> dict[str, dict[str, Any]]:
    """The OpenAPI schemas of ``names`` (and ``limit`` with the page size of route ``limit``)."""
    out = {n: SCHEMAS[n] for n in names}
    if limit is not None:
        default, top = LIMITS[limit]
        out["limit"] = {"type": "integer", "minimum": 1, "maximum": top, "default": default}
    return out


def parse_bucket(text: str) -> int:
    """``30s``, ``1m``, ``1h``, ``1d`` -> milliseconds, from 1 s to 1 day."""
    if not _RE["bucket"].match(text):
        raise ValueError("bucket: expected a number and a unit s, m, h or d (30s, 1m, 1h, 1d)")
    ms = int(text[:-1]) * _UNIT_MS[text[-1]]
    if not 1000 <= ms <= DAY_MS:
        raise ValueError("bucket: must be from 1s to 1d")
    return ms


_DECLARED: dict[tuple[str, str], frozenset[str]] = {}


def _declared(method: str, path: str) -> frozenset[str]:
    """The query parameters the operation table declares for a route."""
    key = (method, path)
    if key not in _DECLARED:
        ops = [op for op in OPERATIONS if op.method == method and op.path == path]
        _DECLARED[key] = frozenset(ops[0].query_params) if ops else frozenset()
    return _DECLARED[key]


class Query:
    """The query parameters of one request, parsed by the rules of ``SCHEMAS``."""

    def __init__(self, request: web.Request) -> None:
        self._q = request.query
        allowed = _declared(request.method, request.path)
        unknown = sorted(set(self._q) - allowed)
        if unknown:
            raise ApiError(400, f"{unknown[0]}: not a parameter of {request.method} {request.path} "
                                f"(known: {', '.join(sorted(allowed)) or 'none'})")

    def text(self, name: str) -> str | None:
        values = self._q.getall(name, [])
        if not values:
            return None
        if len(values) > 1:
            raise ApiError(400, f"{name}: given more than once")
        value = values[0]
        pattern = _RE.get(name)
        if pattern is not None and not pattern.match(value):
            raise ApiError(400, f"{name}: must match {SCHEMAS[name]['pattern']}")
        enum = SCHEMAS.get(name, {}).get("enum")
        if enum is not None and value not in enum:
            raise ApiError(400, f"{name}: must be one of {', '.join(enum)}")
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        text = self._q.getall(name, [])
        if not text:
            return None
        if len(text) > 1:
            raise ApiError(400, f"{name}: given more than once")
        if not _INT.match(text[0]) or not low <= int(text[0]) <= high:
            raise ApiError(400, f"{name}: must be an integer from {low} to {high}")
        return int(text[0])

    def limit(self, route: str) -> int:
        default, top = LIMITS[route]
        value = self.integer("limit", 1, top)
        return default if value is None else value

    def subject(self, *, location: bool = False) -> tuple[str, str]:
        """``("device", id)``, ``("patient", ref)`` (or ``("location", prefix)``): exactly one."""
        names = ("device", "patient", "location") if location else ("device", "patient")
        given = [(n, v) for n in names if (v := self.text(n)) is not None]
        if len(given) != 1:
            raise ApiError(400, f"{'|'.join(names)}: give exactly one of {', '.join(names)}")
        return given[0]

    def window(self, max_ms: int, default_ms: int = 3_600_000) -> tuple[int, int]:
        """``[from, to)`` in epoch ms: ``to`` defaults to now, ``from`` to ``to`` - ``default_ms``."""
        to = self.integer("to", 0, MAX_MS)
        frm = self.integer("from", 0, MAX_MS)
        if to is None:
            to = min(MAX_MS, int(time.time() * 1000) + 1)
        if frm is None:
            frm = max(0, to - min(default_ms, max_ms))
        if frm >= to:
            raise ApiError(400, "from: must be before to")
        if to - frm > max_ms:
            raise ApiError(400, f"to: the window from..to may span at most {max_ms // 1000} s for this read")
        return frm, to

    def cursor(self, kind: str, types: tuple[Any, ...]) -> tuple[list[Any], int] | None:
        text = self.text("cursor")
        if text is None:
            return None
        if len(text) > 512:
            raise ApiError(400, "cursor: not a cursor returned by this route")
        try:
            return decode_cursor(kind, text, types)
        except CursorError as exc:
            raise ApiError(400, str(exc)) from None
