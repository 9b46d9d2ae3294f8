"""CPU time of a process as the scheduler counts it, for the benchmarks' per-process figures."""

from __future__ import annotations

import os


def run_time(pid: int) -> float:
    """Seconds on a CPU of the threads of `pid` (/proc/PID/task/TID/schedstat: exact, where
    the tick counts of /proc/PID/stat are 10 ms steps); raises FileNotFoundError when the
    process has gone."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread ended meanwhile
    return total / 1e9
