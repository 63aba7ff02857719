"""Quality flags have one source, ``gateway.model.Flag``: what repeats it is checked against it."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.model import ARTIFACT_FLAGS, FLAG_NAMES, Flag

ROOT = Path(__file__).resolve().parent.parent


def test_bits_are_consecutive_so_flag_names_index_bits():
    # pipeline metrics and the replay summary count bit i under FLAG_NAMES[i].
    assert [int(f) for f in Flag] == [1 << i for i in range(len(Flag))]
    assert FLAG_NAMES == tuple(f.name for f in Flag)
    assert ARTIFACT_FLAGS == int(Flag.OUT_OF_RANGE | Flag.SPIKE | Flag.NOT_FINITE)


def test_protocol_table_lists_every_flag_with_its_bit():
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([A-Z_]+) \|", text, flags=re.M)
    assert [(int(b), int(v), n) for b, v, n in rows] == [(i, int(f), f.name) for i, f in enumerate(Flag)]


# ``flags & 64``, ``flags & 195``, ``(flags & 3) = 0``, ``flags | 8``: a mask written as a number.
_LITERAL_MASK = re.compile(r"\bflags\s*[&|]\s*\(?\s*\d")


def test_no_flag_mask_is_written_as_a_number():
    offenders = []
    for path in [*sorted((ROOT / "gateway").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py")), ROOT / "README.md"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _LITERAL_MASK.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "flag masks must come from gateway.model.Flag:\n" + "\n".join(offenders)
