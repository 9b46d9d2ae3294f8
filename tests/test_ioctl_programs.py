"""The DVS programs on the kernel backend: `KernelDvk` driving an emulated node through the
emulator's ioctl-level device (`--dvk emu-ioctl` / `DVK_MODE=emu-ioctl`).

The servers run as programs with DVK_MODE=emu-ioctl; the clients run in this process on a
`KernelDvk` whose device counts the requests it carries, so the test sees that every call went
through the ioctl path.  The latency figures of both backends are printed (no thresholds).
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from dvk_cffi import open_dvk
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.emu.ioctl import EmuDevice
from dvk_cffi.kernel import DVK_SENDREC, DVK_VCOPY, REQUESTS, KernelDvk
from dvk_cffi.wire import Message
from dvs_apps import latency, m3ftp

IOCTL = {"DVK_MODE": "emu-ioctl"}
AVG_RE = re.compile(r"Total average latency in (\d+) loops: ([0-9.]+) \[s\]")
LOOP_RE = re.compile(r"Time total elapsed in loop (\d+): ")


def counting_kernel_dvk(nodeid: int) -> tuple[KernelDvk, collections.Counter]:
    """A KernelDvk over an EmuDevice whose ioctl counts the requests it decodes."""
    device = EmuDevice(nodeid=nodeid)
    seen: collections.Counter = collections.Counter()
    real = device.ioctl

    def ioctl(fd: int, request: int, arg: int) -> int:
        seen[request] += 1
        return real(fd, request, arg)
    device.ioctl = ioctl
    return KernelDvk(device=device), seen


def on_new_thread(fn, *args):
    """`fn(*args)` in a thread of its own, i.e. a new task to the node kernel.  Each client here
    opens its own DVK connection; run from one thread after another connection of that thread
    was closed, the node kernel could still be tearing down the old connection's task (the
    same TID) while the new one binds."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=600)


def average(text: str, loops: int) -> float:
    assert [int(i) for i in LOOP_RE.findall(text)] == list(range(loops)), text[-500:]
    m = AVG_RE.search(text)
    assert m and int(m.group(1)) == loops, text[-500:]
    return float(m.group(2))


def test_open_dvk_emu_ioctl_is_the_kernel_backend(start_node, monkeypatch):
    start_node(1)
    monkeypatch.setenv("DVK_NODE", "1")
    dvk = open_dvk("emu-ioctl")
    try:
        assert isinstance(dvk, KernelDvk) and dvk.backend == "kernel" and dvk.emulated
        assert dvk.proxy_capable                  # the i386 layout: get2rmt/put2lcl allowed
        assert type(dvk.message()) is Message     # 36 bytes, as on an i386 node
        nodeid, dvs = dvk.getdvsinfo()
        assert nodeid == 1 and dvs.d_nr_procs == 221
        assert "node1" in dvk.proc_text("nodes")
    finally:
        dvk.close()
    with pytest.raises(ValueError, match="emu-ioctl"):
        open_dvk("emu-ioct")


def test_latency_client_and_server_on_the_ioctl_path(start_node, apps):
    start_node(1)
    ioctl_server = apps.spawn("latency", "server", 0, 10, env=IOCTL)
    plain_server = apps.spawn("latency", "server", 0, 11, env={"DVK_MODE": "emu"})
    apps.wait_bound(0, 10, proc=ioctl_server, timeout=60)
    apps.wait_bound(0, 11, proc=plain_server, timeout=60)
    loops = 300
    out = io.StringIO()

    def ioctl_client() -> collections.Counter:
        dvk, seen = counting_kernel_dvk(1)
        try:
            assert latency.run_client(dvk, 0, 50, 10, loops, 0, 0, out) == 0
        finally:
            dvk.close()
        return seen
    seen = on_new_thread(ioctl_client)
    assert seen[REQUESTS[DVK_SENDREC]] == loops
    ioctl_avg = average(out.getvalue(), loops)
    out = io.StringIO()

    def plain_client() -> None:
        plain = EmuDvk(nodeid=1)
        try:
            assert latency.run_client(plain, 0, 51, 11, loops, 0, 0, out) == 0
        finally:
            plain.close()
    on_new_thread(plain_client)
    plain_avg = average(out.getvalue(), loops)
    print(f"\nlocal latency, {loops} loops: kernel backend over the ioctl device "
          f"{ioctl_avg * 1e6:.0f} us, emulator backend {plain_avg * 1e6:.0f} us")
    # the server program ran on the kernel backend too and ends cleanly on SIGTERM
    assert ioctl_server.poll() is None, apps.output(ioctl_server)
    assert apps.stop(ioctl_server) == 0


def test_m3ftp_put_get_on_the_ioctl_path(start_node, apps, tmp_path):
    """10 MiB each way: the server (a program on emu-ioctl) vcopies into and out of the
    client's buffers, whose 32-bit addresses the client took from its KernelDvk."""
    start_node(1)
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    server = apps.spawn("m3ftp", "server", 0, 20, env={**IOCTL, "M3FTPD_DIR": str(srv_dir)})
    apps.wait_bound(0, 20, proc=server, timeout=60)
    src = tmp_path / "ten.dat"
    data = os.urandom(10 << 20)
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    back = tmp_path / "back.dat"
    out = io.StringIO()
    seen: collections.Counter = collections.Counter()
    def client(op: str, ep: int, local) -> collections.Counter:
        dvk, calls = counting_kernel_dvk(1)
        try:
            assert m3ftp.run_client(dvk, op, 0, ep, 20, "ten-remote.dat", str(local), out) == 0
        finally:
            dvk.close()
        return calls
    for op, ep, local in (("-p", 21, src), ("-g", 22, back)):   # two client programs
        seen += on_new_thread(client, op, ep, local)
    assert out.getvalue().count("verified") == 2, out.getvalue()
    assert hashlib.sha256((srv_dir / "ten-remote.dat").read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert seen[REQUESTS[DVK_SENDREC]] > 10 and seen[REQUESTS[DVK_VCOPY]] == 0  # client side
    print(f"\nm3ftp 10 MiB on the ioctl path: {out.getvalue().splitlines()[0]}")
    assert apps.stop(server) == 0
