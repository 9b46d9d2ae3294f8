"""The anchor of the local sendrec target: a raw Unix-socket ping-pong between two Python
processes, the least a round trip between two processes costs in Python on this machine.

    python -m bench.unix_pingpong [SECONDS]

`run(seconds)` starts a child process on one end of a socketpair that echoes every 120-byte
message (the size of a DVS header), times each round trip from the parent for `seconds`
(bounded also by a round count), and returns the figures.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from .figures import p50_p99_us

SIZE = 120
MAX_ROUNDS = 200_000

_ECHO = r"""
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
n = int(sys.argv[2])
while True:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    s.sendall(buf)
"""


def run(seconds: float = 1.0) -> dict:
    """Round trips of SIZE bytes for `seconds`: rounds, round trips/s, p50 and p99 in µs."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(child.fileno()), str(SIZE)],
                            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
    child.close()
    msg = b"x" * SIZE
    rtts: list[float] = []
    try:
        for _ in range(50):                      # warm-up: the child is running and cached
            parent.sendall(msg)
            _recv(parent, SIZE)
        clock = time.perf_counter
        end = clock() + seconds
        while len(rtts) < MAX_ROUNDS:
            t0 = clock()
            parent.sendall(msg)
            _recv(parent, SIZE)
            t1 = clock()
            rtts.append(t1 - t0)
            if t1 >= end:
                break
    finally:
        parent.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"rounds": len(rtts), "rt_per_s": len(rtts) / sum(rtts), **p50_p99_us(rtts)}


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the echo process ended")
        buf += chunk
    return buf


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
    os._exit(0)
