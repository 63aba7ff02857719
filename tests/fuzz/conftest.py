"""Fuzz runs are reproducible (derandomized, no example database) and report how many examples ran."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

# derandomize: every run, in CI and in `make test`, draws the same examples; a failure
# reproduces by running the test again. No deadline: the machine is shared and noisy.
settings.register_profile(
    "vitalgate-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("vitalgate-fuzz")

EXAMPLES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
_START = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not EXAMPLES:
        return
    parts = ", ".join(f"{name} {n}" for name, n in sorted(EXAMPLES.items()))
    outcomes = ", ".join(f"{name} {n}" for name, n in sorted(OUTCOMES.items()))
    terminalreporter.write_line(
        f"fuzz: {sum(EXAMPLES.values())} examples ({parts}); outcomes: {outcomes}; "
        f"{time.monotonic() - _START:.1f} s since the fuzz tests were collected"
    )
