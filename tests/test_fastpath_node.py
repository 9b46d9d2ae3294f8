"""The compiled sender and deliverer of a node DSP on the emulated DVK (dsp_proxy/fastpath.py
`Sender` and `Receiver`, fastrelay.c `rt_send_pump` and `rt_deliver_pump`) against the Python
path they stand in for.

The sender tests drive a real node kernel (served by a thread of the test process): the test
process is node 2's proxy pair, local programs are actor threads, and a real `Link` with the
compiled code's `Wire` writes to one end of a socketpair whose other end plays the peer.  The
receiver tests run the real `RProxy._serve` on such a link, with and without the compiled
deliverer, and compare what the local programs get, the link's counters and the repairs of the
`Deliverer`.  A DSP pair runs the same programs twice, with the compiled code and with
DSP_FASTPATH=0, and the link counters are compared.  Then: the group's word on which server
nodes the router rewrites, header words at their extremes against the receiver's checks, and
SPROXY's own loop with the compiled sender.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest
from test_dsp_cluster import LOOP_RE, TWO, latency, sha
from test_router import LOCAL_CLIENTS, _acts, _net, _report, _req, _router, _sent

from cluster_helpers import Background, cluster_from, start_latency_and_m3ftp, wire_frames
from dsp_proxy import fastpath
from dsp_proxy.cluster import module_argv
from dsp_proxy.executor import Executor
from dsp_proxy.group import DELIVER, LOCAL, Router
from dsp_proxy.link import Link, OutMonitor, PeerSpec, uncork
from dsp_proxy.misc import Counters
from dsp_proxy.rproxy import Deliverer, FrameError, RProxy, WireLimits, check_header
from dsp_proxy.sproxy import SProxy
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu import protocol as P
from dvk_cffi.wire import (
    HEADER_SIZE,
    ROUTE_STRUCT,
    Header,
    Message,
    frame_length,
    hello_header,
    make_header,
)
from emu_helpers import DC0, LSYS, LSYS2, LUSR, RSYS, SHORT, FakeProxy, make_world, wait_until

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled code is not built")

@pytest.fixture(autouse=True)
def _uncorked():
    """The test's thread starts uncorked: a test of another module may leave it corked (a
    relay's reads cork their thread), and the links' own writes here are made at once."""
    uncork()
    yield
    uncork()


PEER = 2                   # the remote node whose proxy pair the test process is
GET_TIMEOUT = SHORT        # ms, the get2rmt timeout of the sender (the DSP's fd_interval)
FAR = 60.0                 # s, an `until` that does not come during a test


def _attempt(fn, *args):
    """("ok", result) or ("err", class name, code, message) of a DVK call."""
    try:
        return ("ok", fn(*args))
    except E.DvkError as err:
        return ("err", type(err).__name__, err.code, str(err))


def _frames(stream: bytes) -> list[tuple]:
    """The whole frames of `stream` as (c_cmd, c_src, c_dst, c_snode, c_dnode, c_len, payload,
    c_rcode), the fields a get2rmt of the same command gives alike (no time stamps); a frame
    whose bytes cannot be one (two frames mixed) fails the test."""
    frames, off = wire_frames(stream)
    assert off == len(stream), f"{len(stream) - off} bytes of a frame cut short"
    return [(h.c_cmd, h.c_src, h.c_dst, h.c_snode, h.c_dnode, h.c_len, data, h.c_rcode)
            for h, data in frames]


class Node:
    """Node 1's kernel with the test process as node 2's proxy pair, node 2 in DC0 with RSYS
    bound there, and local programs (actor threads) bound to `eps`."""

    def __init__(self, world, eps=(LSYS, LSYS2, LUSR, 12, 13)) -> None:
        self.world = world
        self.node = world.inproc_node(1)
        self.d = d = world.dvk(self.node)
        self.px = FakeProxy(world, self.node, d, PEER)
        d.add_node(DC0, PEER)
        d.rmtbind(DC0, "rsys", RSYS, PEER)
        self.progs = {}
        for ep in eps:
            a = world.actor(f"ep{ep}")
            assert a.call(d.bind, DC0, ep) == ep
            self.progs[ep] = a
        dvs = d.getdvsinfo()[1]
        self.table = fastpath.FlowTable(1, -1, dvs.d_nr_nodes, dvs.d_nr_dcs, ())
        self.table.set_raw_ok(PEER, True)
        self.socks: list[socket.socket] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    def close(self) -> None:
        for s in self.socks:
            s.close()


class SendRig(Node):
    """A node with a link to node 2 whose socket is one end of a socketpair (`peer` the other
    end), the compiled sender on it, and a link without the compiled code (`pylink`, its
    socket's other end `pypeer`) for what the Python path does with the same commands."""

    def __init__(self, world) -> None:
        super().__init__(world)
        spec = PeerSpec(nodeid=PEER, name="n2", host="127.0.0.1", sport=1, rport=1)
        self.link = Link(spec, dvk=None, wire=self.table.wire(PEER))
        self.out, self.peer = self.pair()
        self._up(self.link, self.out)
        self.pylink = Link(spec, dvk=None)
        pyout, self.pypeer = self.pair()
        self._up(self.pylink, pyout)
        self.sender = fastpath.Sender(self.table, self.link, self.d, self.px.spay, GET_TIMEOUT)
        self.sender.start()
        self.stream = bytearray()
        self.pystream = bytearray()

    @staticmethod
    def _up(link: Link, sock: socket.socket) -> None:
        sock.setblocking(False)
        link.out_sock, link.up, link.generation = sock, True, 1
        if link.wire is not None:
            link.wire.publish(sock)
        assert link.flush()            # nothing waits: the compiled sender may write

    def get(self, hdr: Header, until: float = FAR):
        """One `Sender.get2rmt` on the sender proxy's thread: its result, or the DvkError."""
        return _attempt(self.px.sproxy.call, self.sender.get2rmt, hdr, time.monotonic() + until)

    def pyget(self, hdr: Header):
        """One get2rmt of the Python path on the sender proxy's thread."""
        return _attempt(self.px.sproxy.call, self.d.get2rmt, hdr, self.px.spay, GET_TIMEOUT)

    def read(self, sock: socket.socket, into: bytearray) -> None:
        sock.setblocking(False)
        try:
            while True:
                into += sock.recv(1 << 20)
        except BlockingIOError:
            pass

    def queue_commands(self) -> list:
        """Commands for node 2 from the local programs: notifies (the proxy's pick-up ends
        them) and a COPYIN_DATA of 3000 bytes (ended by `copy_done`)."""
        d, progs = self.d, self.progs
        data = bytes((i * 7 + 1) & 0xFF for i in range(3000))
        buf = d.alloc(3000)
        buf.write(data)
        futs = [progs[ep].submit(d.notify, RSYS) for ep in (LSYS, LSYS2, 12)]
        futs.append(progs[13].submit(d.vcopy, C.SELF, buf.addr, RSYS, 0x20000000, 3000))
        self._keep = buf
        return futs

    def copy_done(self, fut) -> None:
        """node 2's COPYIN_ACK for the copy of `queue_commands` (RSYS takes one at a time)."""
        assert self.px.put(c_cmd=C.CMD_COPYIN_ACK, c_src=RSYS, c_dst=13, v_dst=RSYS,
                           v_rqtr=13) == 0
        assert fut.result(5) == 0


@pytest.fixture
def srig():
    with make_world() as world:
        rig = SendRig(world)
        try:
            yield rig
        finally:
            rig.link.wire.publish(None)
            rig.close()


N_COMMANDS = 4


def _fetch_all(rig: SendRig, fetch, stream: bytearray, sock: socket.socket) -> None:
    """Call `fetch` until the peer got every command of `queue_commands` (they reach the
    kernel from other threads: a call may come before some of them)."""
    deadline = time.monotonic() + 10
    while len(_frames(bytes(stream))) < N_COMMANDS:
        assert time.monotonic() < deadline, f"{_frames(bytes(stream))} came"
        fetch()
        rig.read(sock, stream)


def test_the_sender_writes_what_get2rmt_fetches_and_counts_it_as_the_python_path(srig):
    """Commands queued for node 2 are fetched and written by the C loop itself (the link's
    own path writes nothing: its last write stays 0 and the wire's is recent); the peer gets
    the frames the Python path writes for the same commands, and the link counters, once
    the loop's are folded in, are the Python path's."""
    rig = srig
    hdr = Header()
    before = time.monotonic()
    copy = rig.queue_commands()[-1]

    def fast():
        got = rig.get(hdr)
        assert got[:3] == ("err", "EDVSTIMEDOUT_Error", E.EDVSTIMEDOUT), \
            f"a command went to the Python path: {got} {hdr!r}"
    _fetch_all(rig, fast, rig.stream, rig.peer)
    assert rig.link.last_tx == 0.0 and not rig.link.outq, "the link's own path wrote"
    assert before <= rig.link.wire.last_tx() <= time.monotonic()
    assert rig.link.sent.frames == 0, "counted before the fold"
    rig.link.fold_relay()

    rig.copy_done(copy)
    rig.queue_commands()                       # the same commands, the Python path

    def python():
        got = rig.pyget(hdr)
        if got[0] == "ok":
            assert rig.pylink.submit(hdr.buf, rig.px.spay.view) == 0
        else:
            assert got[2] == E.EDVSTIMEDOUT, got
    _fetch_all(rig, python, rig.pystream, rig.pypeer)

    def key(f):
        return (f[0], f[1])
    fast_frames = sorted(_frames(bytes(rig.stream)), key=key)
    py_frames = sorted(_frames(bytes(rig.pystream)), key=key)
    assert fast_frames == py_frames
    assert [f[0] for f in fast_frames].count(C.CMD_COPYIN_DATA) == 1
    assert rig.link.sent.as_dict() == rig.pylink.sent.as_dict()
    assert rig.link.sent.frames == N_COMMANDS


def test_a_reply_other_than_a_command_is_raised_as_get2rmt_raises_it(srig):
    """Nothing queued: the kernel's EDVSTIMEDOUT comes back as the DvkError `get2rmt` raises
    (same class, code and text); with the sender proxy disconnected, its EDVSNOTCONN too."""
    rig = srig
    hdr = Header()
    fast, py = rig.get(hdr), rig.pyget(hdr)
    assert fast == py and fast[2] == E.EDVSTIMEDOUT, (fast, py)
    rig.d.proxy_conn(PEER, C.DISCONNECT_SPROXY)
    fast, py = rig.get(hdr), rig.pyget(hdr)
    assert fast == py and fast[2] == E.EDVSNOTCONN, (fast, py)
    rig.read(rig.peer, rig.stream)
    assert not rig.stream


def test_a_command_written_in_part_leaves_its_rest_first_on_the_link(srig):
    """The link's socket takes only part of a 64 KiB COPYIN_DATA: the rest is the link's
    unsent bytes (the send lock given back), the loop stops, and the command fetched next
    goes to the Python path behind the rest; the peer gets every byte of both in order."""
    rig = srig
    rig.out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rig.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    d, progs = rig.d, rig.progs
    data = bytes((i * 13 + 5) & 0xFF for i in range(C.MAXCOPYBUF))
    buf = d.alloc(C.MAXCOPYBUF)
    buf.write(data)
    progs[LSYS].submit(d.vcopy, C.SELF, buf.addr, RSYS, 0x20000000, C.MAXCOPYBUF)
    hdr = Header()
    deadline = time.monotonic() + 10
    while True:
        got = rig.get(hdr)
        if got == ("ok", None):
            break
        assert got[2] == E.EDVSTIMEDOUT and time.monotonic() < deadline, got
    assert rig.link.unsent, "the socket took the whole frame: no cut to test"
    assert rig.link.send_lock.acquire(blocking=False), "the loop kept the send lock"
    rig.link.send_lock.release()
    progs[LSYS2].submit(d.notify, RSYS)
    while True:                         # the link is not quiet: the Python path's command
        got = rig.get(hdr)
        if got[0] == "ok":
            break
        assert got[2] == E.EDVSTIMEDOUT and time.monotonic() < deadline, got
    assert (hdr.c_cmd, hdr.c_src) == (C.CMD_NTFY_MSG, LSYS2)
    assert rig.link.submit(hdr.buf, rig.px.spay.view) == 0
    while len(rig.stream) < 2 * HEADER_SIZE + C.MAXCOPYBUF:
        assert time.monotonic() < deadline, f"{len(rig.stream)} bytes came"
        rig.link.flush()                # what the monitor does when the socket has room
        rig.read(rig.peer, rig.stream)
    got = _frames(bytes(rig.stream))
    assert [(f[0], f[1], f[5]) for f in got] == \
        [(C.CMD_COPYIN_DATA, LSYS, C.MAXCOPYBUF), (C.CMD_NTFY_MSG, LSYS2, 0)]
    assert got[0][6] == data
    rig.link.fold_relay()
    want = Counters()
    want.count(C.CMD_COPYIN_DATA, HEADER_SIZE + C.MAXCOPYBUF, 1, DC0, C.MAXCOPYBUF)
    want.count(C.CMD_NTFY_MSG, HEADER_SIZE, 1, DC0, 0)
    assert rig.link.sent.as_dict() == want.as_dict()


def test_a_socket_published_after_the_serving_started_is_not_written(srig):
    """The link went down and came up on a new connection after the sender's serving
    started (the serving is over: SPROXY's next look at the generation ends it).  The loop
    does not write the command it fetched to the new socket, although the link is quiet
    there: it hands it to the Python path, which drops it with the old generation."""
    rig = srig
    link = rig.link
    old_fd = rig.out.fileno()
    with link.send_lock:                # what a link-down and a new connection do
        link.wire.publish(None)
        link.out_sock = None
    rig.out.close()
    new, new_peer = rig.pair()
    SendRig._up(link, new)              # quiet on the new socket
    link.generation = 2
    rig.progs[LSYS].submit(rig.d.notify, RSYS)
    hdr = Header()
    deadline = time.monotonic() + 10
    while True:
        got = rig.get(hdr)
        if got[0] == "ok":
            break
        assert got[2] == E.EDVSTIMEDOUT and time.monotonic() < deadline, got
    assert got[1] is not None and (hdr.c_cmd, hdr.c_src) == (C.CMD_NTFY_MSG, LSYS)
    stream = bytearray()
    rig.read(new_peer, stream)
    assert not stream, f"written to the new connection (fd {new.fileno()}, old {old_fd})"
    assert link.wire.last_tx() == 0.0
    link.fold_relay()
    assert link.sent.frames == 0


def test_a_lost_kernel_connection_fails_the_call_and_the_next_call_opens_another(srig):
    """The thread's connection to the node kernel breaks: the call fails with EDVSSHUTDOWN
    as `get2rmt` does, the connection is dropped, and the next call opens a new one and
    gets the kernel's answer (the kernel took the closed connection for the thread's exit:
    EDVSNOTBIND), the same answers as the Python path's; once the pair is registered again,
    the loop fetches and writes commands on the new connection."""
    rig = srig
    d, sproxy = rig.d, rig.px.sproxy
    hdr = Header()
    answers = {}
    for name, get in (("fast", rig.get), ("python", rig.pyget)):
        conn = sproxy.call(lambda: d._local.conn)
        assert conn is not None
        conn.shutdown(socket.SHUT_RDWR)
        first = get(hdr)
        assert sproxy.call(lambda: d._local.conn) is None, "the broken connection was kept"
        second = get(hdr)
        new = sproxy.call(lambda: d._local.conn)
        assert new is not None and new is not conn
        answers[name] = (first, second)
    assert answers["fast"] == answers["python"]
    first, second = answers["fast"]
    assert first[2] == E.EDVSSHUTDOWN and second[2] == E.EDVSNOTBIND, answers
    # the pair registered again (what the DSP does when the kernel lost it): the same
    # serving's loop fetches and writes on the thread's new connection
    d.proxies_bind(f"node{PEER}", PEER, sproxy.tid, rig.px.rproxy.tid, C.MAXCOPYBUF)
    d.node_up(f"node{PEER}", PEER, PEER)
    for status in (C.CONNECT_SPROXY, C.CONNECT_RPROXY):
        d.proxy_conn(PEER, status)
    d.add_node(DC0, PEER)
    d.rmtbind(DC0, "rsys", RSYS, PEER)
    rig.progs[LSYS].submit(d.notify, RSYS)
    deadline = time.monotonic() + 10
    while not rig.stream:
        assert time.monotonic() < deadline, "nothing written on the new connection"
        got = rig.get(hdr)
        assert got[2] == E.EDVSTIMEDOUT, got
        rig.read(rig.peer, rig.stream)
    assert [f[:2] for f in _frames(bytes(rig.stream))] == [(C.CMD_NTFY_MSG, LSYS)]


def test_a_kernel_that_does_not_answer_in_time_fails_the_call_as_get2rmt(srig):
    """A thread with an answer limit (the DSP's main thread has one) whose get2rmt waits
    longer than the limit: EDVSSHUTDOWN with the text of `get2rmt`'s (`EmuDvk._lost`), the
    connection dropped."""
    rig = srig
    d, sproxy = rig.d, rig.px.sproxy
    sproxy.call(d.limit_answers, 0.1)
    slow = fastpath.Sender(rig.table, rig.link, d, rig.px.spay, 2000)
    slow.start()
    hdr = Header()
    fast = _attempt(sproxy.call, slow.get2rmt, hdr, time.monotonic() + FAR)
    assert sproxy.call(lambda: d._local.conn) is None
    assert fast[:3] == ("err", "EDVSSHUTDOWN_Error", E.EDVSSHUTDOWN), fast
    assert fast[3].startswith("the node kernel did not answer within 0.1 s"), fast


# ================================================================================ receiver
R21, R22, R23, R24 = 21, 22, 23, 24   # node 2's endpoints: R22 bound nowhere, others there


class SpyDvk:
    """The node's DVK as the DSP's threads see it, with the put2lcl calls of the Python path
    recorded (the compiled deliverer makes its own on the thread's connection)."""

    def __init__(self, dvk) -> None:
        self._dvk = dvk
        self.puts: list[tuple[int, int]] = []

    def put2lcl(self, h: Header, payload) -> int:
        self.puts.append((h.c_cmd, h.c_src))
        return self._dvk.put2lcl(h, payload)

    def __getattr__(self, name: str):
        return getattr(self._dvk, name)


class RecvRig(Node):
    """A node whose link to node 2 is served by the real `RProxy._serve` on the receiver
    proxy's thread: with the compiled deliverer (`fast`) or the Python path alone.  The test
    writes node 2's frames to `feed`; what the link sends back to node 2 arrives at `back`."""

    def __init__(self, world, fast: bool, autobind: bool = True, reverse: bool = False,
                 serve: bool = True) -> None:
        super().__init__(world)
        d = self.d
        d.rmtbind(DC0, "r21", R21, PEER)
        d.rmtbind(DC0, "r23", R23, PEER)
        d.rmtbind(DC0, "r24", R24, PEER)
        self.spy = SpyDvk(d)
        spec = PeerSpec(nodeid=PEER, name="n2", host="127.0.0.1", sport=1, rport=1,
                        autobind=autobind)
        self.link = link = Link(spec, dvk=None, wire=self.table.wire(PEER) if fast else None)
        out, self.back = self.pair()
        self.inside, self.feed = self.pair()
        out.setblocking(False)
        link.out_sock, link.in_sock, link.up, link.generation = out, self.inside, True, 1
        if fast:
            link.wire.publish(out)
            self.table.set_reverse(PEER, reverse)
        self.downs: list[str] = []
        link.down = lambda reason, generation=None, outgoing=False: self.downs.append(reason)
        dvs = d.getdvsinfo()[1]
        self.ranges = (dvs.d_nr_tasks, dvs.d_nr_procs)
        self.limits = WireLimits(dvs.d_nr_nodes, dvs.d_nr_dcs, learn=self._learn)
        self._learn(DC0)                      # as after the first frame of DC0
        router = Router(1, -1, None)
        self.errors: list[int] = []
        self.ctx = SimpleNamespace(
            dvk=self.spy, fast=None, wires=self.table if fast else None, lb_put=None,
            router=router, execute=Executor(1, {PEER: link}, router, None, lambda: None),
            limits=self.limits, lb_node=-1, service_ep=lambda dcid, ep: False,
            count_error=self.errors.append, stopping=threading.Event(),
            control=lambda peer, m: None)
        self.rp = RProxy(self.ctx, link, None)
        self.rp.deliverer = self.px.rproxy.call(Deliverer, self.ctx, PEER)
        self.rp.reader = None
        self.serving = None
        if serve:
            self.serve()

    def serve(self) -> None:
        """The receiver proxy's thread serves the connection from now on."""
        self.serving = self.px.rproxy.submit(self.rp._serve, self.inside, 1)

    def _learn(self, dcid: int):
        """`Dsp.learn_dc`: the range for the header checks, the compiled code told too."""
        if not 0 <= dcid < self.limits.nr_dcs:
            return None
        self.limits.dc_ranges[dcid] = self.ranges
        self.table.set_dc(dcid, self.ranges)
        return self.ranges

    def frame(self, payload: bytes = b"", **fields) -> bytes:
        """A frame of node 2 for this node (`FakeProxy.header`'s defaults: RSYS to LSYS)."""
        h = self.px.header(c_len=len(payload), **fields)
        return bytes(h.buf) + payload

    def end(self) -> None:
        """Node 2 closes the connection: the serving ends (its link-down recorded)."""
        self.feed.shutdown(socket.SHUT_WR)
        self.serving.result(10)

    def close(self) -> None:
        """Also when the test failed: the serving ends before its sockets are closed (a
        descriptor closed under a blocked read does not wake it)."""
        if self.serving is not None and not self.serving.done():
            self.inside.shutdown(socket.SHUT_RDWR)
            self.serving.exception(10)
        super().close()

    def got(self, ep: int) -> tuple:
        """What the local program `ep` receives next: (m_source, m_type), or the error."""
        m = Message()
        res = _attempt(self.progs[ep].call, self.d.receive, C.ANY, m, SHORT)
        return (m.m_source, m.m_type) if res[0] == "ok" else res[2]

    def sent_back(self) -> list[tuple]:
        """The frames the link sent to node 2: (c_cmd, c_src, c_dst, c_rcode)."""
        stream = bytearray()
        self.back.setblocking(False)
        try:
            while True:
                stream += self.back.recv(1 << 20)
        except BlockingIOError:
            pass
        out = []
        for off in range(0, len(stream), HEADER_SIZE):
            h = Header(bytearray(stream[off:off + HEADER_SIZE]))
            out.append((h.c_cmd, h.c_src, h.c_dst, h.c_rcode))
        return out

    def outcome(self, eps=(LSYS, LSYS2, 12)) -> dict:
        """What the serving did, for the comparison of both paths."""
        r22 = self.d.getprocinfo(DC0, R22)
        copy = getattr(self, "copy", None)
        if copy is not None:        # a vcopy the frames answer: its result and the bytes
            fut, into, data = copy
            copy = (_attempt(fut.result, 10), into.read(len(data)) == data)
        return {"downs": self.downs, "received": self.link.received.as_dict(), "copy": copy,
                "programs": {ep: [self.got(ep), self.got(ep)] for ep in eps},
                "sent_back": self.sent_back(), "errors": self.errors,
                "deliverer_errors": self.rp.deliverer.errors,
                "r22": (r22.p_rts_flags & (C.SLOT_FREE | C.REMOTE), r22.p_nodeid)}


def _run(fast: bool, frames, chunk: int = 0, **kw) -> tuple[dict, list]:
    """Serve `frames` from node 2 on a new node, at once or in pieces of `chunk` bytes:
    (outcome, the Python path's put2lcl calls)."""
    with make_world() as world:
        rig = RecvRig(world, fast, **kw)
        try:
            data = b"".join(frames(rig))
            step = chunk or len(data)
            for n, off in enumerate(range(0, len(data), step)):
                rig.feed.sendall(data[off:off + step])
                if chunk and n % max(1, 37 // chunk) == 0:
                    time.sleep(0.001)       # the receiver reads what came so far
            if not rig.serving.done():
                rig.end()
            return rig.outcome(), rig.spy.puts
        finally:
            rig.close()


def _three(rig: RecvRig) -> list[bytes]:
    """Three messages of three senders of node 2 to three local programs, a notify among
    them."""
    return [rig.frame(c_src=RSYS, c_dst=LSYS, m_type=1),
            rig.frame(c_src=R21, c_dst=LSYS2, m_type=2, m1_i1=7),
            rig.frame(c_cmd=C.CMD_NTFY_MSG, c_src=R23, c_dst=12, m_type=3)]


def test_frames_for_the_node_are_delivered_in_c_as_the_python_path_delivers_them():
    """Frames for the node's programs: the compiled deliverer makes every put2lcl itself (no
    put2lcl of the Python path), and the programs, the link's received counters (folded by
    the receiver) and what goes back to node 2 are the Python path's."""
    fast, fast_puts = _run(True, _three)
    py, py_puts = _run(False, _three)
    assert fast_puts == [] and len(py_puts) == 3, (fast_puts, py_puts)
    assert fast == py
    assert fast["received"]["frames"] == 3 and fast["downs"] == \
        ["the peer closed the connection"]
    assert fast["programs"][LSYS][0] == (RSYS, 1)


@pytest.mark.parametrize("autobind", [True, False])
def test_a_put2lcl_failure_gets_the_python_paths_repairs(autobind):
    """A sender of node 2 whose endpoint is bound nowhere here (EDVSNOTBIND): with autobind
    the deliverer binds it to node 2 and delivers again, without it node 2 gets the error
    ACK; the compiled deliverer's failed put2lcl goes through `Deliverer.put_done` alike."""
    def frames(rig):
        return [rig.frame(c_src=R22, c_dst=LSYS, m_type=5),
                rig.frame(c_src=R21, c_dst=LSYS2, m_type=6)]
    fast, fast_puts = _run(True, frames, autobind=autobind)
    py, py_puts = _run(False, frames, autobind=autobind)
    assert fast == py
    # the compiled deliverer made the first put2lcl of every frame; the repair made the retry
    assert fast_puts == ([(C.CMD_SEND_MSG, R22)] if autobind else []), fast_puts
    assert len(py_puts) == (3 if autobind else 2)
    if autobind:
        assert fast["programs"][LSYS][0] == (R22, 5) and not fast["sent_back"]
        assert fast["r22"] == (C.REMOTE, PEER)
    else:
        assert fast["sent_back"] == [(C.CMD_SEND_ACK, LSYS, R22, E.EDVSNOTBIND)]
        assert fast["programs"][LSYS][0] == E.EDVSTIMEDOUT
    assert fast["programs"][LSYS2][0] == (R21, 6)


def _mixed(rig: RecvRig) -> list[bytes]:
    """HELLOs (the Python path's) between frames of four senders, among them the 3000 bytes
    of COPYOUT_DATA a local vcopy from node 2's R21 asked for (the vcopy started here)."""
    data = bytes((i * 11 + 3) & 0xFF for i in range(3000))
    into = rig.d.alloc(3000)
    fut = rig.progs[LSYS2].submit(rig.d.vcopy, R21, 0x2000, C.SELF, into.addr, 3000)
    assert rig.px.get().c_cmd == C.CMD_COPYOUT_RQST
    rig.copy = (fut, into, data)
    hello = bytes(hello_header(PEER, 1).buf)
    copy = rig.frame(data, c_cmd=C.CMD_COPYOUT_DATA, c_src=R21, c_dst=LSYS2, v_src=R21,
                     v_dst=LSYS2, v_rqtr=LSYS2, v_daddr=into.addr, v_bytes=3000)
    return [hello, rig.frame(c_src=RSYS, c_dst=LSYS, m_type=1), copy, hello,
            rig.frame(c_cmd=C.CMD_NTFY_MSG, c_src=R23, c_dst=12, m_type=3), hello,
            rig.frame(c_src=R24, c_dst=LSYS2, m_type=2)]


@pytest.mark.parametrize("chunk", [1, 119, 1000])
def test_frames_cut_anywhere_are_delivered_whole_as_in_python(chunk):
    """node 2's frames arrive in pieces of `chunk` bytes, HELLOs among them: every frame is
    delivered once, whole (the copied bytes land), in order, and the counters, the programs
    and what goes back to node 2 are the Python path's."""
    fast, fast_puts = _run(True, _mixed, chunk)
    py, _ = _run(False, _mixed, chunk)
    assert fast == py
    assert fast["received"]["hellos"] == 3 and fast["received"]["frames"] == 7
    assert fast["programs"][LSYS][0] == (RSYS, 1) and fast["programs"][LSYS2][0] == (R24, 2)
    assert fast["programs"][12][0] != E.EDVSTIMEDOUT
    assert fast["copy"] == (("ok", 0), True)
    assert len(fast_puts) < 4, fast_puts      # the compiled deliverer made (most of) them


def _broken_channel(fast: bool) -> tuple[dict, list]:
    """The receiver proxy thread's connection to the node kernel breaks while it waits for
    frames; then two frames come: (outcome, the Python path's put2lcl calls)."""
    with make_world() as world:
        rig = RecvRig(world, fast, serve=False)
        try:
            d = rig.d

            def channel():
                d.getdvsinfo()              # the thread's connection, opened now
                return d._local.conn
            conn = rig.px.rproxy.call(channel)
            rig.serve()
            conn.shutdown(socket.SHUT_RDWR)
            rig.feed.sendall(rig.frame(c_src=RSYS, c_dst=LSYS, m_type=1)
                             + rig.frame(c_src=R21, c_dst=LSYS2, m_type=2))
            rig.end()
            return rig.outcome(), rig.spy.puts
        finally:
            rig.close()


def test_a_put2lcl_on_a_broken_kernel_connection_fails_as_in_python():
    """A put2lcl of the compiled deliverer whose kernel connection broke: the frame gets the
    Python path's answer (EDVSSHUTDOWN, as `put2lcl` fails then: the error ACK to node 2),
    not a second put2lcl on a new connection (a request the kernel may have carried out
    before the connection broke would be delivered twice); the next frame goes on a new
    connection, on which the kernel no longer knows the thread as node 2's receiver."""
    fast, _ = _broken_channel(True)
    py, _ = _broken_channel(False)
    assert fast == py
    assert fast["sent_back"] == [(C.CMD_SEND_ACK, LSYS, RSYS, E.EDVSSHUTDOWN),
                                 (C.CMD_SEND_ACK, LSYS2, R21, E.EDVSNOTBIND)], fast
    assert fast["received"]["frames"] == 2


BAD_HEADERS = [dict(c_snode=3), dict(c_dst=100000), dict(c_cmd=0x1234), dict(c_batch_nr=1),
               dict(c_dcid=40), dict(c_cmd=C.CMD_SEND_MSG, c_len=8)]


@pytest.mark.parametrize("bad", BAD_HEADERS, ids=[next(iter(b)) + str(len(b)) for b in
                                                 BAD_HEADERS])
def test_a_frame_that_fails_the_header_checks_closes_the_link_as_in_python(bad):
    """A good frame, one the receiver's checks refuse, another good one: the first is
    delivered, then the link is closed with the Python path's FrameError reason and the
    third is never delivered."""
    def frames(rig):
        fields = dict(c_src=R21, c_dst=LSYS2, m_type=8)
        fields.update(bad)
        payload = bytes(fields.pop("c_len", 0))
        return [rig.frame(c_src=RSYS, c_dst=LSYS, m_type=7), rig.frame(payload, **fields),
                rig.frame(c_src=RSYS, c_dst=12, m_type=9)]
    fast, fast_puts = _run(True, frames)
    py, _ = _run(False, frames)
    assert fast == py
    assert fast_puts == []
    assert len(fast["downs"]) == 1 and fast["downs"][0].startswith("bad frame: "), fast["downs"]
    assert fast["programs"][LSYS][0] == (RSYS, 7)
    assert fast["programs"][12][0] == E.EDVSTIMEDOUT


def test_frames_of_a_node_with_reverse_sessions_are_left_to_python():
    """`set_reverse(2, True)` (node 2 serves sessions the router rewrites): its frames take
    the Python path, every one of them, with the same outcome."""
    fast, fast_puts = _run(True, _three, reverse=True)
    py, py_puts = _run(False, _three)
    assert fast == py
    assert fast_puts == py_puts and len(fast_puts) == 3


@pytest.mark.parametrize("fast", [True, False], ids=["compiled", "python"])
def test_a_parked_delivery_keeps_the_order_of_its_senders_commands(fast):
    """node 2's RSYS sends three messages to LSYS, which receives only later: the first is
    queued, the second gets EDVSENQUEUED and is parked.  LSYS takes the first and node 2's
    proxy its ACK, which frees RSYS; the third, arriving while the second is still parked,
    must wait behind it (it takes the Python path, which parks it), not be delivered first
    by the compiled deliverer."""
    with make_world() as world:
        rig = RecvRig(world, fast)
        try:
            dl = rig.rp.deliverer
            allowed = threading.Event()
            retry = dl.retry_parked
            dl.retry_parked = lambda: allowed.is_set() and retry()
            rig.feed.sendall(rig.frame(m_type=1) + rig.frame(m_type=2))
            wait_until(lambda: dl.nparked == 1, 10, what="the second message parked")
            assert rig.got(LSYS) == (RSYS, 1)
            assert rig.px.get().c_cmd == C.CMD_SEND_ACK     # RSYS is free again
            rig.feed.sendall(rig.frame(m_type=3))
            wait_until(lambda: dl.nparked == 2, 10, what="the third message parked")
            allowed.set()
            assert rig.got(LSYS) == (RSYS, 2)
            assert rig.px.get().c_cmd == C.CMD_SEND_ACK
            assert rig.got(LSYS) == (RSYS, 3)
            rig.end()
            assert rig.link.received.frames == 3 and not dl.parked
            assert not rig.errors and rig.downs == ["the peer closed the connection"]
        finally:
            rig.close()


# ================================================================================ a cluster
def _traffic_figures(counters: dict) -> dict:
    """A link direction's figures without its HELLOs (their number follows the clock): every
    command frame, command, byte and DC figure."""
    keep = {k: counters[k] for k in ("commands", "errors", "batches", "lz4_frames", "by_cmd",
                                     "by_dc")}
    keep["frames"] = counters["frames"] - counters["hellos"]
    keep["bytes"] = counters["bytes"] - counters["hellos"] * HEADER_SIZE
    return keep


def _settled_links(cl, nodes=(1, 2), timeout: float = 15.0) -> dict:
    """The link figures of every node once two status files in a row agree on them (the
    DSPs write one every tick, with what their compiled code counted folded in)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        figures = {}
        for n in nodes:
            links = cl.status(n).get("links") or {}
            figures[n] = {peer: (_traffic_figures(link["sent"]),
                                 _traffic_figures(link["received"]))
                          for peer, link in links.items()}
        if figures == last and all(figures.values()):
            return figures
        assert time.monotonic() < deadline, f"the link figures did not settle: {figures}"
        last = figures
        time.sleep(1.2)


def _latency_and_m3ftp(tmp_path, bg, tag: str) -> tuple[dict, list[str]]:
    """A latency loop and an m3ftp put and get through a DSP pair: (the settled link figures
    of both nodes, what the programs said that does not depend on timing)."""
    work = tmp_path / tag
    work.mkdir()
    with cluster_from(TWO, work) as cl:
        b = Background(cl, work)
        bg.append(b)
        srvdir = start_latency_and_m3ftp(cl, b, work)
        res = latency(cl, 1, 50, 10, 40)
        assert res.returncode == 0, res.stdout + res.stderr
        said = [f"latency loops {[int(i) for i, _ in LOOP_RE.findall(res.stdout)]}"]
        src = work / "put.dat"
        src.write_bytes(bytes((i * 31 + 7) & 0xFF for i in range(1 << 20)))
        put = cl.run(1, module_argv("dvs_apps.m3ftp", "-p", 0, 11, 20, "remote.dat", str(src)),
                     timeout=120)
        assert put.returncode == 0, put.stdout + put.stderr
        back = work / "get.dat"
        get = cl.run(1, module_argv("dvs_apps.m3ftp", "-g", 0, 11, 20, "remote.dat",
                                    str(back)), timeout=120)
        assert get.returncode == 0, get.stdout + get.stderr
        said += [f"put {sha(srvdir / 'remote.dat') == sha(src)}",
                 f"get {sha(back) == sha(src)}", f"verified {'verified' in get.stdout}"]
        figures = _settled_links(cl)
        said += [f"node {n} fast_links {cl.status(n).get('fast_links')}" for n in (1, 2)]
        return figures, said


def test_a_dsp_pair_counts_the_same_traffic_with_and_without_the_compiled_code(
        tmp_path, bg, monkeypatch):
    """The same latency loop and m3ftp transfers through a DSP pair, once with the compiled
    sender and deliverer and once with DSP_FASTPATH=0 (the status says which, `fast_links`):
    the programs get the same results and both nodes' links count the same command frames,
    commands, bytes and DC figures each way."""
    monkeypatch.delenv(fastpath.ENV, raising=False)
    fast, fast_said = _latency_and_m3ftp(tmp_path, bg, "fast")
    monkeypatch.setenv(fastpath.ENV, "0")
    py, py_said = _latency_and_m3ftp(tmp_path, bg, "python")
    common = ["latency loops " + str(list(range(40))), "put True", "get True", "verified True"]
    assert fast_said == common + ["node 1 fast_links True", "node 2 fast_links True"]
    assert py_said == common + ["node 1 fast_links False", "node 2 fast_links False"]
    assert fast == py
    sent = fast[1]["2"][0]
    assert sent["by_cmd"] and sent["by_dc"]["0"]["data_bytes"] >= 1 << 20, sent


# ================================================================================ the group
def test_the_group_tells_which_server_nodes_have_reverse_sessions():
    """A client node's router rewrites its servers' replies (`Group.reverse`), so the
    compiled deliverer must leave their frames to it: the group says when a server node gets
    its first session and when it loses its last (`on_reverse`, `FlowTable.set_reverse` in
    the DSP), once each, and the frames of that server are then rewritten by the router."""
    router, group, _, clock = _router(LOCAL_CLIENTS, local=3)
    _report(group, 2, cpu=95, level=C.LVL_SATURATED)        # every session goes to node 1
    calls: list[tuple[int, bool]] = []
    group.on_reverse = lambda node, on: calls.append((node, on))
    for clt in (50, 51):
        node, _, _ = _sent(router.from_local(bytes(_req(src=clt).buf), memoryview(b"")))
        assert node == 1
    assert calls == [(1, True)]
    reply = _req(cmd=C.CMD_SEND_MSG, src=10, dst=50, snode=1, dnode=3)
    (act,) = _acts(_net(router, reply, peer=1))
    assert act[0] == LOCAL                     # rewritten by the router, not delivered as is
    group.client_gone(0, 50)
    assert calls == [(1, True)]                # node 1 still serves client 51
    group.client_gone(0, 51)
    assert calls == [(1, True), (1, False)]
    (act,) = _acts(_net(router, reply, peer=1))
    assert act[0] == DELIVER
    _sent(router.from_local(bytes(_req(src=52).buf), memoryview(b"")))
    clock[0] += group.session_timeout + 1      # the session expires
    group.tick()
    assert calls == [(1, True), (1, False), (1, True), (1, False)]


# ================================================================================ hostile headers
_EXTREMES = [0, 1, 2, 3, 5, 31, 32, 63, 64, HEADER_SIZE, C.MASK_ACKNOWLEDGE, 0xFFFF,
             C.MAXCOPYBUF, C.MAXCOPYBUF + 1, -1, -2, -C.NR_TASKS, -C.NR_TASKS - 1, -HEADER_SIZE,
             -(1 << 31), (1 << 31) - 1, C._ENDPOINT_GEN_SIZE + 10, -C._ENDPOINT_GEN_SIZE + 10]


class _Kernel:
    """A node kernel that answers every put2lcl of the compiled deliverer with `result` (0, a
    plain success, unless a test sets an error code) and keeps the header and payload bytes
    each one carried."""

    def __init__(self, payload) -> None:
        self.payload = payload
        self.mine, self.theirs = socket.socketpair()
        self.mine.settimeout(10)
        self.hdr_off = P.put2lcl_layout(payload.addr)[1]
        self.calls: list[tuple[bytes, bytes]] = []
        self.result = 0

    def thread_channel(self):
        return self.theirs.fileno(), 10.0

    def answer(self) -> None:
        """(another thread) Answer calls until the connection closes."""
        while True:
            head = self._exact(4)
            if not head:
                return
            body = self._exact(struct.unpack("<I", head)[0])
            hdr = (head + body)[self.hdr_off:self.hdr_off + HEADER_SIZE]
            n = Header(bytearray(hdr)).c_len
            self.calls.append((hdr, bytes(self.payload.view[:max(0, n)])))
            self.mine.sendall(P.encode_reply(0, [self.result]) if self.result >= 0
                              else P.encode_reply(self.result))

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = self.mine.recv(n - len(out))
            if not got:
                return b""
            out += got
        return bytes(out)

    def put2lcl_reply(self, body: bytes) -> int:
        assert self.result < 0, "a plain success came back to the Python path"
        return self.result

    def channel_failed(self, exc):
        raise AssertionError(f"the kernel connection failed: {exc}")


def test_every_header_field_at_its_extremes_is_delivered_only_when_python_would():
    """Each 32-bit word of the header of frames for this node (messages, ACKs, COPY data),
    set in turn to boundary values: the compiled deliverer makes the put2lcl of a frame,
    with the frame's bytes as they came, only when the receiver's checks pass and the router
    would deliver it as it is; every other frame is left to the Python path."""
    table = fastpath.FlowTable(1, -1, C.NR_NODES, C.NR_DCS, ())
    try:
        table.set_dc(DC0, (C.NR_TASKS, C.NR_PROCS))
        limits = WireLimits(C.NR_NODES, C.NR_DCS, {DC0: (C.NR_TASKS, C.NR_PROCS)})
        router = Router(1, -1, None)
        payload = SimpleNamespace(addr=1 << 20, view=memoryview(bytearray(C.MAXCOPYBUF)))
        kernel = _Kernel(payload)
        answering = threading.Thread(target=kernel.answer, daemon=True)
        answering.start()
        buf = bytearray(HEADER_SIZE + C.MAXCOPYBUF)
        reader = SimpleNamespace(buf=buf, view=memoryview(buf), start=0, end=0)
        link = SimpleNamespace(peer=PEER, spec=SimpleNamespace(autobind=True),
                               received=Counters(), last_rx=0.0)
        deliverer = SimpleNamespace(payload=payload, parked={})
        receiver = fastpath.Receiver(table, reader, link, kernel, deliverer)
        delivered = left = 0
        for cmd in (C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_SEND_ACK, C.CMD_NTFY_MSG,
                    C.CMD_COPYIN_DATA, C.CMD_COPYOUT_DATA):
            size = 200 if cmd in C.DATA_CMDS else 0
            base = make_header(c_cmd=cmd, c_dcid=DC0, c_src=RSYS, c_dst=LSYS, c_snode=PEER,
                               c_dnode=1, c_len=size, v_bytes=size)
            for off in range(0, HEADER_SIZE, 4):
                for value in _EXTREMES:
                    mutant = bytearray(base.buf)
                    struct.pack_into("<i", mutant, off, value)
                    n = frame_length(mutant)
                    data = bytes((i * 7 + off) & 0xFF for i in range(n)) \
                        if 0 <= n <= C.MAXCOPYBUF else b""
                    whole = bytes(mutant) + data
                    buf[:len(whole)] = whole
                    reader.start, reader.end = 0, len(whole)
                    calls = len(kernel.calls)
                    to_python = receiver()
                    fields = ROUTE_STRUCT.unpack_from(mutant)
                    try:
                        check_header(fields, PEER, limits)
                        act = router.from_network(bytes(mutant), fields, memoryview(data),
                                                  PEER, True)
                        python_delivers = act is not None and act[0] == DELIVER and \
                            not fields[10] & (C.FLAG_BATCH | C.FLAG_LZ4)
                    except FrameError:
                        python_delivers = False
                    what = f"{C.CMD_NAMES[cmd]} word {off // 4} = {value}"
                    if len(kernel.calls) > calls:
                        assert python_delivers, f"delivered in C: {what}"
                        assert kernel.calls[-1] == (bytes(mutant), data), what
                        assert reader.start == len(whole) and not to_python, what
                        delivered += 1
                    else:
                        assert reader.start == 0 and to_python, what
                        left += 1
        assert delivered > 300 and left > 300, (delivered, left)
        receiver.fold_received()
        assert link.received.frames == delivered
    finally:
        kernel.theirs.close()
        answering.join(10)
        kernel.mine.close()
        table.free()


# ================================================================================ SPROXY
def test_sproxys_serving_with_the_compiled_sender_keeps_its_reports_and_hellos():
    """SPROXY's own loop with the compiled sender on a real node kernel: the serving's first
    frame is its report HELLO; while commands keep coming (the C loop never waits out a
    get2rmt) to a peer that reads slowly (the loop's writes are cut, the link writes the
    rests and the commands fetched meanwhile, the loop takes over again once it is quiet),
    every command goes out once and in order, a report still follows every period (the loop
    comes back when it is due) and no keep-alive HELLO is sent; an idle link gets HELLOs;
    the serving ends when the link goes down."""
    with make_world() as world:
        rig = SendRig(world)
        monitor = OutMonitor()          # writes what a full socket left, as in the DSP
        watching = threading.Thread(target=monitor.run, daemon=True)
        watching.start()
        monitor.watch(rig.out, rig.link)
        rig.link.monitor = monitor
        stream = bytearray()            # node 2 reads all the time, slowly: the sockets
        rig.out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # take frames in part
        rig.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def read():
            while True:
                got = rig.peer.recv(1000)
                if not got:
                    return
                stream.extend(got)
                time.sleep(0.0005)
        rig.peer.settimeout(None)
        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        try:
            link, d = rig.link, rig.d
            hellos: list[tuple[float, bool]] = []

            def hello(peer: int, report: bool = False) -> Header:
                hellos.append((time.monotonic(), report))
                return hello_header(1, peer)
            ctx = SimpleNamespace(wires=rig.table, dvk=d, fd_interval_ms=100, period=0.4,
                                  hello=hello, stopping=threading.Event())
            sp = SProxy(ctx, link, None)
            sp.hdr, sp.payload = Header(), rig.px.spay
            serving = rig.px.sproxy.submit(sp._serve, link.generation)
            wait_until(lambda: hellos, 10, what="the first report")

            def busy(seconds: float) -> tuple[float, float, int]:
                start = time.monotonic()
                n = 0
                while time.monotonic() - start < seconds:
                    d.ntfy_value(LSYS, RSYS, n % 32)  # numbered: their order is checked
                    n += 1
                return start, time.monotonic(), n
            start, end, n = rig.progs[LSYS].submit(busy, 1.5).result(30)
            wait_until(lambda: sum(1 for _, r in hellos if not r and _ > end) >= 2, 10,
                       what=f"HELLOs of an idle link ({hellos})")
            with link.cond:                      # the link goes down
                link.up = False
                link.generation += 1
                link.wire.publish(None)
            serving.result(10)
            rig.out.shutdown(socket.SHUT_WR)           # node 2 reads to the end
            reading.join(10)
            frames = _frames(bytes(stream))
            assert frames[0][0] == C.CMD_NONE and hellos[0][1] is True
            assert [(f[0], f[1], f[7]) for f in frames if f[0] != C.CMD_NONE] == \
                [(C.CMD_NTFY_MSG, LSYS, i % 32) for i in range(n)]
            written = sum(1 for f in frames if f[0] == C.CMD_NONE)
            assert len(hellos) - 1 <= written <= len(hellos)   # the last: maybe refused
            during = [r for t, r in hellos if start + 0.1 < t < end - 0.1]
            assert during.count(True) >= 2 and False not in during, (hellos, start, end)
            assert link.wire.last_tx() >= start         # the commands went out by the C loop
        finally:
            rig.link.wire.publish(None)
            monitor.forget(rig.out)
            monitor.stop()
            watching.join(10)
            rig.peer.shutdown(socket.SHUT_RDWR)
            reading.join(10)
            rig.close()
