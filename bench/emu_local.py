"""Local sendrec on one emulated node against a raw Unix-socket ping-pong.

    python -m bench.emu_local [SECONDS]

Starts a node kernel process (DVS node 1, DC0) in a temporary run directory and the real
`latency_server` (dvs_apps.latency) bound to endpoint 10 in its own process; this process binds
a user endpoint and times `sendrec` round trips to it, as `latency_client` does.  The anchor is
the same number of round trips of a 64-byte message over a Unix stream socket between this
process and a Python echo process.  It prints p50/p99 of both and the ratio of the p50s.
Both loops are bounded in count and time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from dvk_cffi import consts as C
from dvk_cffi.emu import node as emu_node
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.node import wait_for_socket
from dvk_cffi.emu.server import socket_path
from dvk_cffi.wire import Message
from dvs_apps.latency import p50_p99

NODE, DC0, SERVER_EP, CLIENT_EP = 1, 0, 10, 40
MAX_ROUNDS = 200_000
WARMUP = 300

_ECHO = ("import socket, sys\n"
         "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
         "s.connect(sys.argv[1])\n"
         "while True:\n"
         "    d = s.recv(4096)\n"
         "    if not d:\n"
         "        break\n"
         "    s.sendall(d)\n")


def _percentiles(samples: list[int]) -> dict:
    """p50 and p99 in µs of round-trip times in ns."""
    p50, p99 = p50_p99(samples)
    return {"p50_us": p50 / 1000.0, "p99_us": p99 / 1000.0, "rounds": len(samples)}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(step, seconds: float) -> list[int]:
    for _ in range(WARMUP):
        step()
    out: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    while len(out) < MAX_ROUNDS:
        t0 = clock()
        step()
        t1 = clock()
        out.append(t1 - t0)
        if t1 > end:
            break
    return out


def raw_pingpong(tmp: str, seconds: float) -> dict:
    """Round trips of 64 bytes between this process and a Python echo process."""
    path = os.path.join(tmp, "raw.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, path])
    try:
        ls.settimeout(20)
        conn, _ = ls.accept()
        payload = bytes(64)

        def step():
            conn.sendall(payload)
            got = 0
            while got < 64:
                got += len(conn.recv(4096))

        cpu0 = time.process_time()
        samples = _timed(step, seconds)
        cpu = (time.process_time() - cpu0) * 1e6 / (len(samples) + WARMUP)
        conn.close()
    finally:
        ls.close()
        echo.terminate()
        echo.wait(10)
    res = _percentiles(samples)
    res["cpu_us_per_round"] = {"client": cpu}
    return res


def emu_sendrec(tmp: str, seconds: float) -> dict:
    """sendrec round trips to latency_server on one emulated node."""
    env = dict(os.environ, DVK_RUNDIR=tmp, DVK_MODE="emu")
    path = socket_path(NODE, tmp)
    node = emu_node.start_node(NODE, rundir=tmp, env=env)
    server = None
    dvk = None
    try:
        env["DVK_SOCKET"] = path
        server = subprocess.Popen([sys.executable, "-m", "dvs_apps.latency", "server",
                                   str(DC0), str(SERVER_EP)], env=env,
                                  stdout=subprocess.DEVNULL)
        wait_for_socket(path)
        dvk = EmuDvk(path=path)
        deadline = time.monotonic() + 20
        while dvk.getprocinfo(DC0, SERVER_EP).p_rts_flags & C.SLOT_FREE:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("latency_server did not bind")
            time.sleep(0.02)
        dvk.bind(DC0, CLIENT_EP)
        m = Message()

        def step():
            m.m_type = 0x0A
            dvk.sendrec(SERVER_EP, m)

        cpu0 = {"kernel": _cpu_s(node.pid), "server": _cpu_s(server.pid),
                "client": time.process_time()}
        samples = _timed(step, seconds)
        cpu1 = {"kernel": _cpu_s(node.pid), "server": _cpu_s(server.pid),
                "client": time.process_time()}
    finally:
        if dvk is not None:
            dvk.close()
        if server is not None:
            server.terminate()
            server.wait(10)
        emu_node.stop_node(node)
    res = _percentiles(samples)
    rounds = len(samples) + WARMUP
    res["cpu_us_per_round"] = {k: (cpu1[k] - cpu0[k]) * 1e6 / rounds for k in cpu0}
    return res


def run(seconds: float = 6.0) -> dict:
    """Both measurements, `seconds` in all; ratio = emulated sendrec p50 / raw p50."""
    tmp = tempfile.mkdtemp(prefix="emu-bench-", dir="/tmp")
    try:
        raw = raw_pingpong(tmp, seconds / 2)
        emu = emu_sendrec(tmp, seconds / 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"raw": raw, "emu": emu, "ratio_p50": emu["p50_us"] / raw["p50_us"],
            "target_ratio": 4.0}


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 6.0
    res = run(seconds)
    raw, emu = res["raw"], res["emu"]
    print(f"raw Unix-socket ping-pong  p50 {raw['p50_us']:8.1f} us  p99 {raw['p99_us']:8.1f} us"
          f"  ({raw['rounds']} round trips, CPU {raw['cpu_us_per_round']['client']:.1f} us"
          f" per round trip on this side)")
    print(f"emulated local sendrec     p50 {emu['p50_us']:8.1f} us  p99 {emu['p99_us']:8.1f} us"
          f"  ({emu['rounds']} round trips)")
    cpu = emu["cpu_us_per_round"]
    print("CPU per sendrec round trip: " + ", ".join(f"{k} {v:.1f} us" for k, v in cpu.items()))
    verdict = "PASS" if res["ratio_p50"] <= res["target_ratio"] else "FAIL"
    print(f"ratio p50 {res['ratio_p50']:.2f} (target <= {res['target_ratio']:.0f}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
