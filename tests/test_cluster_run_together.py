"""`Cluster.run_together` (the demo's and the benchmark's concurrent clients) runs its programs
at the same time, however much they print: a client prints a line per loop, more than a pipe
holds, and none may be held in its writes until the others have ended."""

from __future__ import annotations

import sys

import psutil
import pytest

from dsp_proxy.cluster import REPO_ROOT, Cluster

#: A program that prints a loop line per loop (far more than a pipe's 64 KiB), then says it is
#: done and waits, at most 20 s, until every other one is done too: programs held one after
#: the other never all get there, and time out with status 1.
CLIENT = r"""
import os, sys, time
done, me, count, loops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(loops):
    sys.stdout.write(f"Time total elapsed in loop {i}: 0.000700\n")
sys.stdout.flush()
open(os.path.join(done, me), "w").close()
deadline = time.monotonic() + 20
while len(os.listdir(done)) < count:
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.01)
"""


def test_programs_that_print_more_than_a_pipe_holds_run_at_once(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    count, loops = 4, 20_000        # about 0.9 MB of lines each
    cluster = Cluster(REPO_ROOT / "examples" / "cluster.cfg", rundir=str(tmp_path))
    jobs = [(1, [sys.executable, "-c", CLIENT, str(done), str(i), str(count), str(loops)])
            for i in range(count)]
    results = cluster.run_together(jobs, timeout=60)
    assert [r.returncode for r in results] == [0] * count, \
        "the programs were held until their output was read"
    for r in results:
        assert r.stdout.count("Time total elapsed in loop") == loops


def test_a_program_that_outlives_the_timeout_is_killed(tmp_path):
    cluster = Cluster(REPO_ROOT / "examples" / "cluster.cfg", rundir=str(tmp_path))
    quick = [sys.executable, "-c", "print('done')"]
    stuck = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    results = cluster.run_together([(1, quick), (1, stuck)], timeout=15)
    assert results[0].returncode == 0 and results[0].stdout == "done\n"
    assert results[1].returncode < 0 and results[1].stdout == "started\n"


def test_a_program_that_cannot_start_stops_the_others(tmp_path):
    cluster = Cluster(REPO_ROOT / "examples" / "cluster.cfg", rundir=str(tmp_path))
    before = {p.pid for p in psutil.Process().children()}
    long = [sys.executable, "-c", "import time; time.sleep(120)"]
    with pytest.raises(FileNotFoundError):
        cluster.run_together([(1, long), (1, [str(tmp_path / "no-such-program")])], timeout=15)
    assert {p.pid for p in psutil.Process().children()} == before
