"""Sendrec on one emulated node, no DSP: `latency_client` and `latency_server` attached to the
same node kernel, the cost the emulator alone adds to every DVS call.

    python -m bench.local_sendrec [LOOPS]

`run(loops)` starts a node kernel in a private run directory, the latency server on endpoint
10 and the client on endpoint 50 (`latency_client 0 50 10 LOOPS 0 0`), and returns the p50 and
p99 of the client's per-loop times in µs and its message rate; everything is stopped after.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time

from dsp_proxy.cluster import module_argv, python_env
from dvk_cffi.emu import node as emunode
from dvs_apps.latency import loop_times, throughput

from .figures import p50_p99_us

NODE = 1


def run(loops: int = 2000) -> dict:
    rundir = tempfile.mkdtemp(prefix="dvk")
    env = python_env({"DVK_RUNDIR": rundir, "DVK_NODE": str(NODE), "DVK_MODE": "emu"})
    kernel = emunode.start_node(NODE, rundir, env=python_env())
    server = None
    try:
        server = subprocess.Popen(module_argv("dvs_apps.latency", "server", 0, 10), env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        _wait_bound(rundir, 10, server)
        res = subprocess.run(module_argv("dvs_apps.latency", "client", 0, 50, 10, loops, 0, 0),
                             env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=300)
        times = loop_times(res.stdout)
        if res.returncode != 0 or not times:
            raise RuntimeError(f"latency_client on one node: {res.stdout[-500:]}"
                               f"{res.stderr[-500:]}")
        return {"loops": len(times), **p50_p99_us(times),
                "msgs_per_s": throughput(res.stdout) or 0.0}
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        emunode.stop_node(kernel)
        shutil.rmtree(rundir, ignore_errors=True)


def _wait_bound(rundir: str, ep: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    from dvk_cffi.emu.client import EmuDvk
    from dvk_cffi.emu.server import socket_path
    dvk = EmuDvk(path=socket_path(NODE, rundir))
    try:
        deadline = time.monotonic() + timeout
        while dvk.getprocinfo(0, ep).p_rts_flags & 0x1:        # SLOT_FREE
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latency_server did not bind endpoint {ep}")
            time.sleep(0.02)
    finally:
        dvk.close()


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)))
