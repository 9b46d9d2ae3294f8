"""A Python DSP beside a C DSP: liveness that fits the peer, stale HELLO bodies (issue: drop-in
for real).

The C side is `c_peer.CPeer`: the proxy pair of emulated node 3 for node 1, behaving as the C
daemon does on the wire (HELLO only after 30 s without traffic, HELLO bodies left over from the
previous command, no reconnection after a close).  Node 1 runs the real `dsp_proxy`.  The C
sender leaves from 127.0.0.1 (it binds no source address), so node 1's DSP runs with
`--allow-any-peer`: the address rules have their own tests (test_addresses.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from c_peer import CPeer

from cluster_helpers import Background, cluster_from, wait_bound, wait_for
from dsp_proxy import topology
from dsp_proxy.cluster import module_argv
from dsp_proxy.elastic import MT_SVC_START, MT_SVC_STOP
from dsp_proxy.group import MT_LOAD_REPORT
from dsp_proxy.main import MT_NEED_SERVER
from dvk_cffi import consts as C
from dvk_cffi.emu.server import socket_path
from dvk_cffi.wire import HEADER_SIZE, Header, hello_header, make_header

FD_INTERVAL_MS, FD_FALL = 500, 3

INTEROP = """
lb node0 {{ nodeid 0; period 30; lowwater 90; highwater 100; min_servers 1; max_servers 3;
           svrname node1; vm_start "{tmp}/vm.sh"; vm_stop "{tmp}/vm.sh";
           vm_status "{tmp}/vm.sh"; fd_interval {fdi}; fd_fall {fdf}; }};
server node1 {{ nodeid 1; rname {{net}}.1; autobind YES; }};
server node3 {{ nodeid 3; rname {{net}}.3; }};
server node4 {{ nodeid 4; rname {{net}}.4; node_image "img4"; }};
service spy {{ dcid 0; ext_ep 20; min_ep 20; max_ep 21; bind replica; prog "{tmp}/spy.sh"; }};
"""

TWO_DSPS = f"""
lb node0 {{ nodeid 0; fd_interval {FD_INTERVAL_MS}; fd_fall {FD_FALL}; }};
server node1 {{ nodeid 1; rname {{net}}.1; }};
server node2 {{ nodeid 2; rname {{net}}.2; }};
""".replace("{{", "{").replace("}}", "}")

#: A program on node 3 bound to endpoint 3 (so m_source is the C peer's node id, as a real load
#: report's is): each stdin line "m_type field=value ..." is sent to endpoint 14 on node 1.
STALE_SENDER = r"""
import sys
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.wire import Message
d = EmuDvk()
d.bind(0, 3)
print("READY", flush=True)
for line in sys.stdin:
    words = line.split()
    m = Message()
    m.m_type = int(words[0], 0)
    for w in words[1:]:
        k, v = w.split("=")
        setattr(m, k, int(v, 0))
    d.send(14, m)
    print("SENT", flush=True)
"""

#: The receiver of those messages on node 1.
SINK = r"""
from dvk_cffi import consts as C
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.errors import EDVSTIMEDOUT, DvkError
from dvk_cffi.wire import Message
d = EmuDvk()
d.bind(0, 14)
m = Message()
while True:
    try:
        d.receive(C.ANY, m, 30000)
    except DvkError as e:
        if e.code != EDVSTIMEDOUT:
            raise
"""

#: Stale bodies that would pass for the Python DSP's own control frames and load reports.
STALE_BODIES = [
    (MT_LOAD_REPORT, f"m1_i1=97 m1_i2={C.LVL_SATURATED} m1_i3=30 m1_p1=4242"),
    (MT_SVC_START, "m1_i1=0 m1_i2=52 m1_i3=3 m1_p1=20 m1_p2=7"),
    (MT_SVC_STOP, "m1_i1=0 m1_i2=20 m1_p1=20"),
    (MT_NEED_SERVER, ""),
    (MT_SVC_START | C.MT_ACKNOWLEDGE, "m1_i1=20 m1_p2=7"),
]


def interop_config(tmp: Path) -> str:
    for name in ("vm.sh", "spy.sh"):
        script = tmp / name
        script.write_text(f'#!/bin/sh\necho "$@" >> "{tmp}/{name}.ran"\n')
        script.chmod(0o755)
    return INTEROP.format(tmp=tmp, fdi=FD_INTERVAL_MS, fdf=FD_FALL) \
        .replace("{{", "{").replace("}}", "}")


class StaleSender:
    """The STALE_SENDER program, fed line by line."""

    def __init__(self, cl) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", STALE_SENDER], env=cl.env(3),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout.readline().strip() == "READY", self._rest()

    def send(self, m_type: int, fields: str) -> None:
        self.proc.stdin.write(f"{m_type:#x} {fields}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "SENT", self._rest()

    def _rest(self) -> str:
        self.close()
        return self.proc.stdout.read() if self.proc.stdout else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def c_node(tmp_path, bg):
    """Node 1 with its Python DSP, node 3 with the C-like peer, the programs' endpoints bound
    as the C operator binds them; yields (cluster, cpeer, background, stale sender)."""
    stops = []
    with cluster_from(interop_config(tmp_path), tmp_path, only=[1],
                      dsp_args=["--allow-any-peer"]) as cl:
        try:
            cl.start_kernel(3)
            spec = next(s for s in topology.peer_specs(cl.cfg, 1) if s.nodeid == 3)
            peer = CPeer(socket_path(3, cl.rundir), 1, "node1", f"{cl.net}.1",
                         sport=spec.rport, rport=spec.sport, listen_host=f"{cl.net}.3")
            stops.append(peer.stop)
            peer.start()
            n1, n3 = cl.dvk(1), cl.dvk(3)
            n3.add_node(0, 1)                 # the C operator's test_add_node
            wait_link(cl, peer, 30)
            # fd_interval x fd_fall after link-up without an announcing HELLO: a C server
            wait_for(lambda: (((cl.status(1).get("group") or {}).get("servers") or {})
                              .get("3") or {}).get("live"), 10, "node 3 counted as running")
            for ep, name in ((12, "latsrv3"), (53, "latclt3"), (3, "stale3")):
                n1.rmtbind(0, name, ep, 3)
            for ep, name in ((13, "latsrv1"), (52, "latclt1"), (14, "sink1")):
                n3.rmtbind(0, name, ep, 1)
            b = Background(cl, tmp_path)
            bg.append(b)
            b.start(3, "dvs_apps.latency", "server", 0, 12)
            b.start(1, "dvs_apps.latency", "server", 0, 13)
            wait_bound(cl, 3, 0, 12)
            wait_bound(cl, 1, 0, 13)
            sink_proc = subprocess.Popen([sys.executable, "-c", SINK], env=cl.env(1),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            stops.append(lambda: (sink_proc.kill(), sink_proc.wait(10)))
            wait_bound(cl, 1, 0, 14)
            sender = StaleSender(cl)
            stops.append(sender.close)
            yield cl, peer, b, sender
        finally:
            for stop in reversed(stops):
                stop()


def link_up(cl, peer: CPeer) -> bool:
    flags = cl.dvk(1).getnodeinfo(3).n_flags
    both = C.NODE_SCONNECTED | C.NODE_RCONNECTED
    return flags & both == both and peer.connected


def wait_link(cl, peer: CPeer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not link_up(cl, peer):
        if time.monotonic() > deadline:
            raise AssertionError(f"link 1-3 not up after {timeout} s; C peer: connects "
                                 f"{peer.connects}, accepts {peer.accepts}, "
                                 f"disconnects {peer.disconnects}, error {peer.error}")
        time.sleep(0.1)


def latency_both_ways(cl, loops: int = 20) -> None:
    for node, clt, srv in ((1, 52, 12), (3, 53, 13)):
        res = cl.run(node, module_argv("dvs_apps.latency", "client", 0, clt, srv, loops, 0, 0),
                     timeout=60)
        assert res.returncode == 0, f"latency from node {node}:\n{res.stdout}{res.stderr}"
        assert f"Total average latency in {loops} loops" in res.stdout, res.stdout


def link3(cl) -> dict:
    return ((cl.status(1).get("links") or {}).get("3")) or {}


def lb_view(cl) -> dict:
    """What a stale HELLO must not change: sessions, the servers' load, autoscaler actions."""
    group = cl.status(1).get("group") or {}
    servers = {n: {k: s[k] for k in ("cpu", "level", "live", "activity")}
               for n, s in (group.get("servers") or {}).items()}
    auto = {n: {k: v[k] for k in ("starting", "starts", "stops")}
            for n, v in (cl.status(1).get("autoscaler") or {}).items()}
    return {"sessions": group.get("sessions"), "servers": servers, "autoscaler": auto}


def wait_status(cl, timeout: float = 5.0) -> dict:
    """The next status file after now (the DSP writes it every second)."""
    path = cl.status_path(1)
    since = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_mtime > since + 0.05:
                return cl.status(1)
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the DSP of node 1 stopped writing its status file")


def assert_nothing_started(tmp_path: Path, cl) -> None:
    for name in ("spy.sh", "vm.sh"):
        ran = tmp_path / f"{name}.ran"
        assert not ran.exists(), f"a stale HELLO made the DSP run {name} {ran.read_text()!r}"
    for ep in (20, 21):
        assert cl.dvk(1).getprocinfo(0, ep).p_rts_flags & C.SLOT_FREE, \
            f"endpoint {ep} was bound by a service program"


@pytest.mark.slow
def test_idle_link_to_c_peer_survives_its_hello_cadence(tmp_path, c_node):
    cl, peer, _b, sender = c_node
    latency_both_ways(cl)
    wait_status(cl)
    downs = link3(cl).get("downs")
    assert isinstance(downs, int), f"no link-down count of node 3 in node 1's status: {downs}"
    before = lb_view(cl)
    assert before["servers"] and before["autoscaler"], before  # the view has something to keep
    # the last command node 3 sends before going idle is a message of type MT_SVC_START whose
    # fields name the spy service: every HELLO of the idle time carries it as its body
    sender.send(MT_SVC_START, STALE_BODIES[1][1])
    sent_before = len(peer.hellos_sent)
    deadline = time.monotonic() + 70
    while time.monotonic() < deadline:
        assert link_up(cl, peer), (f"link 1-3 dropped after "
                                   f"{70 - (deadline - time.monotonic()):.1f} s of idleness; "
                                   f"C peer disconnects: {peer.disconnects}")
        assert link3(cl).get("downs") == downs, "node 1's DSP took the link down"
        time.sleep(0.5)
    hellos = peer.hellos_sent[sent_before:]
    assert len(hellos) == 2, f"{len(hellos)} C HELLOs in 70 s idle (one per 30 s expected)"
    assert all(h.c_msg.m_type == MT_SVC_START for h in hellos)
    assert peer.frames_sent and not peer.send_failures
    wait_status(cl)
    assert lb_view(cl) == before
    assert_nothing_started(tmp_path, cl)
    latency_both_ways(cl)
    assert peer.connects == 1 and peer.accepts == 1, peer.disconnects
    assert {h.c_msg.m_type for h in peer.hellos_received}.isdisjoint(
        {C.MT_LOAD_THRESHOLDS, C.MT_RMTBIND}), "a HELLO the C receiver would answer (and hang)"


def test_a_message_the_c_peer_cannot_deliver_costs_only_our_outgoing_connection(tmp_path,
                                                                               c_node):
    """The C receiver drops its connection on any put2lcl error (here: a request to an
    endpoint bound to node 3 on node 1 but to nothing on node 3), and the C sender never
    connects again once its connection is gone.  So the link keeps the C sender's connection,
    connects out again, and carries traffic both ways once more; the C sender's one
    connection is the same all along."""
    from dvk_cffi.errors import DvkError
    from dvk_cffi.wire import Message
    cl, peer, _b, _sender = c_node
    latency_both_ways(cl, 5)
    accepts, connects = peer.accepts, peer.connects
    n1 = cl.dvk(1)
    n1.bind(0, 61)
    n1.rmtbind(0, "ghost3", 60, 3)
    with pytest.raises(DvkError):
        n1.sendrec(60, Message(), 5000)       # an error code, not an endless wait
    deadline = time.monotonic() + 30
    while peer.accepts == accepts:
        assert time.monotonic() < deadline, "node 1 did not connect to the C peer again"
        time.sleep(0.1)
    wait_link(cl, peer, 30)
    latency_both_ways(cl, 5)
    assert peer.connects == connects and not peer.sender_gone.is_set()


def test_a_stray_connection_from_the_c_peers_address_does_not_end_the_link(tmp_path, c_node):
    """A new connection from the C peer's address while the link is up waits aside: the C
    sender's working connection is not closed for it (the C sender would never connect
    again), and it takes over only when the current one is lost."""
    cl, peer, _b, _sender = c_node
    latency_both_ways(cl, 5)
    downs = link3(cl).get("downs")
    spec = next(s for s in topology.peer_specs(cl.cfg, 1) if s.nodeid == 3)
    for _ in range(3):
        stray = socket.create_connection((f"{cl.net}.1", spec.rport), timeout=5,
                                         source_address=(f"{cl.net}.3", 0))
        time.sleep(0.3)
        stray.close()
    time.sleep(0.5)
    assert link_up(cl, peer)
    # the C server still counts as running (not taken for a peer that just came up)
    assert wait_status(cl)["group"]["servers"]["3"]["live"]
    latency_both_ways(cl, 5)
    assert link3(cl).get("downs") == downs and not peer.sender_gone.is_set()


def test_stale_hello_bodies_are_never_control_frames(tmp_path, c_node):
    """Every body the Python DSP could take for its own: the C peer's HELLO period shortened to
    1 s so that each gets its HELLO quickly (the C cadence is the other test's)."""
    cl, peer, _b, sender = c_node
    peer.hello_period_ms = 1000
    latency_both_ways(cl, loops=5)
    wait_status(cl)
    before = lb_view(cl)
    assert before["servers"] and before["autoscaler"], before  # the view has something to keep
    downs = link3(cl).get("downs")
    assert isinstance(downs, int), f"no link-down count of node 3 in node 1's status: {downs}"
    for m_type, fields in STALE_BODIES:
        n = len(peer.hellos_sent)
        sender.send(m_type, fields)
        deadline = time.monotonic() + 10
        while not any(h.c_msg.m_type == m_type for h in peer.hellos_sent[n:]):
            assert time.monotonic() < deadline, f"no C HELLO with body type {m_type:#x}"
            time.sleep(0.05)
    time.sleep(2)        # room for anything the DSP started on a thread of its own
    wait_status(cl)
    assert link3(cl).get("downs") == downs
    assert lb_view(cl) == before
    assert_nothing_started(tmp_path, cl)
    latency_both_ways(cl, loops=5)


def test_python_peer_detected_dead_within_fd_interval_times_fall(tmp_path, bg):
    bound = FD_INTERVAL_MS * FD_FALL / 1000.0 + 1.0
    with cluster_from(TWO_DSPS, tmp_path) as cl:
        time.sleep(1.0)       # both directions carry HELLOs
        proc = cl.dsps[2]
        os.kill(proc.pid, signal.SIGSTOP)      # frozen: its sockets stay open
        try:
            t0 = time.monotonic()
            both = C.NODE_SCONNECTED | C.NODE_RCONNECTED
            while cl.dvk(1).getnodeinfo(2).n_flags & both == both:
                elapsed = time.monotonic() - t0
                assert elapsed < bound + 5, "the frozen peer was never declared dead"
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert elapsed <= bound, f"frozen Python peer declared dead after {elapsed:.2f} s " \
                                 f"(bound {bound:.1f} s)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def test_c_peer_itself_behaves_as_the_c_dsp(start_node, dvk_rundir):
    """The tool checked on its own: HELLO fields and cadence, one connect and never another after
    the other side closed, a receiver that drops a connection on a put2lcl error and accepts
    the next one."""
    start_node(3)
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(10)
    rport = _free_port()
    peer = CPeer(socket_path(3, dvk_rundir), 1, "node1", "127.0.0.1",
                 sport=lst.getsockname()[1], rport=rport, listen_host="127.0.0.1",
                 hello_period_ms=300, connect_sleep=0.1)
    try:
        peer.start()
        conn, _ = lst.accept()
        conn.settimeout(5)
        stamps = []
        for _ in range(3):
            h = Header(bytearray(_read_exact(conn, HEADER_SIZE)))
            stamps.append(time.monotonic())
            deadline = time.monotonic() + 5     # the peer records a HELLO after sending it
            while not peer.hellos_sent and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (h.c_cmd, h.c_dcid, h.c_src, h.c_dst, h.c_snode, h.c_dnode, h.c_len,
                    h.c_flags, h.c_batch_nr) == (C.CMD_NONE, -1, C.NONE, C.NONE, 3, 1, 0, 0, 0)
            assert h.c_pid == peer.hellos_sent[0].c_pid > 0
            assert abs(h.c_tv_sec + h.c_tv_nsec / 1e9 - time.time()) < 5
        assert all(b - a >= 0.25 for a, b in zip(stamps, stamps[1:])), stamps
        # the receiver: a HELLO is only recorded, a failing put2lcl ends the connection
        assert peer.listening.wait(5)
        for attempt in range(2):
            with socket.create_connection(("127.0.0.1", rport), timeout=5) as rx:
                hello = hello_header(1, 3)
                rx.sendall(bytes(hello.buf))
                bad = make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=60, c_dst=61,
                                  c_snode=1, c_dnode=3)
                rx.sendall(bytes(bad.buf))
                assert rx.recv(1) == b"", "the C receiver kept a connection after put2lcl failed"
            assert len(peer.hellos_received) == attempt + 1
        assert peer.accepts == 2 and peer.disconnects[0].startswith("put2lcl")
        # the sender: the other side closes; the C sender never connects again.  A receiver
        # connection re-opens the HELLO gate (closed by the receiver's disconnects, as in C)
        assert peer.hello_failures == 0
        rx = socket.create_connection(("127.0.0.1", rport), timeout=5)
        conn.close()
        lst.settimeout(2)
        with pytest.raises(TimeoutError):
            lst.accept()
        # its HELLOs now fail (counted, the connection kept, as C with batch NO), no reconnect
        rx.close()
        assert peer.hello_failures >= 1 and peer.connects == 1 and not peer.sender_gone.is_set()
    finally:
        peer.stop()
        lst.close()


#: Our DSP on client node 1 balances its clients; the only server, node 3, is a C DSP.
MIXED_LB = f"""
lb node0 {{ nodeid 0; period 1; fd_interval {FD_INTERVAL_MS}; fd_fall {FD_FALL}; }};
client node1 {{ nodeid 1; rname {{net}}.1; }};
server node3 {{ nodeid 3; rname {{net}}.3; }};
service lat {{ dcid 0; ext_ep 12; min_ep 12; max_ep 12; bind external; }};
""".replace("{{", "{").replace("}}", "}")


def test_clients_of_our_lb_are_served_by_a_c_server(tmp_path, bg):
    """A C cluster whose client node's DSP is replaced by ours: the servers are C DSPs, which
    never send a load report (the C daemon is built without GET_METRICS) and never announce
    themselves.  Our LB must still send its clients' sessions to them (as the C DSP of the
    client node did), not answer every request 'no server'; and once the C server's link is
    lost, new sessions fail with an error, not a wait."""
    with cluster_from(MIXED_LB, tmp_path, only=[1], dsp_args=["--allow-any-peer"]) as cl:
        cl.start_kernel(3)
        spec = next(s for s in topology.peer_specs(cl.cfg, 1) if s.nodeid == 3)
        peer = CPeer(socket_path(3, cl.rundir), 1, "node1", f"{cl.net}.1",
                     sport=spec.rport, rport=spec.sport, listen_host=f"{cl.net}.3")
        try:
            peer.start()
            n3 = cl.dvk(3)
            n3.add_node(0, 1)
            wait_link(cl, peer, 30)
            n3.rmtbind(0, "latclt1", 52, 1)       # the C operator binds the client by hand
            b = Background(cl, tmp_path)
            bg.append(b)
            b.start(3, "dvs_apps.latency", "server", 0, 12)
            wait_bound(cl, 3, 0, 12)
            # a peer that has not announced itself within fd_interval x fd_fall of link-up
            servers = lambda: ((cl.status(1).get("group") or {}).get("servers")  # noqa: E731
                               or {})
            wait_for(lambda: servers().get("3", {}).get("live"), 10,
                     f"the C server counted as running: {servers()}")
            res = cl.run(1, module_argv("dvs_apps.latency", "client", 0, 52, 12, 5, 0, 0),
                         timeout=60)
            assert res.returncode == 0 and "Total average latency in 5 loops" in res.stdout, \
                f"a client of our LB through the C server:\n{res.stdout}{res.stderr}"
            assert peer.frames_received >= 5 and peer.frames_sent >= 5
            peer.stop()                          # the C DSP's connections are gone
            wait_for(lambda: not servers().get("3", {}).get("live"), 10,
                     "the C server no longer running")
            t0 = time.monotonic()
            res = cl.run(1, module_argv("dvs_apps.latency", "client", 0, 52, 12, 1, 0, 0),
                         timeout=60)
            assert res.returncode != 0 and "EDVS" in res.stdout + res.stderr, res.stdout
            assert time.monotonic() - t0 < 30, "the client waited instead of getting an error"
            # the C DSP restarted (a new process, the same ports): served again
            peer = CPeer(socket_path(3, cl.rundir), 1, "node1", f"{cl.net}.1",
                         sport=spec.rport, rport=spec.sport, listen_host=f"{cl.net}.3")
            peer.start()
            wait_link(cl, peer, 30)
            n3.add_node(0, 1)                     # the pair's end took node 1 out of the DC
            n3.rmtbind(0, "latclt1", 52, 1)
            wait_for(lambda: servers().get("3", {}).get("live"), 10,
                     f"the restarted C server counted as running: {servers()}")
            res = cl.run(1, module_argv("dvs_apps.latency", "client", 0, 52, 12, 5, 0, 0),
                         timeout=60)
            assert res.returncode == 0, f"after the C DSP's restart:\n{res.stdout}{res.stderr}"
        finally:
            peer.stop()
