"""The DSP daemon between emulated nodes: real node kernels, real dsp_proxy processes, real TCP
on this run's own loopback addresses (issue: the DSP daemon)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import struct
import time

import pytest

from cluster_helpers import (
    Background,
    cluster_from,
    dvsctl,
    start_latency_and_m3ftp,
    wait_bound,
)
from dsp_proxy.cluster import module_argv

PLAIN = """
# three real nodes, no load balancer: plain proxying between every pair
server node1 {{ nodeid 1; rname {{net}}.1; autobind YES; }};
server node2 {{ nodeid 2; rname {{net}}.2; autobind YES; }};
{extra}
"""

TWO = PLAIN.format(extra="").replace("{{", "{").replace("}}", "}")
THREE = PLAIN.format(extra="server node3 {{ nodeid 3; rname {{net}}.3; autobind YES; }};") \
    .replace("{{", "{").replace("}}", "}")

LOOP_RE = re.compile(r"Time total elapsed in loop (\d+): ([0-9.]+)")


def latency(cluster, node, clt_ep, svr_ep, loops, timeout=120):
    res = cluster.run(node, module_argv("dvs_apps.latency", "client", 0, clt_ep, svr_ep,
                                        loops, 0, 0), timeout=timeout)
    return res


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_latency_and_m3ftp_between_two_nodes(tmp_path, bg):
    with cluster_from(TWO, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        srvdir = start_latency_and_m3ftp(cl, b, tmp_path)

        res = latency(cl, 1, 50, 10, 100)
        assert res.returncode == 0, res.stdout + res.stderr
        loops = LOOP_RE.findall(res.stdout)
        assert [int(i) for i, _ in loops] == list(range(100))
        assert "Total average latency in 100 loops" in res.stdout
        assert "ERROR" not in res.stdout + res.stderr

        src = tmp_path / "put10M.dat"
        src.write_bytes(os.urandom(10 << 20))
        put = cl.run(1, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, "remote10M.dat",
                                    str(src)), timeout=180)
        assert put.returncode == 0, put.stdout + put.stderr
        assert sha(srvdir / "remote10M.dat") == sha(src)
        back = tmp_path / "get10M.dat"
        get = cl.run(1, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, "remote10M.dat",
                                    str(back)), timeout=180)
        assert get.returncode == 0, get.stdout + get.stderr
        assert "verified" in get.stdout
        assert sha(back) == sha(src)


def test_three_nodes_every_pair_talks(tmp_path, bg):
    with cluster_from(THREE, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        for n in (1, 2, 3):
            b.start(n, "dvs_apps.latency", "server", 0, 10 + n)
        for n in (1, 2, 3):
            wait_bound(cl, n, 0, 10 + n)
        clients = []
        for a in (1, 2, 3):
            for s in (1, 2, 3):
                if a == s:
                    continue
                dvsctl(cl, a, "rmtbind", 0, 10 + s, s, f"lat{s}")
        for a in (1, 2, 3):
            for s in (1, 2, 3):
                if a != s:
                    ep = 40 + 3 * a + s
                    clients.append((a, s, cl.popen(a, module_argv(
                        "dvs_apps.latency", "client", 0, ep, 10 + s, 30, 0, 0),
                        stdout=__import__("subprocess").PIPE, text=True)))
        for a, s, proc in clients:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"{a}->{s}: {out}"
            assert len(LOOP_RE.findall(out)) == 30
        state = cl.link_state()
        assert all(state.values()), state


def test_dsp_killed_peers_get_errors_and_links_come_back(tmp_path, bg):
    with cluster_from(TWO, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        # a server that takes 3 s per request, so the client is blocked when the link drops
        server = b.start(2, "dvs_apps.latency", "server", 0, 10)
        wait_bound(cl, 2, 0, 10)
        dvsctl(cl, 1, "rmtbind", 0, 10, 2, "latency")
        slow = cl.popen(1, module_argv("dvs_apps.latency", "client", 0, 50, 10, 1, 0, 3),
                        stdout=__import__("subprocess").PIPE,
                        stderr=__import__("subprocess").STDOUT, text=True)
        time.sleep(1.0)
        t0 = time.monotonic()
        cl.kill_dsp(2, signal.SIGKILL)
        out, _ = slow.communicate(timeout=20)
        waited = time.monotonic() - t0
        assert "EDVSNOTCONN" in out, out
        assert waited < 10, f"the blocked caller waited {waited:.1f} s"
        state = cl.link_state()
        assert not state[(1, 2)]
        cl.start_dsp(2)
        cl.wait_links_up(30)
        # latency_server, like the C one, exits when its reply fails (the link was gone)
        server.wait(10)
        b.start(2, "dvs_apps.latency", "server", 0, 10)
        wait_bound(cl, 2, 0, 10)
        res = latency(cl, 1, 51, 10, 20)
        assert res.returncode == 0, res.stdout + res.stderr
        assert len(LOOP_RE.findall(res.stdout)) == 20


def _node_addr(cl, n):
    return f"{cl.net}.{n}"


def test_connection_from_a_stranger_is_refused(tmp_path):
    with cluster_from(TWO, tmp_path) as cl, socket.socket() as s:
        # node 1's RPROXY for node 2 listens on node1:3002; connect from another address
        s.bind((f"{cl.net}.77", 0))
        s.settimeout(5)
        s.connect((_node_addr(cl, 1), 3002))
        assert s.recv(1) == b""  # closed by the DSP at once
        log = (tmp_path / "logs" / "dsp1.log").read_text()
        assert "refused a connection from" in log
        assert all(cl.link_state().values())


@pytest.mark.parametrize("junk, reason", [
    (struct.pack("<10i", 999, 0, 0, 0, 2, 1, 0, 0, 0, 0) + bytes(80), "unknown command"),
    (struct.pack("<10i", 1, 0, 50, 10, 2, 1, 0, 70000, 0, 0) + bytes(80), "c_len 70000"),
    (bytes(57), "closed the connection inside a frame"),
])
def test_garbage_frames_close_only_that_link(tmp_path, junk, reason):
    with cluster_from(THREE, tmp_path) as cl, contextlib.ExitStack() as sockets:
        # pose as node 2 towards node 1: node 2's DSP must be gone first
        cl.kill_dsp(2, signal.SIGKILL)
        cl.wait_links_up(30, pairs=[(1, 3), (3, 1)])
        listener = sockets.enter_context(socket.socket())
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_node_addr(cl, 2), 3001))  # node 1's SPROXY connects here
        listener.listen(1)
        listener.settimeout(10)
        back, _ = listener.accept()
        sockets.enter_context(back)
        out = sockets.enter_context(socket.socket())
        out.bind((_node_addr(cl, 2), 0))
        out.connect((_node_addr(cl, 1), 3002))
        deadline = time.monotonic() + 10
        while not cl.link_state()[(1, 2)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cl.link_state()[(1, 2)]
        out.sendall(junk)
        if reason.startswith("closed"):
            out.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 10
        while cl.link_state()[(1, 2)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not cl.link_state()[(1, 2)]
        log = (tmp_path / "logs" / "dsp1.log").read_text()
        assert reason in log
        assert cl.link_state()[(1, 3)] and cl.link_state()[(3, 1)]


# The C header, written only from the i386 layout table (docs/design.md, "The wire"), not the codec:
# 10 ints, 3 unsigned, timespec (2 ints), message (m_source, m_type, m1_i1..3, m1_p1..3 + 4
# spare bytes), vcopy (3 ints, 2 pointers, 1 int).
C_HEADER = struct.Struct("<iiiiiiiiii III ii ii iii III 4x iii II i")
assert C_HEADER.size == 120


def c_frame(cmd, src, dst, snode, dnode, m_type=0, m1_i1=0, rcode=0, pid=4242):
    return C_HEADER.pack(cmd, 0, src, dst, snode, dnode, rcode, 0, pid, 0, 0, 0, 0, 0, 0,
                         src, m_type, m1_i1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def read_frame(sock):
    buf = b""
    while len(buf) < 120:
        chunk = sock.recv(120 - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return C_HEADER.unpack(buf)


def test_c_header_peer_talks_to_a_running_dsp(tmp_path, bg):
    with cluster_from(TWO, tmp_path) as cl:
        b = Background(cl, tmp_path)
        bg.append(b)
        b.start(1, "dvs_apps.latency", "server", 0, 10)
        wait_bound(cl, 1, 0, 10)
        cl.kill_dsp(2, signal.SIGKILL)  # the test becomes node 2
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((_node_addr(cl, 2), 3001))
        listener.listen(1)
        listener.settimeout(10)
        back, _ = listener.accept()
        back.settimeout(10)
        out = socket.socket()
        out.bind((_node_addr(cl, 2), 0))
        out.connect((_node_addr(cl, 1), 3002))
        cl.wait_links_up(10, pairs=[(1, 2)])
        # SNDREC from client 50@2 to the latency server 10@1 (autobind binds 50 to node 2)
        out.sendall(c_frame(3, 50, 10, 2, 1, m_type=0x0A, m1_i1=7))
        while True:
            f = read_frame(back)
            if f[0] != 0:  # skip HELLOs / load reports
                break
        (cmd, dcid, src, dst, snode, dnode, rcode, clen) = f[:8]
        assert (cmd, dcid, src, dst, snode, dnode, clen) == (1, 0, 10, 50, 1, 2, 0)
        m_source, m_type, m1_i1 = f[15], f[16], f[17]
        assert (m_source, m_type, m1_i1) == (10, 0x0B, 7)
        # acknowledge the server's send, as node 2's kernel would
        out.sendall(c_frame(0x2001, 50, 10, 2, 1))
        time.sleep(0.5)
        procs = dvsctl(cl, 1, "procs").stdout
        assert re.search(r"^\s*0\s+50\s+50\s+-1/-1\s+2\s+1000\b", procs, re.M), procs
        for s in (out, back, listener):
            s.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_daemon_cleanly(tmp_path, sig):
    with cluster_from(TWO, tmp_path) as cl:
        proc = cl.dsps[2]
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        took = time.monotonic() - t0
        assert took < 2.0, f"stopping took {took:.2f} s"
        cl.killed.add(2)
        # its proxies are unbound: node 2's kernel no longer knows a pair for node 1
        assert cl.dvk(2).getnodeinfo(1).n_flags == 0
        log = (tmp_path / "logs" / "dsp2.log").read_text()
        assert "DSP of node 2 stopped" in log
