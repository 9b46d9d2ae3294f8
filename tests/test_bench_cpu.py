"""The end-to-end benchmark's CPU table (bench/e2e.py): it must charge a process the CPU its
threads really used, user and system apart, and leave out a process that has gone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.e2e import CpuMeter, cpu_table

#: Two threads busy in user space for BUSY seconds each once told to start, then (alive, like
#: a DSP's threads) waiting to be stopped with the process.
BUSY = 0.3
SPINNER = f"""
import sys, threading, time
spun = threading.Barrier(3)
def spin():
    t = time.thread_time()
    while time.thread_time() - t < {BUSY}:
        for _ in range(20000):  # user space; the clock read is a system call
            pass
    spun.wait()
    threading.Event().wait()
print("ready", flush=True)
sys.stdin.readline()
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
spun.wait()
print("done", flush=True)
sys.stdin.read()
"""
IDLE = "import sys; sys.stdin.read()"


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _stop(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()
    p.stdin.close()
    p.stdout.close()


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield lambda code: started.append(_start(code)) or started[-1]
    for p in started:
        _stop(p)


def test_the_cpu_of_every_thread_is_charged_per_round_trip(procs):
    spinner, idle = procs(SPINNER), procs(IDLE)
    assert spinner.stdout.readline().strip() == "ready"
    meter = CpuMeter({"kernel 1": spinner, "DSP 1": idle})
    before = meter.sample()
    spinner.stdin.write("go\n")
    spinner.stdin.flush()
    assert spinner.stdout.readline().strip() == "done"
    used = meter.per_round_trip(before, meter.sample(), loops=100)
    # Two threads of BUSY s each over 100 round trips: 2 * BUSY / 100 s per round trip.
    expected = 2 * BUSY / 100 * 1e6
    busy = used["kernel 1"]
    assert expected * 0.9 <= busy["us_per_rt"] <= expected * 1.5
    assert busy["sys_s"] < 0.2 * busy["user_s"]  # it spun in user space
    assert used.get("DSP 1", {"us_per_rt": 0.0})["us_per_rt"] < 0.1 * expected

    lines = cpu_table("compress NO", {"direct": [{"cpu": used}], "relayed": [{"cpu": {}}]})
    assert lines[0] == ("| CPU µs per round trip (compress NO) | direct | relayed | "
                        "system share (all paths) |")
    row = next(line for line in lines if line.startswith("| kernel 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1].replace(",", "")) == pytest.approx(busy["us_per_rt"], abs=1)
    assert cells[2] == "-"  # it did not run on that path
    assert lines[-1].startswith("| sum | ")


def test_a_process_that_has_gone_is_left_out(procs):
    gone = procs(IDLE)
    meter = CpuMeter({"kernel 1": gone})
    before = meter.sample()
    _stop(gone)
    assert meter.sample() == {"kernel 1": (0.0, 0.0, 0.0)}
    assert meter.per_round_trip(before, meter.sample(), loops=10) == {}
