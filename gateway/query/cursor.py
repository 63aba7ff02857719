"""Keyset pagination: opaque cursors and the page cut.

A cursor is the URL-safe base64 of ``[kind, key, skip]`` in JSON: ``key`` the sort key of
the last row returned, ``skip`` how many rows with exactly that key were returned (for
tables whose rows have no unique key). ``kind`` binds a cursor to its route, so a cursor
of one route is refused by another instead of paging something else.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Page", "page", "encode_cursor", "decode_cursor", "CursorError"]


class CursorError(ValueError):
    """The cursor is not one this route handed out."""


@dataclass(slots=True)
class Page:
    rows: list[Any]
    next_key: list[Any] | None  # sort key of the last row, when more rows follow
    skip: int = 0


def page(rows: Sequence[Any], cursor_key: list[Any] | None, skip: int, limit: int,
         key: Callable[[Any], list[Any]]) -> Page:
    """Cut ``rows`` (fetched as ``limit + skip + 1`` from the cursor's key on, inclusive when
    ``cursor_key`` is given) into one page and the key to continue from."""
    rows = list(rows)
    if cursor_key is not None:
        n = 0
        while n < skip and n < len(rows) and key(rows[n]) == cursor_key:
            n += 1
        rows = rows[n:]
    more = len(rows) > limit
    rows = rows[:limit]
    if not more or not rows:
        return Page(rows, None)
    last = key(rows[-1])
    same = 0
    for r in reversed(rows):
        if key(r) != last:
            break
        same += 1
    if cursor_key is not None and last == cursor_key:
        same += skip
    return Page(rows, last, same)


def encode_cursor(kind: str, key: list[Any], skip: int = 0) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([kind, key, skip])).decode().rstrip("=")


def decode_cursor(kind: str, text: str, types: Sequence[type | tuple[type, ...]]) -> tuple[list[Any], int]:
    """``(key, skip)`` of a cursor of route ``kind`` whose key items have ``types``; ``CursorError`` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise CursorError("cursor: not a cursor returned by this route") from None
    if (not isinstance(value, list) or len(value) != 3 or value[0] != kind or not isinstance(value[1], list)
            or len(value[1]) != len(types) or not isinstance(value[2], int) or isinstance(value[2], bool)
            or not 0 <= value[2] <= 1_000_000):
        raise CursorError("cursor: not a cursor returned by this route")
    for item, tp in zip(value[1], types):
        if not isinstance(item, tp) or isinstance(item, bool) and tp is not bool:
            raise CursorError("cursor: not a cursor returned by this route")
        # keys go to the database as they are: keep them inside what its types can hold
        if isinstance(item, int) and not isinstance(item, bool) and not 0 <= item <= 2**53:
            raise CursorError("cursor: not a cursor returned by this route")
        if isinstance(item, str) and ("\x00" in item or len(item) > 256):
            raise CursorError("cursor: not a cursor returned by this route")
    return value[1], value[2]
