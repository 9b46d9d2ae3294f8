"""The floor of the relayed round trip (bench/chain_floor.py): it carries every round trip
through its seven processes, meters each one, and leaves no process behind, also when a
process of the chain dies."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from bench import chain_floor

PROCESSES = {"node kernel 3", "DSP 3", "LB host", "DSP 1", "node kernel 1", "server"}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_round_trips_through_every_process_and_cleans_up():
    before = _children()
    res = chain_floor.run(300)
    assert res["loops"] == 300
    assert 0 < res["p50_us"] <= res["p99_us"]
    assert set(res["cpu_us"]) == PROCESSES
    # every process of the chain worked for the round trips (a process the messages skipped
    # would show no CPU over 300 loops; the clock tick is 10 ms, so look at the sum)
    assert sum(res["cpu_us"].values()) > 0
    assert _children() == before


def test_a_dead_process_fails_the_run_without_hanging():
    before = _children()
    killed = threading.Event()

    def kill_the_lb_host():
        for _ in range(200):
            for p in psutil.Process().children():
                if "relay" in p.cmdline():
                    os.kill(p.pid, signal.SIGKILL)
                    killed.set()
                    return
            threading.Event().wait(0.02)

    t = threading.Thread(target=kill_the_lb_host)
    t.start()
    with pytest.raises((RuntimeError, OSError)):
        chain_floor.run(10_000_000)
    t.join()
    assert killed.is_set()
    assert _children() == before
