"""Local clients' sessions in the compiled code (dsp_proxy/fastpath.py `LbPump`, the
`Receiver`'s LB rule; fastrelay.c `rt_lb_send_pump`, `lb_rewrite`): on a client node that
balances its own clients, the get2rmt thread's commands are rewritten and written to the
server's link in C, and the server's replies are rewritten and put by the link's receiver.

A cluster runs the same latency loop and m3ftp transfers through the LB node twice, with the
compiled code and with DSP_FASTPATH=0: the programs get the same results and the client node
counts the same traffic per link and per server, while the status shows the sessions handed
over.  Then the deliverer's rule on its own, against a kernel that records each put2lcl: a
server's reply in a handed-over session is rewritten to come from the LB node; while the
put2lcl thread holds any frame of the LB node's traffic the reply is left to the router; a
put2lcl that does not plainly succeed goes to the put2lcl thread, rewritten, with its code.
"""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from test_fastpath_node import LOOP_RE, _Kernel, _settled_links, latency, sha
from test_lb import wait_status

from cluster_helpers import Background, cluster_from, wait_bound
from dsp_proxy import fastpath
from dsp_proxy.cluster import module_argv
from dsp_proxy.group import SERVER_GONE, SERVICE_DOWN
from dsp_proxy.link import Link, PeerSpec
from dsp_proxy.misc import Counters
from dsp_proxy.rproxy import Put2lclThread
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, Header, Message, make_header
from emu_helpers import DC0, SHORT, FakeProxy, make_world, wait_until

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled code is not built")

#: One server, one client node that balances its own clients (no LB host): every session is
#: a local client's, and every choice of server is the same in both runs.
LOCAL_LB = """
lb node0 { nodeid 0; period 1; session_timeout 60; };
server node1 { nodeid 1; rname {net}.1; };
client node3 { nodeid 3; rname {net}.3; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
service m3ftp { dcid 0; ext_ep 20; min_ep 20; max_ep 28; bind external; };
"""
CLT, SRV = 3, 1


def _group_figures(st: dict) -> dict:
    """The client node's group figures that do not depend on timing."""
    g = st["group"]
    return {"servers": {n: (s["sessions"], s["commands"], s["bytes"])
                        for n, s in g["servers"].items()},
            **{k: g.get(k) for k in ("sessions_started", "sessions_ended", "errors",
                                     "refused", "no_service")}}


def _through_the_lb(tmp_path, bg, tag: str) -> tuple[dict, dict, list[str]]:
    """A latency loop, a held latency session and an m3ftp put and get from node 3 through
    the LB node: (node 3's settled link figures, its group figures, what the programs and the
    status said that does not depend on timing)."""
    work = tmp_path / tag
    work.mkdir()
    with cluster_from(LOCAL_LB, work) as cl:
        b = Background(cl, work)
        bg.append(b)
        srvdir = work / "srv"
        srvdir.mkdir()
        b.start(SRV, "dvs_apps.latency", "server", 0, 10)
        b.start(SRV, "dvs_apps.m3ftp", "server", 0, 20, env={"M3FTPD_DIR": str(srvdir)})
        wait_bound(cl, SRV, 0, 10)
        wait_bound(cl, SRV, 0, 20)
        res = latency(cl, CLT, 50, 10, 40)
        assert res.returncode == 0, res.stdout + res.stderr
        said = [f"latency loops {[int(i) for i, _ in LOOP_RE.findall(res.stdout)]}"]
        # a client that keeps its session while the status is read (a loop a second)
        held = cl.popen(CLT, module_argv("dvs_apps.latency", "client", 0, 51, 10, 4, 1, 0))
        try:
            seen = 0            # the most sessions the status showed handed over
            deadline = time.monotonic() + 60
            while held.poll() is None and time.monotonic() < deadline:
                seen = max(seen, (cl.status(CLT).get("group") or {}).get("fast_sessions", 0))
                time.sleep(0.2)
            said.append(f"handed over {seen > 0}")
            assert held.wait(10) == 0
        finally:
            if held.poll() is None:
                held.kill()
                held.wait(10)
        src = work / "put.dat"
        src.write_bytes(bytes((i * 31 + 7) & 0xFF for i in range(1 << 20)))
        put = cl.run(CLT, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, "remote.dat",
                                      str(src)), timeout=120)
        assert put.returncode == 0, put.stdout + put.stderr
        back = work / "get.dat"
        get = cl.run(CLT, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, "remote.dat",
                                      str(back)), timeout=120)
        assert get.returncode == 0, get.stdout + get.stderr
        said += [f"put {sha(srvdir / 'remote.dat') == sha(src)}",
                 f"get {sha(back) == sha(src)}", f"verified {'verified' in get.stdout}"]
        links = _settled_links(cl, nodes=(CLT,))
        st = wait_status(cl, CLT, lambda s: not s["group"]["sessions"], timeout=30,
                         what="every session ended")
        return links, _group_figures(st), said


def test_local_clients_sessions_count_the_same_traffic_with_and_without_the_compiled_code(
        tmp_path, bg, monkeypatch):
    """The same programs through the LB node of a client node, with the compiled code (the
    held session is handed over: the status counts it in `fast_sessions`) and with
    DSP_FASTPATH=0 (it never is): the same results, and node 3 counts the same frames,
    commands, bytes and DC figures on its link to the server and the same sessions,
    commands and bytes per server."""
    monkeypatch.delenv(fastpath.ENV, raising=False)
    fast_links, fast_group, fast_said = _through_the_lb(tmp_path, bg, "fast")
    monkeypatch.setenv(fastpath.ENV, "0")
    py_links, py_group, py_said = _through_the_lb(tmp_path, bg, "python")
    common = ["latency loops " + str(list(range(40)))]
    tail = ["put True", "get True", "verified True"]
    assert fast_said == common + ["handed over True"] + tail
    assert py_said == common + ["handed over False"] + tail
    assert fast_links == py_links
    assert fast_group == py_group
    assert fast_group["servers"][str(SRV)][2] > 1 << 20, fast_group   # the file's bytes too


# ================================================================================ the deliverer
PEER, LOCAL, LB_ID = 2, 1, 0
CLIENT, SERVICE, SERVER_EP = 50, 10, 12      # the server's endpoint of the client's session


@pytest.fixture
def lb_rig():
    """A node-1 table with client 50's session handed over (server node 2, SERVICE addressed
    as SERVER_EP there), node 2 marked as serving it, and a compiled deliverer on node 2's
    link whose LB node traffic goes to `done` when its put2lcl does not plainly succeed."""
    table = fastpath.FlowTable(LOCAL, LB_ID, C.NR_NODES, C.NR_DCS, SERVER_GONE | SERVICE_DOWN)
    table.set_dc(0, (C.NR_TASKS, C.NR_PROCS))
    table.set_raw_ok(PEER, True)
    table.set_reverse(PEER, True)
    sess = SimpleNamespace(clt_node=LOCAL, svr_node=PEER, dcid=0, clt_ep=CLIENT,
                           lbsvr_ep=CLIENT, clt_pid=0, svr_pid=0, pending=C.CMD_SNDREC_MSG,
                           to_server={SERVICE: SERVER_EP})
    sid = table.give(sess)
    assert sid >= 0
    payload = SimpleNamespace(addr=1 << 20, view=memoryview(bytearray(C.MAXCOPYBUF)))
    kernel = _Kernel(payload)
    answering = threading.Thread(target=kernel.answer, daemon=True)
    answering.start()
    buf = bytearray(HEADER_SIZE + C.MAXCOPYBUF)
    reader = SimpleNamespace(buf=buf, view=memoryview(buf), start=0, end=0,
                             has_frame=lambda: reader.end - reader.start >= HEADER_SIZE)
    link = SimpleNamespace(peer=PEER, spec=SimpleNamespace(autobind=True),
                           received=Counters(), last_rx=0.0)
    done: list[tuple[Header, bytes, int]] = []
    deliverer = SimpleNamespace(payload=payload, parked={})
    receiver = fastpath.Receiver(table, reader, link, kernel, deliverer,
                                 lambda h, data, code: done.append((h, data, code)))

    def feed(*frames: bytes) -> bool:
        data = b"".join(frames)
        buf[:len(data)] = data
        reader.start, reader.end = 0, len(data)
        return receiver()

    yield SimpleNamespace(table=table, sid=sid, kernel=kernel, reader=reader, feed=feed,
                          done=done, link=link, receiver=receiver)
    kernel.theirs.close()
    answering.join(10)
    kernel.mine.close()
    table.free()


def _reply(m_source: int = SERVER_EP, m1_i1: int = 0, **fields) -> bytes:
    """The server's reply to client 50 in the session, as node 2 sends it."""
    base = dict(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=SERVER_EP, c_dst=CLIENT, c_snode=PEER,
                c_dnode=LOCAL)
    base.update(fields)
    h = make_header(**base)
    m = h.c_msg
    m.m_source, m.m_type, m.m1_i1 = m_source, 0x0B, m1_i1
    return bytes(h.buf)


def test_a_servers_reply_is_rewritten_to_come_from_the_lb_node_and_put(lb_rig):
    """The reply is put with the LB node as its source node and the endpoint the client
    addressed as its source (also in the message), CHECK_HDR cleared; the session's pending
    sendrec is answered, and the frame counts as received from the server."""
    assert not lb_rig.feed(_reply(c_flags=C.FLAG_CHECK_HDR))
    ((put, data),) = lb_rig.kernel.calls
    h = Header(bytearray(put))
    assert data == b""
    assert (h.c_snode, h.c_dnode, h.c_src, h.c_dst) == (LB_ID, LOCAL, SERVICE, CLIENT)
    assert h.c_msg.m_source == SERVICE
    assert not h.c_flags & C.FLAG_CHECK_HDR
    assert lb_rig.table.take(lb_rig.sid, False)[:2] == (0, 1)    # nothing pending, one use
    assert not lb_rig.done
    lb_rig.receiver.fold_received()
    assert lb_rig.link.received.frames == 1


def test_while_the_put2lcl_thread_holds_a_frame_the_reply_is_left_to_the_router(lb_rig):
    """One frame held by the put2lcl thread (queued, being put or parked): a reply put now
    could overtake it, so the deliverer leaves it, unchanged, to the Python path; once the
    thread holds none, the next reply is put in C again."""
    frame = _reply()
    lb_rig.table.lb_backlog(1)
    assert lb_rig.feed(frame)
    assert not lb_rig.kernel.calls and lb_rig.reader.start == 0
    assert bytes(lb_rig.reader.view[:HEADER_SIZE]) == frame
    lb_rig.table.lb_backlog(-1)
    assert not lb_rig.feed(frame)
    assert len(lb_rig.kernel.calls) == 1


@pytest.mark.parametrize("frame", [
    _reply(c_src=SERVER_EP + 1, m_source=SERVER_EP + 1),    # another endpoint of node 2
    _reply(c_cmd=C.CMD_SEND_ACK, c_rcode=E.EDVSDSTDIED),     # the server's program died
    _reply(c_pid=4242),                                      # another server process
], ids=["no-session", "server-gone", "new-server-pid"])
def test_frames_outside_a_handed_over_session_are_left_to_the_router(lb_rig, frame):
    """A frame of node 2 that is not plain traffic of a session handed over (the router
    ends the session, or learns the server's process) goes to the Python path as it came."""
    assert lb_rig.feed(frame)
    assert not lb_rig.kernel.calls
    assert bytes(lb_rig.reader.view[:HEADER_SIZE]) == frame


def test_a_put2lcl_that_fails_goes_to_the_put2lcl_thread_rewritten(lb_rig):
    """The kernel refuses the reply (EDVSENQUEUED: the LB node's descriptor is busy): the
    frame, rewritten, goes with that code to the put2lcl thread, which parks or repairs the
    LB node's traffic in order; the deliverer's own repairs are not used."""
    lb_rig.kernel.result = E.EDVSENQUEUED
    assert not lb_rig.feed(_reply(m1_i1=7))
    ((h, data, code),) = lb_rig.done
    assert (h.c_snode, h.c_src, h.c_dst, h.c_msg.m1_i1) == (LB_ID, SERVICE, CLIENT, 7)
    assert data == b"" and code == E.EDVSENQUEUED


# ======================================================================== the put2lcl thread
class _LbKernel:
    """The LB pair's receiver side of a node kernel: put2lcl answers EDVSENQUEUED while
    `busy` is set, else success; the calls are counted, the m1_i1 of each frame taken kept."""

    def __init__(self) -> None:
        self.busy = threading.Event()
        self.calls = 0
        self.taken: list[int] = []

    def alloc(self, size: int):
        return SimpleNamespace(view=memoryview(bytearray(size)), addr=0)

    def put2lcl(self, h: Header, payload) -> int:
        self.calls += 1
        if self.busy.is_set():
            raise E.DvkError.for_code(E.EDVSENQUEUED)
        self.taken.append(h.c_msg.m1_i1)
        return 0


def test_the_put2lcl_thread_counts_every_frame_it_holds_in_the_backlog():
    """The backlog the deliverers read is the put2lcl thread's frames: one queued frame
    until it is put; a receiver's frame refused with EDVSENQUEUED (`put_done`) while it stays
    parked, and a frame queued behind it too; none once the kernel took both, in order."""
    table = fastpath.FlowTable(LOCAL, LB_ID, C.NR_NODES, C.NR_DCS, ())
    kernel = _LbKernel()
    ctx = SimpleNamespace(dvk=kernel, wires=table, lb_put=lambda h, data, code: None,
                          stopping=threading.Event(),
                          count_error=lambda code: None, lb_node=LB_ID,
                          service_ep=lambda dcid, ep: False, execute=lambda act: None)
    thread = Put2lclThread(ctx, SimpleNamespace(enter=lambda dvk: True))
    runner = threading.Thread(target=thread.run, daemon=True)

    def frame(i: int) -> Header:
        return Header(bytearray(_reply(m1_i1=i)))

    def backlog() -> int:
        return table.lb_backlog(0)

    try:
        assert thread.put(frame(1))
        assert backlog() == 1                       # queued: the thread does not run yet
        runner.start()
        wait_until(lambda: backlog() == 0, 10, what="the queued frame put")
        kernel.busy.set()
        thread.put_done(frame(2), b"", E.EDVSENQUEUED)   # a receiver's put, refused
        thread.put(frame(3))                             # parked behind it
        wait_until(lambda: kernel.calls >= 3, 10, what="a retry of the parked frame")
        assert backlog() == 2 and kernel.taken == [1]
        kernel.busy.clear()
        wait_until(lambda: backlog() == 0, 10, what="the parked frames put")
        assert kernel.taken == [1, 2, 3]
    finally:
        ctx.stopping.set()
        if runner.is_alive():
            runner.join(10)
        table.free()


# ======================================================================== the get2rmt thread
SVC_EP, SVR_SIDE, CLT_A, CLT_B = 30, 32, 40, 41     # the service at the LB node, its server
# endpoint in the session, two local clients (only CLT_A has a session handed over)


@pytest.fixture
def pump_rig():
    """Node 1's kernel with the test process as the LB pair (node 0), the service endpoint
    bound to the LB node, two client programs, a table with CLT_A's session handed over
    (server node 2) and the link to node 2 writing to a socketpair (`peer` its other end);
    the LB pair's sender thread runs `LbPump`."""
    with make_world() as world:
        node = world.inproc_node(LOCAL)
        d = world.dvk(node)
        px = FakeProxy(world, node, d, LB_ID)
        d.add_node(DC0, LB_ID)
        d.rmtbind(DC0, "svc", SVC_EP, LB_ID)
        progs = {}
        for ep in (CLT_A, CLT_B):
            progs[ep] = world.actor(f"ep{ep}")
            assert progs[ep].call(d.bind, DC0, ep) == ep
        dvs = d.getdvsinfo()[1]
        table = fastpath.FlowTable(LOCAL, LB_ID, dvs.d_nr_nodes, dvs.d_nr_dcs, ())
        table.set_dc(DC0, (dvs.d_nr_tasks, dvs.d_nr_procs))
        table.set_raw_ok(PEER, True)
        sess = SimpleNamespace(clt_node=LOCAL, svr_node=PEER, dcid=DC0, clt_ep=CLT_A,
                               lbsvr_ep=CLT_A, clt_pid=0, svr_pid=0, pending=0,
                               to_server={SVC_EP: SVR_SIDE})
        sid = table.give(sess)
        assert sid >= 0
        spec = PeerSpec(nodeid=PEER, name="n2", host="127.0.0.1", sport=1, rport=1)
        link = Link(spec, dvk=None, wire=table.wire(PEER))
        out, peer = socket.socketpair()
        out.setblocking(False)
        link.out_sock, link.up, link.generation = out, True, 1
        link.wire.publish(out)
        assert link.flush()             # nothing waits: the pump may write
        pump = px.sproxy.call(fastpath.LbPump, table, {PEER: link}, d, px.spay, SHORT)
        rig = SimpleNamespace(d=d, px=px, progs=progs, table=table, sid=sid, link=link,
                              peer=peer, pump=pump)
        try:
            yield rig
        finally:
            link.wire.publish(None)
            out.close()
            peer.close()
            table.free()


def _call(rig, ep: int, m1_i1: int):
    """Client `ep` sends a sendrec to the service at the LB node (it times out: no reply)."""
    m = Message()
    m.m_type, m.m1_i1 = 0x0A, m1_i1
    return rig.progs[ep].submit(rig.d.sendrec, SVC_EP, m, SHORT)


def _pump(rig) -> tuple[bool, Header]:
    """One `LbPump.get2rmt` on the LB pair's sender thread: (its result, the header); a
    get2rmt that times out (the pump wrote every command that came) raises."""
    hdr = Header()
    return rig.px.sproxy.call(rig.pump.get2rmt, hdr), hdr


def _peer_frames(rig) -> list[Header]:
    rig.peer.settimeout(5)
    data = rig.peer.recv(1 << 16)
    return [Header(bytearray(data[o:o + HEADER_SIZE])) for o in range(0, len(data),
                                                                        HEADER_SIZE)]


def test_the_pump_writes_a_handed_over_clients_command_rewritten_for_its_server(pump_rig):
    """CLT_A's sendrec to the service at the LB node reaches node 2's link as the router
    would send it (the server node and endpoint of the session, CHECK_HDR set, the client's
    own node and endpoint as the source); the session's sendrec is pending and counted.
    CLT_B, whose session the table does not hold, comes back to the router as it came."""
    fut = _call(pump_rig, CLT_A, 7)
    with pytest.raises(E.DvkError) as err:      # CLT_A's written, then nothing more comes
        _pump(pump_rig)
    assert err.value.code == E.EDVSTIMEDOUT
    (h,) = _peer_frames(pump_rig)
    assert (h.c_cmd, h.c_src, h.c_dst, h.c_snode, h.c_dnode, h.c_msg.m1_i1) == \
        (C.CMD_SNDREC_MSG, CLT_A, SVR_SIDE, LOCAL, PEER, 7)
    assert h.c_flags & C.FLAG_CHECK_HDR
    pending, uses, cmds, nbytes = pump_rig.table.take(pump_rig.sid, False)
    assert (pending, uses, cmds, nbytes) == (C.CMD_SNDREC_MSG, 1, 1, HEADER_SIZE)
    later = _call(pump_rig, CLT_B, 8)
    to_router, hdr = _pump(pump_rig)
    assert to_router
    assert (hdr.c_cmd, hdr.c_src, hdr.c_dst, hdr.c_snode, hdr.c_dnode, hdr.c_msg.m1_i1) == \
        (C.CMD_SNDREC_MSG, CLT_B, SVC_EP, LOCAL, LB_ID, 8)
    for f in (fut, later):
        f.exception(10)


def test_while_the_link_has_frames_of_its_own_the_command_goes_to_the_router(pump_rig):
    """A frame queued on the link (not yet written) comes first: the pump leaves CLT_A's
    command to the router, unchanged and uncounted, and writes nothing itself."""
    pump_rig.link.wire.enqueued()
    fut = _call(pump_rig, CLT_A, 9)
    to_router, hdr = _pump(pump_rig)
    assert to_router and (hdr.c_dst, hdr.c_dnode) == (SVC_EP, LB_ID)
    pump_rig.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        pump_rig.peer.recv(1)
    assert pump_rig.table.take(pump_rig.sid, False)[1:] == (0, 0, 0)
    fut.exception(10)
