"""The load-balancer cluster of test_lb.py with every DSP and program on the kernel backend:
`dsp_proxy --dvk emu-ioctl` and DVK_MODE=emu-ioctl, i.e. `KernelDvk` driving each emulated node
through the emulator's ioctl device.  Latency sessions spread over both servers and a 10 MiB
m3ftp PUT and GET go through the LB node, as on the emulator backend.

The same scenario runs on the plain emulator backend too, so that the latency figures of both
are printed side by side (no thresholds).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
from test_lb import LOOP_RE, lb_config, server_messages, start_servers

from cluster_helpers import Background, cluster_from
from dsp_proxy.cluster import module_argv

LOOPS = 40
RESULTS: dict[str, float] = {}


def run_to_end(cl, node: int, argv: list[str], env: dict[str, str], timeout: float = 180):
    """A program on `node` with `env` added, run to completion (killed after `timeout`)."""
    proc = cl.popen(node, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{argv} still running after {timeout} s: {out}{err}") from None
    return proc.returncode, out, err


@pytest.mark.parametrize("mode", ["emu-ioctl", "emu"])
def test_latency_and_m3ftp_through_the_lb(tmp_path, bg, mode):
    env = {"DVK_MODE": mode}
    with cluster_from(lb_config(), tmp_path, dvk_mode=mode) as cl:
        for n, proc in cl.dsps.items():
            assert proc.args[proc.args.index("--dvk") + 1] == mode
            if mode == "emu-ioctl":
                log = (tmp_path / "logs" / f"dsp{n}.log").read_text()
                assert "the kernel backend, through the emulated node's ioctl device" in log
        b = Background(cl, tmp_path)
        bg.append(b)
        start_servers(cl, b, env=env)
        shared = tmp_path / "export"   # both m3ftp servers serve one directory
        shared.mkdir()
        start_servers(cl, b, ep=20, module="dvs_apps.m3ftp",
                      env={**env, "M3FTPD_DIR": str(shared)})
        # latency: two clients on each client node, sessions spread over both servers
        procs = [(n, ep, cl.popen(n, module_argv("dvs_apps.latency", "client", 0, ep, 10, LOOPS,
                                                 0, 0), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
                 for n, ep in ((3, 50), (3, 51), (4, 52), (4, 53))]
        times = []
        for n, ep, p in procs:
            try:
                out, _ = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            assert p.returncode == 0, f"client {ep}@{n}: {out}"
            loops = LOOP_RE.findall(out)
            assert [int(i) for i, _ in loops] == list(range(LOOPS))
            times += [float(t) for _, t in loops]
        deadline = time.monotonic() + 10
        spread = {}
        while time.monotonic() < deadline:
            spread = {1: 0, 2: 0}
            for n in (3, 4):
                for srv, count in server_messages(cl, n).items():
                    spread[srv] += count
            if min(spread.values()) > 0:
                break
            time.sleep(0.2)
        assert min(spread.values()) > 0, spread
        levels = {srv: v["level"] for srv, v in cl.status(3)["group"]["servers"].items()}
        # m3ftp: PUT from node 3, GET from node 4, through the LB node
        src = tmp_path / "data10M"
        src.write_bytes(os.urandom(10 << 20))
        rc, out, err = run_to_end(cl, 3, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, "f10M",
                                                     str(src)), env)
        assert rc == 0 and "verified" in out, out + err
        put_line = out.splitlines()[0]
        back = tmp_path / "back10M"
        rc, out, err = run_to_end(cl, 4, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, "f10M",
                                                     str(back)), env)
        assert rc == 0 and "verified" in out, out + err
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
        assert hashlib.sha256((shared / "f10M").read_bytes()).hexdigest() == digest
    times.sort()
    RESULTS[mode] = sum(times) / len(times)
    print(f"\n{mode}: latency through the LB, {len(times)} round trips: average "
          f"{RESULTS[mode] * 1e6:.0f} us, median {times[len(times) // 2] * 1e6:.0f} us; "
          f"m3ftp {put_line.split(': ', 1)[1]}; server load levels seen by node 3 {levels}")
    if len(RESULTS) == 2:
        print("latency through the LB: " + ", ".join(f"{m} {v * 1e6:.0f} us"
                                                      for m, v in RESULTS.items()))
