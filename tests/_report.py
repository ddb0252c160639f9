"""Worst values measured by the property tests, printed at the end of the run."""

from __future__ import annotations

import math

WORST: dict[tuple[str, str], float] = {}
COUNTS: dict[str, int] = {}


def record(check: str, dtype: str, value: float) -> None:
    key = (check, dtype)
    WORST[key] = max(WORST.get(key, -math.inf), float(value))


def count(check: str, n: int = 1) -> None:
    COUNTS[check] = COUNTS.get(check, 0) + n
