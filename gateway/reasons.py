"""How a refused payload's reason names the field at fault.

msgspec reports ``Expected `float`, got `str` - at `$.numerics[1].values[...]```; devices'
integrators need ``numerics[1].values.spo2: expected number, got string``. The rewriting, and
the best-effort look at a refused payload's ``device_id`` (so the reject keeps its device),
live here, apart from the decoding itself.
"""

from __future__ import annotations

import re

import msgspec

from gateway.model import DEVICE_ID_PATTERN

__all__ = ["reason_from", "name", "name_dict_key", "peek_device_id"]

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)


class _DeviceOnly(msgspec.Struct):
    device_id: object = None


_PEEK_JSON = msgspec.json.Decoder(_DeviceOnly)
_PEEK_MSGPACK = msgspec.msgpack.Decoder(_DeviceOnly)


_PATH_RE = re.compile(r"\s*-\s*at\s*`\$([^`]*)`\s*$")
_TYPE_WORDS = {
    "float": "number",
    "int": "integer",
    "str": "string",
    "bool": "boolean",
    "object": "object",
    "array": "array",
    "null": "null",
    "datetime": "RFC 3339 timestamp",
    "int | datetime": "integer epoch milliseconds or RFC 3339 timestamp",
    "int | null": "integer or null",
    "str | null": "string or null",
    "bytes | array": "array of numbers or binary",
}


def _word(match: re.Match[str]) -> str:
    name = match.group(1)
    return _TYPE_WORDS.get(name, name)


def reason_from(exc: msgspec.ValidationError) -> str:
    """Rewrite msgspec's ``Expected `float`, got `str` - at `$.a[1].b``` into ``a[1].b: expected number, got string``."""
    text = str(exc)
    path = ""
    m = _PATH_RE.search(text)
    if m:
        path = m.group(1).lstrip(".")
        text = text[: m.start()]
    missing = re.match(r"Object missing required field `([^`]+)`", text)
    if missing:
        field = missing.group(1)
        return f"{path + '.' if path else ''}{field}: required field missing"
    if "matching regex" in text and path == "device_id":
        text = "must match [A-Za-z0-9._-]{1,64}"
    elif "Invalid RFC3339" in text:
        text = "invalid RFC 3339 timestamp"
    elif "datetime` with a timezone" in text or "with a timezone component" in text:
        text = "RFC 3339 timestamp must carry an offset"
    text = re.sub(r"`([^`]+)`", _word, text)
    if text[1:2].islower():
        text = text[:1].lower() + text[1:]
    return f"{path or 'payload'}: {text.strip()}"


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def name(name: str) -> str:
    """A device-supplied key as it appears in a reason: bare when plain, else quoted and escaped."""
    return name if _SAFE_NAME.match(name) else repr(name)


_DICT_VALUE = re.compile(r"^numerics\[(\d+)\]\.values\[\.\.\.\]")


def name_dict_key(reason: str, payload: bytes, encoding: str) -> str:
    """msgspec reports a bad dict value as ``values[...]``: find which key, for the reason."""
    m = _DICT_VALUE.match(reason)
    if not m:
        return reason
    try:
        raw = (msgspec.msgpack.decode if encoding == "msgpack" else msgspec.json.decode)(payload)
        values = raw["numerics"][int(m.group(1))]["values"]
        bad = next(k for k, v in values.items() if type(v) not in (int, float))
    except Exception:  # noqa: BLE001 - best effort: keep msgspec's wording
        return reason
    return f"numerics[{m.group(1)}].values.{name(bad)}" + reason[m.end():]


def peek_device_id(payload: bytes, encoding: str) -> str | None:
    try:
        peek = (_PEEK_MSGPACK if encoding == "msgpack" else _PEEK_JSON).decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None
    dev = peek.device_id
    if isinstance(dev, str) and _DEVICE_RE.match(dev):
        return dev
    return None
