"""The emulated DVK node kernel (dvk_cffi/emu) against the DVK module's call semantics.

Every call goes through the real path: `EmuDvk` clients (one connection per thread) talking to a
node kernel served on a Unix socket.  The kernel is served by a thread of the test process
(`InProcNode`), so a test can also look at its state; programs that must die (kill -9) are child
processes, and the node-stop tests also run the kernel as a process of its own.

Layout: DVS/DC set-up, nodes and proxies, binding, local IPC, vcopy, process and kernel exit,
the sender side of remote IPC (get2rmt), and put2lcl row by row.
Endpoints follow the DC0 defaults: p_nr < 30 are system processes, 30.. user processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.info import DcInfo, DvsInfo
from dvk_cffi.wire import HEADER_SIZE, MESSAGE_SIZE, Header, Message
from emu_helpers import (
    DC0,
    FIRST_USER,
    FREE_EP,
    L_PID,
    LSYS,
    LSYS2,
    LUSR,
    NR_PROCS,
    NR_TASKS,
    PUT2LCL_ROWS,
    RSYS,
    RSYS3,
    RUSR,
    SHORT,
    U_PID,
    FakeProxy,
    error_of,
    make_world,
    msg,
    raises_code,
    wait_until,
)


@pytest.fixture
def world():
    with make_world() as w:
        yield w


@pytest.fixture
def node(world):
    return world.inproc_node(1)


@pytest.fixture
def d(world, node):
    return world.dvk(node)


def bound(world, d, ep: int, name: str = ""):
    """A new actor thread bound to `ep` in DC0."""
    a = world.actor(name or f"ep{ep}")
    assert a.call(d.bind, DC0, ep) == ep
    return a


def receive_async(actor, d, src: int = C.ANY, tout: int = C.TIMEOUT_FOREVER):
    m = Message()
    return m, actor.submit(d.receive, src, m, tout)


def wait_rts(node, p_nr: int, flag: int) -> None:
    wait_until(lambda: node.slot(p_nr).rts & flag, what=f"slot {p_nr} rts & {flag:#x}")


def blocked_receiving(world, node, d, ep: int, src: int = C.ANY):
    """An actor bound to `ep`, blocked in receive(src); returns (actor, message, future)."""
    a = bound(world, d, ep)
    m, fut = receive_async(a, d, src)
    wait_rts(node, ep, C.RECEIVING)
    return a, m, fut


def missing_pid() -> int:
    """A PID (< PID_MAX) that no process or thread has."""
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


# ================================================================================ DVS / DC
def test_dvs_init_returns_node_then_busy(world):
    node = world.inproc_node(3, init=False)
    d = world.dvk(node)
    assert d.getdvsinfo()[0] == C.DVS_NO_INIT
    with raises_code(E.EDVSDVSINIT):
        d.dc_init(DcInfo(dc_flags=C.DC_RUNNING))
    assert d.dvs_init(3, DvsInfo(d_name="TEST_CLUSTER")) == 3
    nodeid, info = d.getdvsinfo()
    assert nodeid == 3
    assert info.d_name == "TEST_CLUSTER" and info.d_version == C.DVS_VERSION
    assert info.d_flags & C.DVK_INITIALIZED
    with raises_code(E.EDVSDVSBUSY):
        d.dvs_init(3)
    with raises_code(E.EDVSDVSBUSY):
        d.dvs_init(4, DvsInfo())
    local = d.getnodeinfo(-1)
    assert (local.n_nodeid, local.n_flags, local.n_name) == (3, 0x6, "node3")
    assert "nodeid=3\n" in d.proc_text("info")
    assert d.dc_init(DcInfo(dc_flags=C.DC_RUNNING)) == 3


@pytest.mark.parametrize("nodeid, params, code", [
    (32, None, E.EDVSBADNODEID),
    (-1, None, E.EDVSBADNODEID),
    (4, DvsInfo(d_nr_nodes=4), E.EDVSBADNODEID),
    (1, DvsInfo(d_nr_dcs=0), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_dcs=33), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_nodes=33), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_procs=0), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_procs=222), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_tasks=0), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_tasks=36), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_sysprocs=65), E.EDVSBADRANGE),
    (1, DvsInfo(d_nr_tasks=35, d_nr_sysprocs=35), E.EDVSBADRANGE),        # sysprocs <= tasks
    (1, DvsInfo(d_nr_procs=10, d_nr_tasks=35, d_nr_sysprocs=45), E.EDVSBADRANGE),  # >= p+t
    (1, DvsInfo(d_max_copybuf=65537), E.EDVSBADVALUE),
    (1, DvsInfo(d_max_copylen=1048577), E.EDVSBADVALUE),
    (1, DvsInfo(d_max_copybuf=4096, d_max_copylen=1024), E.EDVSBADVALUE),  # copylen < copybuf
])
def test_dvs_init_checks(world, nodeid, params, code):
    node = world.inproc_node(1, init=False)
    d = world.dvk(node)
    with raises_code(code):
        d.dvs_init(nodeid, params)
    assert d.getdvsinfo()[0] == C.DVS_NO_INIT  # nothing was initialised
    assert d.dvs_init(1) == 1


def test_dc_init_and_end(d, node):
    assert d.dc_init(DcInfo(dc_dcid=1, dc_flags=C.DC_RUNNING, dc_name="DC1")) == 1
    info = d.getdcinfo(1)
    assert info.dc_flags == C.DC_RUNNING and info.dc_nodes == 1 << 1 and info.dc_name == "DC1"
    assert d.getnodeinfo(1).n_dcs == 0b11
    assert "dc_name=DC1" in d.proc_text("DC1/info")
    assert d.dc_end(1) == 0
    assert d.getdcinfo(1).dc_flags == C.DC_FREE
    with raises_code(E.EDVSDCNOTRUN):
        d.dc_end(1)


@pytest.mark.parametrize("params, code", [
    (DcInfo(dc_dcid=0, dc_name="OTHER"), E.EDVSRSCBUSY),       # DC0 already runs
    (DcInfo(dc_dcid=1, dc_name="DC0"), E.EDVSRSCBUSY),         # same name as DC0
    (DcInfo(dc_dcid=32, dc_name="DCX"), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_procs=222), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_tasks=36), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_sysprocs=65), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_tasks=34, dc_nr_sysprocs=34), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_nodes=0), E.EDVSBADRANGE),
    (DcInfo(dc_dcid=1, dc_name="DCX", dc_nr_nodes=33), E.EDVSBADRANGE),
])
def test_dc_init_checks(d, params, code):
    with raises_code(code):
        d.dc_init(params)


def test_dc_init_name_size(d):
    """A 16-byte name with no NUL (the C struct is char[16]); the client's DcInfo.pack would cut
    it to 15 bytes, so the struct is packed by hand and sent as the DC_INIT request."""
    raw = DcInfo.STRUCT.pack(1, C.DC_RUNNING, 221, 34, 64, 32, 0, C.NONE, 0, -1,
                             b"SIXTEEN_CHARS_DC", 0)
    with raises_code(E.EDVSNAMESIZE):
        d._call("DC_INIT", raw)
    assert d.dc_init(DcInfo(dc_dcid=1, dc_name="FIFTEEN_CHARSDC")) == 1
    # the size is in the struct's bytes, one per character: fifteen non-ASCII ones fit
    assert d.dc_init(DcInfo(dc_dcid=2, dc_name="\xe9" * 15)) == 1
    assert d.getdcinfo(2).dc_name == "\xe9" * 15


# ================================================================================ nodes
def test_add_node_and_del_node(world, d):
    with raises_code(E.EDVSBADNODEID):
        d.add_node(DC0, 1)                    # the local node
    with raises_code(E.EDVSBADNODEID):
        d.add_node(DC0, 32)
    with raises_code(E.EDVSNODEFREE):
        d.add_node(DC0, 2)                    # no node_up yet
    s, r = world.actor("s"), world.actor("r")
    d.proxies_bind("node2", 2, s.tid, r.tid)
    d.node_up("node2", 2, 2)
    d.node_up("node3", 3, 2)
    with raises_code(E.EDVSBADDCID):
        d.add_node(32, 2)
    with raises_code(E.EDVSDCNOTRUN):
        d.add_node(1, 2)
    assert d.add_node(DC0, 2) == 0
    assert d.getdcinfo(DC0).dc_nodes == 0b110
    assert d.getnodeinfo(2).n_dcs == 1 << DC0
    with raises_code(E.EDVSDCNODE):
        d.add_node(DC0, 2)
    assert d.del_node(DC0, 2) == 0
    assert d.getdcinfo(DC0).dc_nodes == 0b10 and d.getnodeinfo(2).n_dcs == 0
    with raises_code(E.EDVSDCNODE):
        d.del_node(DC0, 2)
    with raises_code(E.EDVSBADNODEID):
        d.del_node(DC0, 1)
    # a DC of at most 2 nodes: local + node 2, then node 3 is one too many
    d.dc_init(DcInfo(dc_dcid=1, dc_flags=C.DC_RUNNING, dc_name="DC1", dc_nr_nodes=2))
    assert d.add_node(1, 2) == 0
    with raises_code(E.EDVSRSCBUSY):
        d.add_node(1, 3)


# ================================================================================ proxies
def test_proxies_bind_checks_and_info(world, d):
    s, r = world.actor("s"), world.actor("r")
    s.call(d.getdvsinfo)          # s is known to the kernel; r is looked up through /proc
    with raises_code(E.EDVSPROXYFREE):
        d.getproxyinfo(2)
    with raises_code(E.EDVSBADPID):
        d.proxies_bind("node2", 2, missing_pid(), r.tid)
    with raises_code(E.EDVSBADPID):
        d.proxies_bind("node2", 2, s.tid, missing_pid())
    with raises_code(E.EDVSBADNODEID):
        d.proxies_bind("node2", 32, s.tid, r.tid)
    with raises_code(E.EDVS2BIG):
        d.proxies_bind("node2", 2, s.tid, r.tid, C.MAXCOPYBUF + 1)
    assert d.proxies_bind("node2", 2, s.tid, r.tid, C.MAXCOPYBUF) == 0
    sp, rp = d.getproxyinfo(2)
    for p, t in ((sp, s), (rp, r)):
        assert p.p_nr == 2 and p.p_endpoint == C.NONE and p.p_lpid == t.tid
        assert p.p_misc_flags & C.MIS_PROXY and p.p_nodeid == 1
    s2, r2 = world.actor("s2"), world.actor("r2")
    with raises_code(E.EDVSRSCBUSY):
        d.proxies_bind("again", 2, s2.tid, r2.tid)
    with raises_code(E.EDVSBADPID):      # threads that are proxies already
        d.proxies_bind("node3", 3, s.tid, r.tid)
    # a proxy thread is not a process: getep says EDVSBADPROC
    a = bound(world, d, LSYS)
    with raises_code(E.EDVSBADPROC):
        a.call(d.getep, s.tid)


def test_proxies_bind_wakes_wait4bind_poller(world, d):
    """Proxies poll wait4bind(SELF); the emulator also wakes them at proxies_bind."""
    s, r = world.actor("s"), world.actor("r")
    s.call(d.getdvsinfo)
    r.call(d.getdvsinfo)
    with raises_code(E.EDVSTIMEDOUT):
        s.call(d.wait4bind, SHORT)
    fs = s.submit(d.wait4bind, 10000)
    fr = r.submit(d.wait4bind, 10000)
    time.sleep(0.1)
    t0 = time.monotonic()
    d.proxies_bind("node2", 2, s.tid, r.tid)
    assert fs.result(5) == C.NONE and fr.result(5) == C.NONE
    assert time.monotonic() - t0 < 5


def test_node_up_and_proxy_conn_flags(world, d):
    s, r = world.actor("s"), world.actor("r")
    with raises_code(E.EDVSPROXYFREE):
        d.node_up("node2", 2, 2)
    with raises_code(E.EDVSPROXYID):
        d.node_up("node2", 2, 32)
    with raises_code(E.EDVSPROXYFREE):
        d.proxy_conn(2, C.CONNECT_SPROXY)
    with raises_code(E.EDVSPROXYID):
        d.proxy_conn(32, C.CONNECT_SPROXY)
    d.proxies_bind("node2", 2, s.tid, r.tid)
    with raises_code(E.EDVSBADNODEID):
        d.node_up("node32", 32, 2)
    assert d.node_up("node2", 2, 2) == 0
    n = d.getnodeinfo(2)
    assert (n.n_flags, n.n_proxies, n.n_name) == (C.NODE_ATTACHED, 2, "node2")
    with raises_code(E.EDVSBADVALUE):
        d.proxy_conn(2, 5)

    def px_flags():
        line = [ln for ln in d.proc_text("proxies/info").splitlines()[1:]
                if ln.split()[0] == "2"]
        return int(line[0].split()[1], 16)

    assert px_flags() == C.PROXIES_INUSE
    d.proxy_conn(2, C.CONNECT_SPROXY)
    assert d.getnodeinfo(2).n_flags == 0x6 and px_flags() == 0x3
    assert d.getproxyinfo(2)[0].p_misc_flags == C.MIS_PROXY | C.MIS_CONNECTED
    assert d.getproxyinfo(2)[1].p_misc_flags == C.MIS_PROXY
    d.proxy_conn(2, C.CONNECT_RPROXY)
    assert d.getnodeinfo(2).n_flags == 0xE and px_flags() == 0x7
    assert d.getproxyinfo(2)[1].p_misc_flags == C.MIS_PROXY | C.MIS_CONNECTED
    d.add_node(DC0, 2)
    # /proc/dvs/nodes and /proc/dvs/proxies/info, in the module's formats
    nodes = d.proc_text("nodes").splitlines()
    assert nodes[0] == "ID Flags Proxies -pxsent- -pxrcvd- 10987654321098765432109876543210 Name"
    assert nodes[1].rstrip() == " 1     6      -1        0        0 " + "-" * 31 + "X node1"
    assert nodes[2].rstrip() == " 2     E       2        0        0 " + "-" * 31 + "X node2"
    info = d.proc_text("proxies/info").splitlines()
    assert info[0].startswith("Proxies Flags Sender Receiver --Proxies_Name- ")
    assert info[1] == f"{2:7d} {7:5X} {s.tid:6d} {r.tid:8d} {'node2':>15s} {'-' * 29}X--"
    d.proxy_conn(2, C.DISCONNECT_SPROXY)
    assert d.getnodeinfo(2).n_flags == 0xA and px_flags() == 0x5
    d.proxy_conn(2, C.DISCONNECT_RPROXY)
    assert d.getnodeinfo(2).n_flags == C.NODE_ATTACHED and px_flags() == C.PROXIES_INUSE
    assert d.getproxyinfo(2)[0].p_misc_flags == C.MIS_PROXY
    # node_down quirk: a node the pair serves is not cleared, the call returns 0
    assert d.node_down(2) == 0
    assert d.getnodeinfo(2).n_flags == C.NODE_ATTACHED


def test_proxies_unbind_ends_the_node(world, d, node):
    px = FakeProxy(world, node, d, 2)
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    assert d.getprocinfo(DC0, RSYS).p_rts_flags == C.REMOTE
    assert d.proxies_unbind(2) == 0
    assert d.getprocinfo(DC0, RSYS).p_rts_flags == C.SLOT_FREE
    assert d.getdcinfo(DC0).dc_nodes == 1 << 1
    assert d.getnodeinfo(2).n_flags == C.NODE_FREE
    with raises_code(E.EDVSPROXYFREE):
        d.getproxyinfo(2)
    with raises_code(E.EDVSPROXYFREE):
        d.proxies_unbind(2)
    with raises_code(E.EDVSNOTBIND):  # the threads are no proxies any more
        px.sproxy.call(d.get2rmt, Header(), px.spay, SHORT)
    # the pair can be registered again with the same threads
    assert d.proxies_bind("node2", 2, px.sproxy.tid, px.rproxy.tid) == 0


# ================================================================================ bind
def test_bind_self_local(world, d, node):
    a = bound(world, d, LSYS)
    p = d.getprocinfo(DC0, LSYS)
    assert (p.p_nr, p.p_endpoint, p.p_rts_flags, p.p_lpid, p.p_nodeid) == \
        (LSYS, LSYS, 0, a.tid, 1)
    assert p.p_nodemap == 1 << 1
    b = world.actor("b")
    with raises_code(E.EDVSSLOTUSED):
        b.call(d.bind, DC0, LSYS)
    with raises_code(E.EDVSSLOTUSED):       # a bound task can not take a second slot
        a.call(d.bind, DC0, LSYS2)
    assert b.call(d.bind, DC0, -5) == -5  # a task endpoint (negative) is a success value
    assert d.getprocinfo(DC0, -5).p_endpoint == -5
    procs = d.proc_text("DC0/procs").splitlines()
    assert procs[0].startswith("DC pnr -endp -lpid/vpid- nd flag misc")
    assert any(ln.split()[:3] == ["0", str(LSYS), str(LSYS)] for ln in procs[1:])
    assert a.call(d.getep, a.tid) == LSYS


@pytest.mark.parametrize("args, code", [
    ((6, DC0, -1, LSYS, C.LOCALNODE), E.EDVSBINDTYPE),
    ((-1, DC0, -1, LSYS, C.LOCALNODE), E.EDVSBINDTYPE),
    ((C.SELF_BIND, DC0, -1, LSYS, 1), E.EDVSBADNODEID),       # local bind names a node
    ((C.RMT_BIND, DC0, -1, RSYS, 1), E.EDVSBADNODEID),        # remote bind on the local node
    ((C.RMT_BIND, DC0, -1, RSYS, 32), E.EDVSBADNODEID),
    ((C.SELF_BIND, 1, -1, LSYS, C.LOCALNODE), E.EDVSDCNOTRUN),
    ((C.SELF_BIND, 32, -1, LSYS, C.LOCALNODE), E.EDVSBADDCID),
    ((C.SELF_BIND, DC0, -1, NR_PROCS, C.LOCALNODE), E.EDVSBADDCID),   # p_nr range quirk
    ((C.SELF_BIND, DC0, -1, -NR_TASKS - 1, C.LOCALNODE), E.EDVSBADDCID),
    ((C.RMT_BIND, DC0, -1, RSYS, 5), E.EDVSNODCNODE),         # node 5 is not in DC0
])
def test_bind_checks(world, d, args, code):
    a = world.actor()
    with raises_code(code):
        a.call(d.bind_X, *args)


def test_bind_bad_pid_and_other_dc(world, d):
    with raises_code(E.EDVSBADPID):
        d.lclbind(DC0, missing_pid(), LSYS)
    d.dc_init(DcInfo(dc_dcid=1, dc_flags=C.DC_RUNNING, dc_name="DC1"))
    a = bound(world, d, LSYS)
    with raises_code(E.EDVSBADDCID):   # bound in DC0, can not bind in DC1
        a.call(d.bind, 1, LSYS)


def test_lclbind_replbind_umbind(world, d):
    t1, t2, t3 = world.actor("t1"), world.actor("t2"), world.actor("t3")
    t1.call(d.getdvsinfo)
    assert d.lclbind(DC0, t1.tid, 13) == 13
    assert d.getprocinfo(DC0, 13).p_lpid == t1.tid
    assert d.replbind(DC0, t2.tid, 14) == 14     # t2 never talked to the kernel: /proc lookup
    assert d.getprocinfo(DC0, 14).p_misc_flags & C.MIS_REPLICATED
    assert d.bind_X(C.USERMODE_BIND, DC0, t3.tid, 15, C.LOCALNODE) == 15
    assert d.getprocinfo(DC0, 15).p_misc_flags & C.MIS_USERMODE
    assert t1.call(d.wait4bind, 0) == 13
    assert t2.call(d.getep, t3.tid) == 15


def test_lclbind_wakes_wait4bind_self(world, d):
    t = world.actor("t")
    t.call(d.getdvsinfo)
    fut = t.submit(d.wait4bind, 10000)
    time.sleep(0.1)
    assert not fut.done()
    assert d.lclbind(DC0, t.tid, 16) == 16
    assert fut.result(5) == 16


def test_rmtbind_needs_proxy_pair(world, d, node):
    """EDVSNOPROXY: the node is in the DC but no proxy pair serves it.  add_node needs a node
    that is up, and freeing a pair ends its nodes, so the bare state is made by hand."""
    with node.kernel.lock:
        node.kernel.nodes[5].n_flags = C.NODE_ATTACHED
    assert d.add_node(DC0, 5) == 0
    with raises_code(E.EDVSNOPROXY):
        d.rmtbind(DC0, "x", RSYS, 5)


def test_rmtbind_and_bkupbind(world, d, node):
    FakeProxy(world, node, d, 2)
    d.add_node(DC0, 2)
    assert d.rmtbind(DC0, "remote_server_name", RSYS, 2) == RSYS
    p = d.getprocinfo(DC0, RSYS)
    assert (p.p_rts_flags, p.p_nodeid, p.p_lpid, p.p_name) == \
        (C.REMOTE, 2, -1, "remote_server_n")
    with raises_code(E.EDVSSLOTUSED):
        d.rmtbind(DC0, "again", RSYS, 2)
    t = world.actor("t")
    assert d.bkupbind(DC0, t.tid, 23, 2) == 23
    p = d.getprocinfo(DC0, 23)
    assert p.p_rts_flags == C.REMOTE and p.p_misc_flags & C.MIS_RMTBACKUP and p.p_nodeid == 2


# ================================================================================ unbind
def test_unbind_self_and_free(world, d):
    a = bound(world, d, LSYS)
    with raises_code(E.EDVSNOTBIND):
        a.call(d.unbind, DC0, FREE_EP)
    assert a.call(d.unbind, DC0, LSYS) == 0
    assert d.getprocinfo(DC0, LSYS).p_rts_flags == C.SLOT_FREE
    assert d.getprocinfo(DC0, LSYS).p_name == "$noname"
    with raises_code(E.EDVSNOTBIND):   # not bound any more: no IPC
        a.call(d.send, LSYS2, Message())
    assert a.call(d.bind, DC0, LSYS) == LSYS  # the slot can be taken again


def test_unbind_remote_is_immediate(world, d, node):
    FakeProxy(world, node, d, 2)
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "r", RSYS, 2)
    assert d.unbind(DC0, RSYS) == 0
    assert d.getprocinfo(DC0, RSYS).p_rts_flags == C.SLOT_FREE


def test_unbind_wakes_sender_with_dstdied(world, d, node):
    dst = bound(world, d, LSYS)
    snd = bound(world, d, LSYS2)
    fut = snd.submit(d.send, LSYS, msg(m_type=1))
    wait_rts(node, LSYS2, C.SENDING)
    dst.call(d.unbind, DC0, LSYS)
    assert error_of(fut) == E.EDVSDSTDIED
    assert node.slot(LSYS2).rts == 0


def test_unbind_wakes_receiver_from_with_srcdied(world, d, node):
    src = bound(world, d, LSYS2)
    _rcv, _m, fut = blocked_receiving(world, node, d, LSYS, src=LSYS2)
    src.call(d.unbind, DC0, LSYS2)
    assert error_of(fut) == E.EDVSSRCDIED


def test_unbind_of_server_wakes_sendrec_client(world, d, node):
    srv, m, fut = blocked_receiving(world, node, d, LSYS)
    clt = bound(world, d, LUSR)
    cfut = clt.submit(d.sendrec, LSYS, msg(m_type=3))
    fut.result(5)
    wait_rts(node, LUSR, C.RECEIVING)
    srv.call(d.unbind, DC0, LSYS)
    assert error_of(cfut) == E.EDVSSRCDIED
    # a client queued on a server that goes away gets EDVSDSTDIED
    srv2 = bound(world, d, LSYS2)
    clt2 = bound(world, d, LUSR + 1)
    cfut2 = clt2.submit(d.sendrec, LSYS2, msg(m_type=3))
    wait_rts(node, LUSR + 1, C.SENDING)
    srv2.call(d.unbind, DC0, LSYS2)
    assert error_of(cfut2) == E.EDVSDSTDIED


def test_unbind_of_another_process_sends_sigterm(world, d, node):
    """Unbinding another local process SIGTERMs it; a bound caller waits for its exit."""
    child = world.child(node, 15, "receive", C.ANY)
    child.expect("READY")
    wait_rts(node, 15, C.RECEIVING)
    a = bound(world, d, LSYS)
    assert a.call(d.unbind, DC0, 15, 10000) == 0
    assert child.proc.wait(10) == -signal.SIGTERM
    assert d.getprocinfo(DC0, 15).p_rts_flags == C.SLOT_FREE
    # an unbound caller gets EDVSAGAIN back at once; the target is still terminated
    child2 = world.child(node, 16, "sleep")
    child2.expect("READY")
    with raises_code(E.EDVSAGAIN):
        d.unbind(DC0, 16)
    assert child2.proc.wait(10) == -signal.SIGTERM
    wait_until(lambda: d.getprocinfo(DC0, 16).p_rts_flags == C.SLOT_FREE)


# ================================================================================ wait4bind, getep
def test_wait4bind_self_and_timeouts(world, d):
    a = world.actor()
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.wait4bind, C.TIMEOUT_NOWAIT)
    t0 = time.monotonic()
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.wait4bind, 200)
    assert time.monotonic() - t0 >= 0.15
    a.call(d.bind, DC0, LSYS)
    assert a.call(d.wait4bind, C.TIMEOUT_NOWAIT) == LSYS
    assert a.call(d.wait4bind) == LSYS


def test_wait4bind_other_endpoint(world, d):
    a = world.actor()
    with raises_code(E.EDVSNOTBIND):     # the caller must be bound
        a.call(d.wait4bindep, 15, SHORT)
    a.call(d.bind, DC0, LSYS)
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.wait4bindep, 15, SHORT)
    fut = a.submit(d.wait4bindep, 15, 10000)
    time.sleep(0.1)
    b = bound(world, d, 15)
    assert fut.result(5) == 15
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.wait4unbind, 15, C.TIMEOUT_NOWAIT)
    fut = a.submit(d.wait4unbind, 15, 10000)
    time.sleep(0.1)
    b.call(d.unbind, DC0, 15)
    assert fut.result(5) == 0


def test_getep(world, d):
    a = world.actor("a")
    with raises_code(E.EDVSNOTBIND):           # the caller must be bound
        a.call(d.getep, os.getpid())
    a.call(d.bind, DC0, LSYS)
    b = world.actor("b")
    b.call(d.getdvsinfo)
    assert a.call(d.getep, a.tid) == LSYS
    with raises_code(E.EDVSNOTBIND):
        a.call(d.getep, b.tid)                 # known, not bound
    with raises_code(E.EDVSBADRANGE):
        a.call(d.getep, 0)
    with raises_code(E.EDVSBADRANGE):
        a.call(d.getep, 4194305)
    with raises_code(E.EDVSBADPID):
        a.call(d.getep, missing_pid())


def test_migrate_is_not_emulated(d):
    with raises_code(E.EDVSNOSYS):
        d.migrate_X(C.MIGR_START, -1, DC0, LSYS, -1)


# ================================================================================ local IPC
def test_send_receive_content_and_source(world, d, node):
    rcv, m, fut = blocked_receiving(world, node, d, LSYS)
    snd = bound(world, d, LSYS2)
    out = msg(m_source=999, m_type=0x55, m1_i1=1, m1_i2=-2, m1_i3=3, m1_p1=0xDEADBEEF)
    assert snd.call(d.send, LSYS, out) == 0
    fut.result(5)
    assert m.m_source == LSYS2                      # the kernel writes m_source
    assert (m.m_type, m.m1_i1, m.m1_i2, m.m1_i3, m.m1_p1) == (0x55, 1, -2, 3, 0xDEADBEEF)
    assert d.getprocinfo(DC0, LSYS2).p_lclsent == 1


def test_send_queues_until_receive(world, d, node):
    rcv = bound(world, d, LSYS)
    a, b = bound(world, d, LSYS2), bound(world, d, 13)
    fa = a.submit(d.send, LSYS, msg(m_type=1))
    wait_rts(node, LSYS2, C.SENDING)
    fb = b.submit(d.send, LSYS, msg(m_type=2))
    wait_rts(node, 13, C.SENDING)
    assert d.getprocinfo(DC0, 13).p_sendto == LSYS
    m = Message()
    rcv.call(d.receive, 13, m)                      # a specific source first
    assert (m.m_source, m.m_type) == (13, 2)
    fb.result(5)
    assert not fa.done()
    rcv.call(d.receive, C.ANY, m)
    assert (m.m_source, m.m_type) == (LSYS2, 1)
    fa.result(5)


def test_receive_specific_source_waits(world, d, node):
    _rcv, m, fut = blocked_receiving(world, node, d, LSYS, src=13)
    a = bound(world, d, LSYS2)
    fa = a.submit(d.send, LSYS, msg(m_type=1))
    wait_rts(node, LSYS2, C.SENDING)                # not the awaited source: queued
    assert not fut.done()
    b = bound(world, d, 13)
    b.call(d.send, LSYS, msg(m_type=2))
    fut.result(5)
    assert (m.m_source, m.m_type) == (13, 2)
    assert not fa.done()


def test_nowait_and_timeouts(world, d, node):
    a, b = bound(world, d, LSYS), bound(world, d, LSYS2)
    c = bound(world, d, LUSR)
    with raises_code(E.EDVSAGAIN):
        a.call(d.send, LSYS2, Message(), C.TIMEOUT_NOWAIT)
    with raises_code(E.EDVSAGAIN):
        a.call(d.receive, C.ANY, Message(), C.TIMEOUT_NOWAIT)
    with raises_code(E.EDVSAGAIN):
        c.call(d.sendrec, LSYS2, Message(), C.TIMEOUT_NOWAIT)
    t0 = time.monotonic()
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.send, LSYS2, Message(), 200)
    with raises_code(E.EDVSTIMEDOUT):
        a.call(d.receive, C.ANY, Message(), 200)
    with raises_code(E.EDVSTIMEDOUT):
        c.call(d.sendrec, LSYS2, Message(), 200)
    assert time.monotonic() - t0 >= 0.5
    # a timed-out sender is out of the queue and its flags are clear
    assert node.slot(LSYS).rts == 0 and node.slot(LUSR).rts == 0
    with raises_code(E.EDVSAGAIN):
        b.call(d.receive, C.ANY, Message(), C.TIMEOUT_NOWAIT)


def test_sendrec_and_reply(world, d, node):
    srv, m, fut = blocked_receiving(world, node, d, LSYS)
    clt = bound(world, d, LUSR)
    req = msg(m_type=7, m1_i1=41)
    cfut = clt.submit(d.sendrec, LSYS, req)
    fut.result(5)
    assert (m.m_source, m.m_type, m.m1_i1) == (LUSR, 7, 41)
    wait_rts(node, LUSR, C.RECEIVING)
    assert d.getprocinfo(DC0, LUSR).p_getfrom == LSYS
    assert srv.call(d.reply, LUSR, msg(m_type=8, m1_i1=42)) == 0
    cfut.result(5)
    assert (req.m_source, req.m_type, req.m1_i1) == (LSYS, 8, 42)
    # the latency pattern: the server answers with send
    cfut = clt.submit(d.sendrec, LSYS, msg(m_type=9))
    srv.call(d.receive, C.ANY, m)
    assert m.m_source == LUSR
    srv.call(d.send, LUSR, msg(m_type=10))
    cfut.result(5)
    # sendrec to a server that is not receiving yet: queued, served later
    req = msg(m_type=11)
    cfut = clt.submit(d.sendrec, LSYS, req)
    wait_rts(node, LUSR, C.SENDING)
    srv.call(d.receive, LUSR, m)
    assert m.m_type == 11
    srv.call(d.reply, LUSR, msg(m_type=12))
    cfut.result(5)
    assert req.m_type == 12


def test_user_process_may_only_sendrec(world, d, node):
    """p_nr >= nr_sysprocs - nr_tasks (30 in DC0) is a user process."""
    assert FIRST_USER == 30
    srv = bound(world, d, LSYS)
    last_sys = bound(world, d, FIRST_USER - 1)
    usr = bound(world, d, FIRST_USER)
    with raises_code(E.EDVSBADCALL):
        usr.call(d.send, LSYS, Message())
    with raises_code(E.EDVSBADCALL):
        usr.call(d.receive, C.ANY, Message())
    with raises_code(E.EDVSBADCALL):
        usr.call(d.notify, LSYS)
    with raises_code(E.EDVSBADCALL):
        usr.call(d.reply, LSYS, Message())
    with raises_code(E.EDVSBADCALL):
        usr.call(d.rcvrqst, Message())
    with raises_code(E.EDVSBADCALL):
        usr.call(d.vcopy, C.SELF, 0, LSYS, 0, 1)
    with raises_code(E.EDVSAGAIN):                 # allowed: it just would block
        last_sys.call(d.send, LSYS, Message(), C.TIMEOUT_NOWAIT)
    m, fut = receive_async(srv, d)
    wait_rts(node, LSYS, C.RECEIVING)
    ufut = usr.submit(d.sendrec, LSYS, msg(m_type=1))
    fut.result(5)
    srv.call(d.reply, FIRST_USER, Message())
    ufut.result(5)
    assert usr.call(d.getep, usr.tid) == FIRST_USER


def test_reply_checks(world, d, node):
    srv, other = bound(world, d, LSYS), bound(world, d, LSYS2)
    with raises_code(E.EDVSPROCSTS):               # not waiting for a reply from srv
        srv.call(d.reply, LSYS2, Message())
    ofut = other.submit(d.receive, C.ANY, Message())
    wait_rts(node, LSYS2, C.RECEIVING)
    with raises_code(E.EDVSPROCSTS):               # receiving from ANY is not enough
        srv.call(d.reply, LSYS2, Message())
    srv.call(d.send, LSYS2, Message())
    ofut.result(5)
    with raises_code(E.EDVSDSTDIED):
        srv.call(d.reply, FREE_EP, Message())


@pytest.mark.parametrize("call, dst, code", [
    ("send", LSYS, E.EDVSBADDEST),            # to itself
    ("send", C.HARDWARE, E.EDVSBADDEST),
    ("send", FREE_EP, E.EDVSDSTDIED),
    ("sendrec", FREE_EP, E.EDVSDEADSRCDST),
    ("sendrec", LSYS, E.EDVSENDPOINT),        # to itself
    ("send", NR_PROCS, E.EDVSRANGE),
    ("send", C._ENDPOINT(1, LSYS2), E.EDVSENDPOINT),   # wrong generation
    ("receive", NR_PROCS - NR_TASKS, E.EDVSRANGE),    # the receive(src) range quirk
])
def test_ipc_destination_checks(world, d, call, dst, code):
    a = bound(world, d, LSYS)
    bound(world, d, LSYS2)
    with raises_code(code):
        a.call(getattr(d, call), dst, Message(), C.TIMEOUT_NOWAIT)


def test_unbound_caller_gets_notbind(world, d):
    a = world.actor()
    bound(world, d, LSYS)
    for fn, args in ((d.send, (LSYS, Message())), (d.receive, (C.ANY, Message())),
                     (d.sendrec, (LSYS, Message())), (d.notify, (LSYS,))):
        with raises_code(E.EDVSNOTBIND):
            a.call(fn, *args)


def test_notify_pending_and_direct(world, d, node):
    rcv, src = bound(world, d, LSYS), bound(world, d, LSYS2)
    assert src.call(d.notify, LSYS) == 0            # does not block
    assert node.slot(LSYS).misc & C.MIS_NOTIFY
    m = Message()
    rcv.call(d.receive, C.ANY, m)
    assert (m.m_source, m.m_type) == (LSYS2, C.NOTIFY_FROM(LSYS2))
    assert not node.slot(LSYS).misc & C.MIS_NOTIFY
    # to a receiver that waits: delivered at once
    m, fut = receive_async(rcv, d)
    wait_rts(node, LSYS, C.RECEIVING)
    src.call(d.notify, LSYS)
    fut.result(5)
    assert (m.m_source, m.m_type) == (LSYS2, C.NOTIFY_FROM(LSYS2))
    # a pending notify is delivered by receive(src) whatever src is (a module quirk)
    src.call(d.notify, LSYS)
    bound(world, d, 13)
    rcv.call(d.receive, 13, m, C.TIMEOUT_NOWAIT)
    assert m.m_type == C.NOTIFY_FROM(LSYS2)
    # notify with a value in [0, 32) sets an update-pending bit reported in m9_l1
    src.call(d.ntfy_value, LSYS2, LSYS, 5)
    rcv.call(d.receive, C.ANY, m)
    assert m.m_type == C.NOTIFY_FROM(LSYS2) and m.m9_l1 == 1 << 5


def test_notify_checks(world, d):
    src = bound(world, d, LSYS)
    bound(world, d, LUSR)
    with raises_code(E.EDVSTRAPDENIED):             # the destination must be a system process
        src.call(d.notify, LUSR)
    with raises_code(E.EDVSDSTDIED):
        src.call(d.notify, FREE_EP)
    with raises_code(E.EDVSBADDEST):
        src.call(d.notify, LSYS)


def test_wakeup(world, d, node):
    rcv, _m, fut = blocked_receiving(world, node, d, LSYS)
    assert d.wakeup(DC0, LSYS) == 0
    assert error_of(fut) == E.EDVSWOKENUP
    with raises_code(E.EDVSPROCRUN):                # running: remembered for later
        d.wakeup(DC0, LSYS)
    with raises_code(E.EDVSWOKENUP):
        rcv.call(d.receive, C.ANY, Message(), C.TIMEOUT_NOWAIT)
    with raises_code(E.EDVSNOTBIND):
        d.wakeup(DC0, FREE_EP)


# ================================================================================ vcopy (local)
def test_vcopy_between_threads(world, d, node):
    owner, _m, fut = blocked_receiving(world, node, d, LSYS)
    rq = bound(world, d, LSYS2)
    n = 150_000                                     # > d_max_copybuf: several chunks
    src, dst = d.alloc(n), d.alloc(n)
    data = os.urandom(n)
    src.write(data)
    rc = rq.call(d.vcopy, LSYS, src.addr, C.SELF, dst.addr, n)
    assert rc == n - 2 * C.MAXCOPYBUF               # the byte count of the last chunk
    assert dst.read() == data
    dst2 = d.alloc(100)
    rq.call(d.vcopy, C.SELF, src.addr, LSYS, dst2.addr, 100)
    assert dst2.read() == data[:100]
    assert not fut.done()                           # the blocked party stays blocked
    assert d.getprocinfo(DC0, LSYS2).p_lclcopy == 2


def test_vcopy_checks(world, d, node):
    idle = bound(world, d, LSYS)
    rq = bound(world, d, LSYS2)
    buf = d.alloc(64)
    with raises_code(E.EDVSPROCSTS):                # the other party is not blocked
        rq.call(d.vcopy, LSYS, buf.addr, C.SELF, buf.addr, 16)
    with raises_code(E.EDVSENDPOINT):
        rq.call(d.vcopy, LSYS2, buf.addr, LSYS2, buf.addr, 16)
    with raises_code(E.EDVSENDPOINT):
        rq.call(d.vcopy, C.ANY, buf.addr, C.SELF, buf.addr, 16)
    with raises_code(E.EDVSNOTBIND):
        rq.call(d.vcopy, FREE_EP, buf.addr, C.SELF, buf.addr, 16)
    with raises_code(E.EDVS2BIG):
        rq.call(d.vcopy, LSYS, buf.addr, C.SELF, buf.addr, C.MAXCOPYLEN + 1)
    m, fut = receive_async(idle, d)
    wait_rts(node, LSYS, C.RECEIVING)
    with raises_code(E.EDVSFAULT):                  # not an address of that process
        rq.call(d.vcopy, LSYS, 0x1000, C.SELF, buf.addr, 16)
    assert rq.call(d.vcopy, LSYS, buf.addr, C.SELF, buf.addr + 32, 0) == 0


def test_vcopy_between_processes(world, d, node):
    """A child process offers two buffers in a sendrec; the server pulls one and fills the
    other while the child is blocked (the m3ftp pattern, locally)."""
    n = 100_000
    srv = bound(world, d, LSYS)
    m, fut = receive_async(srv, d)
    child = world.child(node, 15, "vcopy", LSYS, n)
    child.expect("READY")
    fut.result(10)
    assert (m.m_source, m.m_type, m.m1_i1) == (15, 5, n)
    mine = d.alloc(n)
    srv.call(d.vcopy, 15, m.m1_p1, C.SELF, mine.addr, n)
    assert mine.read() == bytes((i * 7 + 3) & 0xFF for i in range(n))
    mine.write(bytes((i * 13 + 1) & 0xFF for i in range(n)))
    srv.call(d.vcopy, C.SELF, mine.addr, 15, m.m1_p2, n)
    srv.call(d.reply, 15, msg(m_type=6))
    assert child.expect("DONE") == "DONE ok 6"


# ================================================================================ exits
def test_killed_process_is_unbound_and_partner_woken(world, d, node):
    child = world.child(node, 15, "sleep")
    child.expect("READY")
    _rcv, _m, fut = blocked_receiving(world, node, d, LSYS, src=15)
    snd = bound(world, d, LSYS2)
    sfut = snd.submit(d.send, 15, Message())
    wait_rts(node, LSYS2, C.SENDING)
    child.kill()
    assert error_of(fut) == E.EDVSSRCDIED
    assert error_of(sfut) == E.EDVSDSTDIED
    wait_until(lambda: d.getprocinfo(DC0, 15).p_rts_flags == C.SLOT_FREE)


def test_killed_sendrec_caller_leaves_no_queued_message(world, d, node):
    srv = bound(world, d, LSYS)
    child = world.child(node, 15, "sendrec", LSYS)
    child.expect("READY")
    wait_rts(node, 15, C.SENDING)
    child.kill()
    wait_until(lambda: d.getprocinfo(DC0, 15).p_rts_flags == C.SLOT_FREE)
    with raises_code(E.EDVSAGAIN):
        srv.call(d.receive, C.ANY, Message(), C.TIMEOUT_NOWAIT)


def test_killed_process_blocked_in_wait4bind_is_unbound(world, d, node):
    child = world.child(node, 15, "wait4bind", 16)
    child.expect("READY")
    time.sleep(0.3)
    child.kill()
    wait_until(lambda: d.getprocinfo(DC0, 15).p_rts_flags == C.SLOT_FREE, timeout=10)


def test_inproc_kernel_stop_wakes_blocked_caller(world, d, node):
    _a, _m, fut = blocked_receiving(world, node, d, LSYS)
    node.stop()
    assert error_of(fut) == E.EDVSSHUTDOWN


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_kernel_process_stop_wakes_blocked_caller(world, how):
    node = world.proc_node(4)
    d = world.dvk(node)
    a = bound(world, d, LSYS)
    fut = a.submit(d.receive, C.ANY, Message())
    wait_until(lambda: d.getprocinfo(DC0, LSYS).p_rts_flags & C.RECEIVING)
    if how == "SIGTERM":
        node.terminate()
    else:
        node.kill()
    assert error_of(fut) == E.EDVSSHUTDOWN


# ================================================================================ proxy env
@pytest.fixture
def env(world, node, d):
    """Node 1 with the test process as proxy pair 2 for nodes 2 and 3 (both in DC0),
    remote endpoints RSYS, RUSR on node 2 and RSYS3 on node 3, local LSYS/LSYS2/LUSR."""
    px = FakeProxy(world, node, d, 2, extra_nodes=(3,))
    d.add_node(DC0, 2)
    d.add_node(DC0, 3)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    d.rmtbind(DC0, "rusr", RUSR, 2)
    d.rmtbind(DC0, "rsys3", RSYS3, 3)
    L = bound(world, d, LSYS, "L")
    A = bound(world, d, LSYS2, "A")
    U = bound(world, d, LUSR, "U")
    return SimpleNamespace(node=node, d=d, px=px, L=L, A=A, U=U, world=world)


def check_hdr(h: Header, **want) -> None:
    got = {k: getattr(h, k) for k in want}
    assert got == want, f"{h!r}"


# ----------------------------------------------------------------------------- get2rmt
def test_get2rmt_requires_connected_sender_proxy(world, node, d):
    px = FakeProxy(world, node, d, 2, connect=())
    with raises_code(E.EDVSNOTCONN):
        px.get(SHORT)
    d.proxy_conn(2, C.CONNECT_SPROXY)
    with raises_code(E.EDVSTIMEDOUT):
        px.get(C.TIMEOUT_NOWAIT)
    t0 = time.monotonic()
    with raises_code(E.EDVSTIMEDOUT):
        px.get(200)
    assert time.monotonic() - t0 >= 0.15
    with raises_code(E.EDVSBADCALL):                # the receiver proxy can not get2rmt
        px.rproxy.call(d.get2rmt, Header(), px.rpay, SHORT)
    with raises_code(E.EDVSNOTBIND):                # nor can a thread that is nothing
        world.actor().call(d.get2rmt, Header(), px.spay, SHORT)
    a = bound(world, d, LSYS)
    with raises_code(E.EDVSBADCALL):                # nor a bound process
        a.call(d.get2rmt, Header(), px.spay, SHORT)


def test_put2lcl_requires_connected_receiver_proxy(world, node, d):
    px = FakeProxy(world, node, d, 2, connect=(C.CONNECT_SPROXY,))
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    bound(world, d, LSYS)
    with raises_code(E.EDVSNOTCONN):
        px.put()
    with raises_code(E.EDVSNOTBIND):                # an unbound thread
        world.actor().call(d.put2lcl, px.header(), px.rpay)
    a = bound(world, d, LSYS2)
    with raises_code(E.EDVSBADCALL):                # a bound process
        a.call(d.put2lcl, px.header(), px.rpay)
    with raises_code(E.EDVSBADCALL):                # the sender proxy
        px.sproxy.call(d.put2lcl, px.header(), px.spay)
    d.proxy_conn(2, C.CONNECT_RPROXY)
    assert px.put() == 0                            # LSYS is not receiving: queued


def test_remote_send_makes_header_and_waits_for_ack(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    fut = L.submit(d.send, RSYS, msg(m_source=5, m_type=0x42, m1_i1=7))
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_SEND_MSG, c_dcid=DC0, c_src=LSYS, c_dst=RSYS, c_snode=1,
              c_dnode=2, c_rcode=0, c_len=0, c_pid=L.tid, c_flags=0, c_batch_nr=0)
    assert (h.c_msg.m_source, h.c_msg.m_type, h.c_msg.m1_i1) == (LSYS, 0x42, 7)
    assert h.c_tv_sec > 0
    assert len(bytes(h)) == HEADER_SIZE
    assert not fut.done()                           # until the SEND_ACK
    assert d.getnodeinfo(2).n_pxsent == 1
    assert px.put(c_cmd=C.CMD_SEND_ACK, c_src=RSYS, c_dst=LSYS) == 0
    assert fut.result(5) == 0
    # an error ACK fails the send with its code
    fut = L.submit(d.send, RSYS, Message())
    px.get()
    px.put(c_cmd=C.CMD_SEND_ACK, c_src=RSYS, c_dst=LSYS, c_rcode=E.EDVSDSTDIED)
    assert error_of(fut) == E.EDVSDSTDIED
    assert node.slot(LSYS).rts == 0


def test_remote_sendrec_reply_and_ackdst_quirk(env):
    d, px, U = env.d, env.px, env.U
    req = msg(m_type=3)
    fut = U.submit(d.sendrec, RSYS, req)
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_SNDREC_MSG, c_src=LUSR, c_dst=RSYS, c_pid=U.tid)
    # an error SEND_ACK aimed at a sendrec caller is refused (a module quirk the DSP relies on)
    with raises_code(E.EDVSACKDST):
        px.put(c_cmd=C.CMD_SEND_ACK, c_src=RSYS, c_dst=LUSR, c_rcode=E.EDVSDSTDIED)
    assert not fut.done()
    # the reply: a SEND_MSG to the waiting caller, acknowledged by the kernel
    assert px.put(c_cmd=C.CMD_SEND_MSG, c_src=RSYS, c_dst=LUSR, m_type=4, m1_i1=99) == \
        MESSAGE_SIZE
    fut.result(5)
    assert (req.m_source, req.m_type, req.m1_i1) == (RSYS, 4, 99)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LUSR, c_dst=RSYS, c_rcode=0, c_dnode=2,
              c_pid=U.tid)
    # a SNDREC_ACK ends a sendrec with its code (what the DSP sends for it)
    fut = U.submit(d.sendrec, RSYS, Message())
    px.get()
    assert px.put(c_cmd=C.CMD_SNDREC_ACK, c_src=RSYS, c_dst=LUSR,
                  c_rcode=E.EDVSDSTDIED) == 0
    assert error_of(fut) == E.EDVSDSTDIED
    # a REPLY_MSG is acknowledged too
    fut = U.submit(d.sendrec, RSYS, Message())
    px.get()
    px.put(c_cmd=C.CMD_REPLY_MSG, c_src=RSYS, c_dst=LUSR, m_type=5)
    fut.result(5)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LUSR, c_dst=RSYS, c_rcode=0)


def test_remote_notify_leaves_on_pickup(env):
    d, px, L = env.d, env.px, env.L
    fut = L.submit(d.notify, RSYS)
    h = px.get()
    assert fut.result(5) == 0                       # unblocked when the proxy took it
    check_hdr(h, c_cmd=C.CMD_NTFY_MSG, c_src=LSYS, c_dst=RSYS, c_rcode=-1)
    assert (h.c_msg.m_source, h.c_msg.m_type) == (LSYS, C.NOTIFY_FROM(LSYS))
    fut = L.submit(d.ntfy_value, LSYS, RSYS, 3)
    check_hdr(px.get(), c_cmd=C.CMD_NTFY_MSG, c_rcode=3)
    assert fut.result(5) == 0
    px.assert_nothing()                             # no ACK for a notify, ever


def test_remote_vcopy_one_chunk_each_way(env):
    d, px, L = env.d, env.px, env.L
    buf = d.alloc(3000)
    data = os.urandom(3000)
    buf.write(data)
    fut = L.submit(d.vcopy, C.SELF, buf.addr, RSYS, 0x20000000, 3000)       # L -> R
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_COPYIN_DATA, c_src=LSYS, c_dst=RSYS, c_len=3000, v_src=LSYS,
              v_dst=RSYS, v_rqtr=LSYS, v_saddr=buf.addr, v_daddr=0x20000000, v_bytes=3000)
    assert px.spay.read(3000) == data
    assert d.getprocinfo(DC0, LSYS).p_rts_flags & C.ONCOPY
    px.put(c_cmd=C.CMD_COPYIN_ACK, c_src=RSYS, c_dst=LSYS, v_dst=RSYS, v_rqtr=LSYS)
    assert fut.result(5) == 0
    into = d.alloc(3000)
    fut = L.submit(d.vcopy, RSYS, 0x20000000, C.SELF, into.addr, 3000)      # R -> L
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_COPYOUT_RQST, c_src=LSYS, c_dst=RSYS, c_len=0, v_src=RSYS,
              v_dst=LSYS, v_daddr=into.addr, v_bytes=3000)
    px.put(payload=data[::-1], c_cmd=C.CMD_COPYOUT_DATA, c_src=RSYS, c_dst=LSYS,
           c_len=3000, v_src=RSYS, v_dst=LSYS, v_rqtr=LSYS, v_daddr=into.addr, v_bytes=3000)
    assert fut.result(5) == 0
    assert into.read() == data[::-1]
    assert d.getprocinfo(DC0, LSYS).p_rmtcopy == 2


def test_three_node_vcopy_is_not_emulated(env):
    buf = env.d.alloc(16)
    with raises_code(E.EDVSNOSYS):
        env.L.call(env.d.vcopy, RSYS, buf.addr, RSYS3, buf.addr, 16)


def test_remote_request_needs_connected_sender(env):
    d, px, L = env.d, env.px, env.L
    fut = L.submit(d.send, RSYS, Message())        # queued on the sender proxy
    wait_rts(env.node, LSYS, C.RMTOPER)
    d.proxy_conn(2, C.DISCONNECT_SPROXY)            # the queue is flushed
    assert error_of(fut) == E.EDVSNOTCONN
    with raises_code(E.EDVSNOTCONN):
        L.call(d.send, RSYS, Message())
    h, gfut = px.get_async()                        # a proxy in get2rmt is woken too
    assert error_of(gfut) == E.EDVSNOTCONN
    d.proxy_conn(2, C.CONNECT_SPROXY)
    h, gfut = px.get_async()
    time.sleep(0.1)
    d.proxy_conn(2, C.DISCONNECT_SPROXY)
    assert error_of(gfut) == E.EDVSNOTCONN


def test_disconnect_rproxy_wakes_waiters(env):
    d, px, L, U, node = env.d, env.px, env.L, env.U, env.node
    sfut = L.submit(d.send, RSYS, Message())        # waiting for a SEND_ACK
    px.get()
    cfut = U.submit(d.sendrec, RSYS, Message())     # waiting for a reply
    px.get()
    _m, rfut = receive_async(env.A, d, RSYS3)      # waiting for node 3
    wait_rts(node, LSYS2, C.RECEIVING)
    d.proxy_conn(2, C.DISCONNECT_RPROXY)
    assert error_of(sfut) == E.EDVSNOTCONN
    assert error_of(cfut) == E.EDVSNOTCONN
    assert error_of(rfut) == E.EDVSNOTCONN
    with raises_code(E.EDVSNOTCONN):                # receive from a node with no receiver
        env.A.call(d.receive, RSYS, Message())


def test_get2rmt_reports_node_not_in_dc(env):
    d, px, L = env.d, env.px, env.L
    fut = L.submit(d.send, RSYS, Message())
    wait_rts(env.node, LSYS, C.RMTOPER)
    d.del_node(DC0, 2)
    with raises_code(E.EDVSNODCNODE):
        px.get()
    assert error_of(fut) == E.EDVSNODCNODE


# ----------------------------------------------------------------------------- put2lcl success
def test_put2lcl_send_to_waiting_and_queued_receiver(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    m, fut = receive_async(L, d)
    wait_rts(node, LSYS, C.RECEIVING)
    h = px.header(m_type=0x31, m1_i1=5)
    h.c_msg.m_source = 4242                         # delivered verbatim: not rewritten
    assert px.put(hdr=h) == MESSAGE_SIZE
    fut.result(5)
    assert (m.m_source, m.m_type, m.m1_i1) == (4242, 0x31, 5)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_dcid=DC0, c_src=LSYS, c_dst=RSYS, c_snode=1,
              c_dnode=2, c_rcode=0, c_len=0, c_pid=L.tid)
    assert d.getnodeinfo(2).n_pxrcvd == 1
    # not receiving: queued; the ACK leaves when the message is received
    assert px.put(m_type=0x32) == 0
    assert node.slot(RSYS).rts & C.SENDING
    px.assert_nothing()
    L.call(d.receive, RSYS, m)
    assert m.m_type == 0x32
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LSYS, c_dst=RSYS, c_rcode=0)


def test_put2lcl_sndrec_then_local_reply(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    m, fut = receive_async(L, d)
    wait_rts(node, LSYS, C.RECEIVING)
    assert px.put(c_cmd=C.CMD_SNDREC_MSG, m_type=9) == MESSAGE_SIZE
    fut.result(5)
    assert m.m_type == 9
    px.assert_nothing()                             # a sendrec is answered, not acked
    assert node.slot(RSYS).rts & C.RECEIVING
    sfut = L.submit(d.send, RSYS, msg(m_type=10))
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_SEND_MSG, c_src=LSYS, c_dst=RSYS)
    assert h.c_msg.m_type == 10 and h.c_msg.m_source == LSYS
    assert not sfut.done()
    px.put(c_cmd=C.CMD_SEND_ACK, c_src=RSYS, c_dst=LSYS)
    assert sfut.result(5) == 0
    # queued sendrec: received later, still no ACK
    assert px.put(c_cmd=C.CMD_SNDREC_MSG, m_type=11) == 0
    L.call(d.receive, C.ANY, m)
    assert m.m_type == 11
    px.assert_nothing()


def test_put2lcl_notify(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    assert px.put(c_cmd=C.CMD_NTFY_MSG, m_type=C.NOTIFY_FROM(RSYS), c_rcode=-1) == 0
    assert node.slot(LSYS).misc & C.MIS_NOTIFY
    m = Message()
    L.call(d.receive, C.ANY, m)
    assert (m.m_source, m.m_type) == (RSYS, C.NOTIFY_FROM(RSYS))
    px.assert_nothing()
    m, fut = receive_async(L, d)
    wait_rts(node, LSYS, C.RECEIVING)
    assert px.put(c_cmd=C.CMD_NTFY_MSG, m_type=C.NOTIFY_FROM(RSYS)) == MESSAGE_SIZE
    fut.result(5)
    assert m.m_type == C.NOTIFY_FROM(RSYS)
    px.assert_nothing()


def test_put2lcl_copyin_and_copyout(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    buf = d.alloc(5000)
    _m, fut = receive_async(L, d)
    wait_rts(node, LSYS, C.RECEIVING)
    data = os.urandom(5000)
    assert px.put(payload=data, c_cmd=C.CMD_COPYIN_DATA, c_len=5000, v_src=RSYS, v_dst=LSYS,
                  v_rqtr=RSYS, v_saddr=0x30000000, v_daddr=buf.addr, v_bytes=5000) == 5000
    assert buf.read() == data
    check_hdr(px.get(), c_cmd=C.CMD_COPYIN_ACK, c_src=LSYS, c_dst=RSYS, c_rcode=0, c_len=0,
              v_dst=LSYS, v_rqtr=RSYS)
    # COPYOUT_RQST: the data leaves with the COPYOUT_DATA that get2rmt builds
    assert px.put(c_cmd=C.CMD_COPYOUT_RQST, c_dst=LSYS, v_src=LSYS, v_dst=RSYS,
                  v_rqtr=RSYS, v_saddr=buf.addr, v_daddr=0x30000000, v_bytes=4000) == 0
    assert node.slot(LSYS).rts & C.ONCOPY
    # while the source is on copy, a local vcopy of it is refused (EDVSBUSY)
    with raises_code(E.EDVSBUSY):
        env.A.call(d.vcopy, LSYS, buf.addr, C.SELF, buf.addr, 16)
    h = px.get()
    check_hdr(h, c_cmd=C.CMD_COPYOUT_DATA, c_src=LSYS, c_dst=RSYS, c_rcode=0, c_len=4000,
              v_bytes=4000, v_daddr=0x30000000)
    assert px.spay.read(4000) == data[:4000]
    assert not node.slot(LSYS).rts & C.ONCOPY
    assert not fut.done()


def test_put2lcl_copyout_rqst_to_running_process(env):
    px, buf = env.px, env.d.alloc(16)
    with raises_code(E.EDVSPROCSTS):
        px.put(c_cmd=C.CMD_COPYOUT_RQST, c_dst=LSYS, v_src=LSYS, v_dst=RSYS, v_rqtr=RSYS,
               v_saddr=buf.addr, v_bytes=16)
    check_hdr(px.get(), c_cmd=C.CMD_COPYOUT_DATA, c_rcode=E.EDVSPROCSTS, c_len=0,
              c_src=LSYS, c_dst=RSYS)


def test_vcopy_with_queued_remote_party_is_busy(env):
    d, px, L, node = env.d, env.px, env.L, env.node
    _m, fut = receive_async(L, d)
    wait_rts(node, LSYS, C.RECEIVING)
    px.put()                                       # delivered: a SEND_ACK is queued on RSYS
    fut.result(5)
    assert node.slot(RSYS).rts & C.RMTOPER
    buf = d.alloc(16)
    with raises_code(E.EDVSBUSY):
        env.A.call(d.vcopy, RSYS, 0x30000000, C.SELF, buf.addr, 16)
    px.get()


# ----------------------------------------------------------------------------- put2lcl rows

# id, header fields, error, expected ACK (c_cmd, c_src, c_dst, c_pid) or None


def check_row(env, fields: dict, code: int, ack) -> None:
    px = env.px
    with raises_code(code):
        px.put(**fields)
    if ack is None:
        px.assert_nothing()
        return
    cmd, src, dst, pid = ack
    pid = {U_PID: env.U.tid, L_PID: env.L.tid}.get(pid, pid)
    h = px.get()
    check_hdr(h, c_cmd=cmd, c_rcode=code, c_src=src, c_dst=dst, c_dcid=fields.get("c_dcid", DC0),
              c_snode=1, c_dnode=2, c_len=0, c_pid=pid, c_flags=0)
    px.assert_nothing()


@pytest.mark.parametrize("row", PUT2LCL_ROWS, ids=[r[0] for r in PUT2LCL_ROWS])
def test_put2lcl_check_table(env, row):
    _id, fields, code, ack = row
    check_row(env, fields, code, ack)


def test_put2lcl_row11_src_already_sending(env):
    px, L = env.px, env.L
    assert px.put(m_type=1) == 0                    # LSYS not receiving: RSYS is SENDING
    check_row(env, dict(m_type=2), E.EDVSENQUEUED, None)
    m = Message()
    L.call(env.d.receive, C.ANY, m)
    assert m.m_type == 1                            # the first message is intact
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_rcode=0)


def test_put2lcl_row11_src_has_queued_command(env):
    px = env.px
    with raises_code(E.EDVSDSTDIED):                # leaves an error ACK queued on RSYS
        px.put(c_dst=FREE_EP)
    assert env.node.slot(RSYS).rts & C.RMTOPER
    with raises_code(E.EDVSENQUEUED):
        px.put(c_cmd=C.CMD_SNDREC_MSG)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_rcode=E.EDVSDSTDIED)   # only the first
    px.assert_nothing()


def test_put2lcl_row15_dst_migrating(env):
    """No call makes a process MIGRATING (migration is not emulated): the flag is set by hand."""
    k = env.node.kernel
    with k.lock:
        env.node.slot(LSYS).rts |= C.MIGRATING
    try:
        check_row(env, {}, E.EDVSMIGRATE, (C.CMD_SEND_ACK, LSYS, RSYS, L_PID))
    finally:
        with k.lock:
            env.node.slot(LSYS).rts &= ~C.MIGRATING


@pytest.mark.parametrize("cmd, ack", [
    (C.CMD_SEND_MSG, C.CMD_SEND_ACK),
    (C.CMD_SNDREC_MSG, C.CMD_SEND_ACK),
    (C.CMD_REPLY_MSG, C.CMD_SEND_ACK),
    (C.CMD_NTFY_MSG, C.CMD_SEND_ACK),
    (C.CMD_COPYIN_DATA, C.CMD_COPYIN_ACK),
    (C.CMD_COPYOUT_RQST, C.CMD_COPYOUT_DATA),
    (C.CMD_COPYLCL_RQST, C.CMD_COPYLCL_ACK),
    (C.CMD_COPYRMT_RQST, C.CMD_COPYRMT_ACK),
    (C.CMD_COPYIN_RQST, C.CMD_COPYRMT_ACK),
], ids=lambda v: C.CMD_NAMES.get(v, str(v)))
def test_put2lcl_error_ack_per_command(env, cmd, ack):
    """Row 13 (destination not bound) for each request: the matching error ACK goes back."""
    check_row(env, dict(c_cmd=cmd, c_dst=FREE_EP, v_rqtr=RSYS, v_bytes=0),
              E.EDVSDSTDIED, (ack, FREE_EP, RSYS, -1))


def test_put2lcl_error_ack_needs_connected_sender(env):
    """"ACK sent back" only when the sender proxy towards c_snode is connected."""
    env.d.proxy_conn(2, C.DISCONNECT_SPROXY)
    with raises_code(E.EDVSDSTDIED):
        env.px.put(c_dst=FREE_EP)
    assert not env.node.slot(RSYS).rts & C.RMTOPER
    env.d.proxy_conn(2, C.CONNECT_SPROXY)
    env.px.assert_nothing()


def test_put2lcl_copyrmt_is_not_emulated(env):
    """3-node copies: COPYRMT_RQST / COPYIN_RQST that pass the checks are refused."""
    _m, fut = receive_async(env.L, env.d)
    wait_rts(env.node, LSYS, C.RECEIVING)
    with raises_code(E.EDVSBADREQUEST):
        env.px.put(c_cmd=C.CMD_COPYRMT_RQST, v_rqtr=RSYS, v_src=LSYS, v_dst=RSYS3)


def test_concurrent_clients_do_not_mix_replies(world, d, node):
    """Several threads in sendrec with one server: each gets its own answer."""
    srv = bound(world, d, LSYS)
    clients = [bound(world, d, LUSR + i) for i in range(4)]
    stop = threading.Event()

    def serve():
        m = Message()
        while not stop.is_set():
            try:
                d.receive(C.ANY, m, 200)
            except E.DvkError:
                continue
            d.reply(m.m_source, msg(m_type=m.m_type + 1000))

    sfut = srv.submit(serve)
    futs = []
    for i, c in enumerate(clients):
        for j in range(20):
            futs.append((c.submit(_sendrec_value, d, LSYS, i * 100 + j), i * 100 + j))
    for fut, v in futs:
        assert fut.result(20) == v + 1000
    stop.set()
    sfut.result(5)


def _sendrec_value(d, ep: int, value: int) -> int:
    m = msg(m_type=value)
    d.sendrec(ep, m)
    return m.m_type


def test_disconnect_rproxy_drops_a_woken_callers_queued_request(env):
    """A sendrec caller still in the sender FIFO is woken by DISCONNECT_RPROXY; its request
    must leave the FIFO with it (else it is shipped later for a caller who gave up, and the
    caller's next remote call fails with EDVSENQUEUED)."""
    d, px, U, node = env.d, env.px, env.U, env.node
    fut = U.submit(d.sendrec, RSYS, Message())
    wait_rts(node, LUSR, C.RMTOPER)                 # queued, not taken by the proxy yet
    d.proxy_conn(2, C.DISCONNECT_RPROXY)
    assert error_of(fut) == E.EDVSNOTCONN
    assert node.slot(LUSR).rts == 0
    px.assert_nothing()
    d.proxy_conn(2, C.CONNECT_RPROXY)
    fut = U.submit(d.sendrec, RSYS, msg(m_type=2))  # the retry goes out
    check_hdr(px.get(), c_cmd=C.CMD_SNDREC_MSG, c_src=LUSR)
    px.put(c_cmd=C.CMD_SEND_MSG, c_src=RSYS, c_dst=LUSR)
    fut.result(5)


@pytest.mark.parametrize("cmd", [C.CMD_SEND_MSG, C.CMD_SNDREC_MSG])
def test_link_down_drops_a_message_parked_from_the_node(env, cmd):
    """A message from a remote process parked on a local one that was not receiving is
    dropped when the link to its node goes down (its sender was woken with EDVSNOTCONN by its
    own node): kept, every later request of that process was refused with EDVSENQUEUED."""
    d, px, L, node = env.d, env.px, env.L, env.node
    assert px.put(c_cmd=cmd, m_type=0x41) == 0      # L is not receiving: parked on RSYS
    assert node.slot(RSYS).rts & (C.REMOTE | C.SENDING) == C.REMOTE | C.SENDING
    d.proxy_conn(2, C.DISCONNECT_SPROXY)
    d.proxy_conn(2, C.DISCONNECT_RPROXY)
    rsys = node.slot(RSYS)
    assert (rsys.rts, rsys.misc & C.MIS_ATOMIC, rsys.sendto, rsys.getfrom) == \
        (C.REMOTE, 0, C.NONE, C.NONE)
    assert not node.slot(LSYS).senders
    d.proxy_conn(2, C.CONNECT_SPROXY)
    d.proxy_conn(2, C.CONNECT_RPROXY)
    assert px.put(m_type=0x42) == 0                 # the next request is accepted, parked
    m = Message()
    L.call(d.receive, RSYS, m)
    assert m.m_type == 0x42                         # the dropped message is never received
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LSYS, c_dst=RSYS, c_rcode=0)


def test_unbind_of_other_process_takes_it_out_of_queues(world, d, node):
    """The target of an unbind is woken with EDVSSHUTDOWN; if it survives the SIGTERM its
    interrupted send must not be delivered later (nor wake it again)."""
    rcv = bound(world, d, LSYS)
    child = world.child(node, 15, "send_noterm", LSYS)
    child.expect("READY")
    wait_rts(node, 15, C.SENDING)
    a = bound(world, d, LSYS2)
    with raises_code(E.EDVSAGAIN):
        a.call(d.unbind, DC0, 15, C.TIMEOUT_NOWAIT)
    assert child.expect("SENT") == f"SENT {E.EDVSSHUTDOWN}"
    assert node.slot(15).rts == 0                   # still bound (SIGTERM ignored), idle
    with raises_code(E.EDVSAGAIN):
        rcv.call(d.receive, C.ANY, Message(), C.TIMEOUT_NOWAIT)


def test_sendrec_restart_case(world, d, node):
    """sendrec to a process that is itself queued sending to the caller takes its message
    as the reply."""
    a, b = bound(world, d, LSYS), bound(world, d, LSYS2)
    fb = b.submit(d.send, LSYS, msg(m_type=21))
    wait_rts(node, LSYS2, C.SENDING)
    m = msg(m_type=20)
    a.call(d.sendrec, LSYS2, m, 5000)
    assert (m.m_source, m.m_type) == (LSYS2, 21)
    assert fb.result(5) == 0


def test_rcvrqst_takes_requests_not_notifications(env):
    d, px, L = env.d, env.px, env.L
    env.A.call(d.notify, LSYS)
    assert px.put(m_type=0x61) == 0                # a remote plain send, queued
    m = Message()
    L.call(d.rcvrqst, m)
    assert (m.m_source, m.m_type) == (RSYS, 0x61)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LSYS, c_dst=RSYS, c_rcode=0)
    with raises_code(E.EDVSAGAIN):
        L.call(d.rcvrqst, m, C.TIMEOUT_NOWAIT)      # the notify is not a request
    L.call(d.receive, C.ANY, m, C.TIMEOUT_NOWAIT)
    assert m.m_type == C.NOTIFY_FROM(LSYS2)


def test_proxy_process_exit_ends_the_node(world, node, d):
    """The proxies' connections close (their process exits): the pair is freed, waiters for
    the node get EDVSNOTCONN, its remote endpoints are unbound (proxies_unbind)."""
    dp = world.dvk(node)                            # the "proxy process"
    px = FakeProxy(world, node, dp, 2)
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    L = bound(world, d, LSYS)
    fut = L.submit(d.send, RSYS, Message())
    px.get()                                        # L now waits for the SEND_ACK
    dp.close()                                      # the proxies are idle: connections close
    assert error_of(fut) == E.EDVSNOTCONN
    wait_until(lambda: d.getnodeinfo(2).n_flags == C.NODE_FREE)
    assert d.getprocinfo(DC0, RSYS).p_rts_flags == C.SLOT_FREE
    with raises_code(E.EDVSPROXYFREE):
        d.getproxyinfo(2)


def test_unbind_sends_error_acks_to_remote_partners(env):
    """do_unbind: queued remote senders get SEND_ACK(EDVSDSTDIED), or EDVSDEADSRCDST
    for a sendrec; a remote waiting for a reply gets SEND_ACK(EDVSSRCDIED)."""
    d, px, L, A, node = env.d, env.px, env.L, env.A, env.node
    assert px.put(m_type=1) == 0                                            # RSYS: send
    assert px.put(c_cmd=C.CMD_SNDREC_MSG, c_src=RSYS3, c_snode=3) == 0      # RSYS3: sendrec
    L.call(d.unbind, DC0, LSYS)
    acks = sorted([px.get(), px.get()], key=lambda h: h.c_dst)
    check_hdr(acks[0], c_cmd=C.CMD_SEND_ACK, c_src=LSYS, c_dst=RSYS, c_dnode=2,
              c_rcode=E.EDVSDSTDIED)
    check_hdr(acks[1], c_cmd=C.CMD_SEND_ACK, c_src=LSYS, c_dst=RSYS3, c_dnode=3,
              c_rcode=E.EDVSDEADSRCDST)
    px.assert_nothing()
    assert node.slot(RSYS).rts == C.REMOTE and node.slot(RSYS3).rts == C.REMOTE
    _m, fut = receive_async(A, d)
    wait_rts(node, LSYS2, C.RECEIVING)
    assert px.put(c_cmd=C.CMD_SNDREC_MSG, c_dst=LSYS2) == MESSAGE_SIZE
    fut.result(5)
    A.call(d.unbind, DC0, LSYS2)
    check_hdr(px.get(), c_cmd=C.CMD_SEND_ACK, c_src=LSYS2, c_dst=RSYS, c_rcode=E.EDVSSRCDIED)


def test_dc_end_and_dvs_end(world, d, node):
    """dc_end SIGTERMs the DC's local processes (not the node kernel's own) and unbinds them;
    a caller blocked in the DC is woken with EDVSSHUTDOWN."""
    child = world.child(node, 15, "sleep")
    child.expect("READY")
    _a, _m, fut = blocked_receiving(world, node, d, LSYS)
    assert d.dc_end(DC0) == 0
    assert error_of(fut) == E.EDVSSHUTDOWN
    assert child.proc.wait(10) == -signal.SIGTERM
    assert d.getdcinfo(DC0).dc_flags == C.DC_FREE
    assert d.getnodeinfo(-1).n_dcs == 0
    assert d.dvs_end() == 0
    assert d.getdvsinfo()[0] == C.DVS_NO_INIT
    assert d.dvs_init(1) == 1
