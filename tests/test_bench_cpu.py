"""The end-to-end benchmark's CPU table (bench/e2e.py): it must charge a process the CPU it
really used, all threads included, and leave out a process that has gone."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.e2e import CpuMeter, cpu_table

#: Two threads busy for BUSY seconds each, then (alive, like a DSP's threads) waiting to be
#: stopped with the process.
BUSY = 0.3
SPINNER = f"""
import threading, time, sys
spun = threading.Barrier(3)
def spin():
    t = time.thread_time()
    while time.thread_time() - t < {BUSY}:
        pass
    spun.wait()
    threading.Event().wait()
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
spun.wait()
print("done", flush=True)
sys.stdin.read()
"""


class _Cluster:
    def __init__(self, kernels: dict, dsps: dict) -> None:
        self.kernels, self.dsps = kernels, dsps


@pytest.fixture
def spinner():
    p = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_cpu_of_every_thread_is_charged_per_round_trip(spinner):
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        meter = CpuMeter(_Cluster({1: spinner}, {1: idle}), {}, {1: "server"})
        before = meter.sample()
        assert spinner.stdout.readline().strip() == "done"
        time.sleep(0.1)
        used = meter.per_round_trip(before, meter.sample(), loops=100)
    finally:
        idle.kill()
        idle.wait()
    # Two threads of BUSY s each over 100 round trips: 2 * BUSY / 100 s per round trip.
    assert used["kernel 1 (server)"][0] >= 2 * BUSY / 100 * 1e6 * 0.9
    assert used.get("DSP 1 (server)", [0.0])[0] < 0.2 * used["kernel 1 (server)"][0]
    lines = cpu_table("compress NO", {"direct": [{"cpu_us": used}]})
    assert lines[0].startswith("| CPU µs per round trip (compress NO) | direct |")
    assert any(line.startswith("| kernel 1 (server) |") for line in lines)


def test_a_process_that_has_gone_is_left_out(spinner):
    meter = CpuMeter(_Cluster({1: spinner}, {}), {}, {})
    before = meter.sample()
    spinner.kill()
    spinner.wait()
    assert meter.sample() == {"kernel 1 (node)": (0.0, 0.0, 0.0)}
    assert meter.per_round_trip(before, meter.sample(), loops=10) == {}
