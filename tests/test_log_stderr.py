"""The default log, stderr, when nobody reads it: a pipe whose reader hangs, a stalled journald,
a terminal held by Ctrl-S.  The daemon must go on and lose lines (counted), never wait for
the reader: before, the first thread to log into the full pipe blocked holding the handler's
lock, and every thread that logged after it stopped (links, main loop, SIGTERM)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import threading

from cluster_helpers import cluster_from, wait_for
from dsp_proxy.cluster import python_env
from dvk_cffi import open_dvk
from dvk_cffi.emu import node as emunode
from dvk_cffi.emu.server import socket_path
from fuzz.harness import Probes

CONFIG = """
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
"""


def fill(fd: int) -> int:
    """Write into the pipe `fd` until it has no room left; the bytes written."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    n = 0
    try:
        while True:
            n += os.write(fd, b"x" * 4096)
    except BlockingIOError:
        return n
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def test_a_dsp_whose_stderr_is_not_read_keeps_its_links_and_stops_on_sigterm(tmp_path):
    with cluster_from(CONFIG, tmp_path) as cl:
        cl.kill_dsp(2, signal.SIGTERM)
        r, w = os.pipe()
        drained = bytearray()
        drainer = threading.Thread(target=lambda: [drained.extend(chunk) for chunk in
                                                   iter(lambda: os.read(r, 65536), b"")],
                                   daemon=True)
        probes = Probes(cl, [1, 2], tmp_path)
        try:
            prefilled = fill(w)
            assert prefilled > 0
            dsp = cl.start_dsp(2, output=w)     # its first line finds the pipe full
            os.close(w)
            w = -1
            cl.wait_links_up(20)
            probes.start()
            took, last = probes.all_links(20)
            assert took is not None, f"no request over the links: {last}"
            drainer.start()                     # the reader reads again
            wait_for(lambda: len(drained) >= prefilled, timeout=10, what="the pipe drained")
            cl.kill_dsp(2, signal.SIGTERM)      # waits at most 10 s
            assert dsp.returncode == 0
            drainer.join(10)
            text = drained.decode(errors="replace")
            assert "node2 MainThread: signal SIGTERM: stopping" in text, text[-2000:]
            assert "log lines were lost while stderr could not take them" in text, text[-2000:]
        finally:
            probes.close()
            if w >= 0:
                os.close(w)
            if drainer.ident is None:
                drainer.start()                 # a DSP still writing is not left blocked
            cl.kill_dsp(2)
            drainer.join(10)
            os.close(r)


def test_a_node_kernel_whose_stderr_is_not_read_serves_and_stops_on_sigterm(tmp_path):
    """`dvsctl node run` logs to stderr too: a node kernel whose first line found the pipe
    full served nobody (every process of its node waited)."""
    rundir = str(tmp_path / "dvk")
    r, w = os.pipe()
    proc = None
    try:
        assert fill(w) > 0
        proc = subprocess.Popen(emunode.node_command(7), stdout=w, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=python_env({"DVK_RUNDIR": rundir}))
        os.close(w)
        w = -1
        emunode.wait_for_socket(socket_path(7, rundir), proc=proc)
        dvk = open_dvk("emu", path=socket_path(7, rundir))
        try:
            assert dvk.getdvsinfo()[0] == 7
        finally:
            dvk.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if w >= 0:
            os.close(w)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
