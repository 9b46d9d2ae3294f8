"""The latency figures every benchmark reports from its measured round-trip times."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def p50_p99_us(seconds: Iterable[float]) -> dict[str, float]:
    """p50 (the median) and p99 (the sample at the 99th percent of the sorted samples) in µs
    of round-trip times in seconds; StatisticsError when there are none."""
    xs = sorted(seconds)
    return {"p50_us": statistics.median(xs) * 1e6,
            "p99_us": xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6}
