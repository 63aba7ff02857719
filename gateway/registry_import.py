"""The device list of ``vitalgate devices import``, parsed and validated without I/O.

Format: CSV with two columns, ``device_id,profile``; an optional header line of exactly
those names; blank lines and lines whose first field starts with ``#`` are skipped. A file
is taken whole or not at all, so every problem is reported, each naming its line and, when
one column is at fault, the column.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection
from typing import NamedTuple

from gateway.model import DEVICE_ID_PATTERN

__all__ = ["ImportRow", "RowError", "parse_devices"]

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_HEADER = ["device_id", "profile"]


class ImportRow(NamedTuple):
    """One device to register; ``line`` is its 1-based line in the file."""

    line: int
    device_id: str
    profile: str


class RowError(NamedTuple):
    """Why line ``line`` cannot be imported; ``column`` is ``None`` when the row's shape is wrong."""

    line: int
    column: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.line}: {self.column}: {self.message}" if self.column else f"{self.line}: {self.message}"


def parse_devices(text: str, profiles: Collection[str]) -> tuple[list[ImportRow], list[RowError]]:
    """The rows of the CSV ``text`` and every error in it, in line order.

    Args:
        text: the whole file, decoded.
        profiles: the profile names a row may use.

    Returns:
        ``(rows, errors)``; import ``rows`` only when ``errors`` is empty. A row with errors
        is left out of ``rows``.
    """
    rows: list[ImportRow] = []
    errors: list[RowError] = []
    seen: dict[str, int] = {}
    first = True
    text = text.removeprefix("\ufeff")  # a byte order mark, as spreadsheet exports write it
    reader = csv.reader(text.splitlines(keepends=True))  # the ends keep a quoted newline in its field
    next_line = 1
    while True:
        try:
            rec = next(reader, None)
        except csv.Error as exc:  # a field over csv.field_size_limit(): the rest cannot be split reliably
            errors.append(RowError(next_line, None, f"not readable as CSV: {exc}"))
            break
        if rec is None:
            break
        # a quoted field may span lines: a record starts where the previous one ended
        n, next_line = next_line, reader.line_num + 1
        if not rec or not "".join(rec).strip() or rec[0].lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in rec]
        if first and [f.lower() for f in fields] == _HEADER:
            first = False
            continue
        first = False
        if len(fields) != 2:
            errors.append(RowError(n, None, f"expected 2 columns (device_id,profile), got {len(fields)}"))
            continue
        dev, prof = fields
        bad = len(errors)
        if not _DEVICE_RE.fullmatch(dev):
            errors.append(RowError(n, "device_id", f"{dev!r} must match [A-Za-z0-9._-]{{1,64}}"))
        elif dev in seen:
            errors.append(RowError(n, "device_id", f"{dev!r} already on line {seen[dev]}"))
        else:
            seen[dev] = n
        if prof not in profiles:
            errors.append(RowError(n, "profile", f"unknown profile {prof!r}"))
        if len(errors) == bad:
            rows.append(ImportRow(n, dev, prof))
    return rows, errors
