"""The concurrent clients of the end-to-end benchmark (bench/e2e.py `concurrent_clients`) run
at the same time, however much they print: every client prints a line per loop, more than a
pipe holds, and none may be held in its writes until the benchmark reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import e2e

#: A client that prints a loop line per loop (far more than a pipe's 64 KiB), then says it is
#: done and waits, at most 20 s, until every other client is done too: clients held one after
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


class _Node:
    """Stands for the cluster: `popen` runs CLIENT with the client's endpoint as its name."""

    def __init__(self, done: Path, count: int, loops: int) -> None:
        self.args = [str(done), str(count), str(loops)]

    def popen(self, _node: int, argv: list[str], **kw) -> subprocess.Popen:
        ep = argv[argv.index("client") + 2]
        return subprocess.Popen([sys.executable, "-c", CLIENT, self.args[0], ep, *self.args[1:]],
                                stdin=subprocess.DEVNULL, **kw)


def test_clients_that_print_more_than_a_pipe_holds_run_at_once(tmp_path):
    count, loops = 4, 20_000        # about 0.9 MB of lines per client
    res = e2e.concurrent_clients(_Node(tmp_path, count, loops), 3, 10, count, loops)
    assert res["failed"] == 0, "clients were held until the benchmark read them"
    assert res["clients"] == count
    assert abs(res["p50_us"] - 700) < 1e-6
