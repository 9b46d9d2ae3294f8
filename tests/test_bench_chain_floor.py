"""The floor of the relayed round trip (bench/chain_floor.py): it carries every round trip
through its seven processes, meters each one, and leaves no process behind: they end at the
end of file, also when a process of the chain dies."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from bench import chain_floor

PROCESSES = {"node kernel 3", "DSP 3", "LB host", "DSP 1", "node kernel 1", "server"}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def kills(monkeypatch):
    """The processes `run` had to kill: none, when each ends at the end of file."""
    killed: list[int] = []
    kill = subprocess.Popen.kill

    def recording(proc: subprocess.Popen) -> None:
        killed.append(proc.pid)
        kill(proc)

    monkeypatch.setattr(subprocess.Popen, "kill", recording)
    return killed


def test_round_trips_through_every_process_and_cleans_up(kills):
    before = _children()
    res = chain_floor.run(300)
    assert res["loops"] == 300
    assert 0 < res["p50_us"] <= res["p99_us"]
    assert set(res["cpu_us"]) == PROCESSES
    idle = [name for name, us in res["cpu_us"].items() if us <= 0]
    assert not idle, f"the round trips did not pass through {idle}"
    assert not kills
    assert _children() == before


def test_a_dead_process_fails_the_run_and_the_others_end(kills):
    before = _children()
    killed = threading.Event()

    def kill_the_lb_host() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not killed.is_set():
            for p in psutil.Process().children():
                try:
                    relay = "relay" in p.cmdline()
                except psutil.Error:
                    continue
                if relay:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.set()
                    return
            time.sleep(0.02)

    t = threading.Thread(target=kill_the_lb_host, daemon=True)
    t.start()
    with pytest.raises((RuntimeError, ConnectionError)):
        chain_floor.run(30_000)
    t.join(10)
    assert killed.is_set()
    assert not kills, "processes of the chain did not end at the end of file"
    assert _children() == before


def test_at_least_one_round_trip():
    with pytest.raises(ValueError):
        chain_floor.run(0)
