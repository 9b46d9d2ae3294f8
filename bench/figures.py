"""The latency figures every benchmark reports from its measured round-trip times."""

from __future__ import annotations

from collections.abc import Iterable

from dvs_apps.latency import p50_p99


def p50_p99_us(seconds: Iterable[float]) -> dict[str, float]:
    """p50 and p99 (`dvs_apps.latency.p50_p99`) in µs of round-trip times in seconds;
    StatisticsError when there are none."""
    p50, p99 = p50_p99(list(seconds))
    return {"p50_us": p50 * 1e6, "p99_us": p99 * 1e6}
