"""Who may import whom between gateway/, tests/ and bench/, checked on the code itself.

- ``bench/`` imports from ``tests/`` only the public package ``tests.harness`` (its
  ``__all__``), plus the per-reading reference checks that ``bench.bench_checks``
  measures the vectorized checks against.
- ``tests/`` imports ``bench/`` only in the tests of the bench (``tests/bench/``).
- ``tests/harness/`` imports nothing else of ``tests/``, nothing of ``bench/`` and
  nothing of ``gateway/`` (the gateway runs as a subprocess).
- ``gateway/`` imports neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tests.harness as harness

REPO = Path(__file__).resolve().parent.parent

# (importing module, imported module) pairs allowed on top of the rules above, with the reason
EXCEPTIONS = {
    ("bench.bench_checks", "tests.checks.reference"),  # the baseline the bench measures against
}


def _modules(folder: str) -> list[tuple[str, Path]]:
    out = []
    for path in sorted((REPO / folder).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
    return found


def _violations(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for name, path in _modules(folder):
        for imp in _imports(name, path):
            hit = any(imp == f or imp.startswith(f + ".") for f in forbidden)
            ok = any(imp == a for a in allowed) or (name, imp) in EXCEPTIONS
            if hit and not ok:
                bad.append(f"{name} imports {imp}")
    return sorted(bad)


def test_bench_uses_only_the_public_harness_of_tests():
    assert not _violations("bench", ("tests",), allowed=("tests.harness",))


def test_only_the_tests_of_the_bench_import_bench():
    bad = [v for v in _violations("tests", ("bench",)) if not v.startswith("tests.bench.")]
    assert not bad


def test_the_harness_stands_alone():
    bad = [v for v in _violations("tests/harness", ("tests", "bench", "gateway"))
           if not v.split(" imports ")[1].startswith("tests.harness")]
    assert not bad


def test_gateway_imports_neither_tests_nor_bench():
    assert not _violations("gateway", ("tests", "bench"))


def test_the_harness_exports_what_its_all_names():
    missing = [n for n in harness.__all__ if not hasattr(harness, n)]
    assert not missing
    assert len(set(harness.__all__)) == len(harness.__all__)
