"""Two emulated nodes joined by a minimal relay: remote IPC end to end.

Nodes 1 (A) and 2 (B) are node kernel processes with their own sockets.  For each direction a
sender-proxy thread on the source node takes commands with get2rmt and hands header + payload
bytes to a receiver-proxy thread on the destination node, which copies the payload into its own
payload buffer and calls put2lcl — what a proxy does, minus the network.  Every header that
crosses and every put2lcl result is recorded, so the tests check the exact command sequences of
remote IPC (latency pattern, send + ACK, notify, vcopy chunks, error ACKs).
"""

from __future__ import annotations

import queue
import time

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import MESSAGE_SIZE, Header, Message
from emu_helpers import (
    DC0,
    SHORT,
    error_of,
    make_world,
    msg,
    raises_code,
    wait_until,
)

SRV, CLT, SND = 20, 40, 11     # server on B (system), client on A (user), sender on A (system)


class Direction:
    """One direction of the relay: get2rmt on `src`, put2lcl on `dst`."""

    def __init__(self, world, src, dst, name: str) -> None:
        self.src, self.dst, self.name = src, dst, name
        self.spay = src.alloc(C.MAXCOPYBUF)
        self.rpay = dst.alloc(C.MAXCOPYBUF)
        self.q: queue.Queue = queue.Queue()
        self.headers: list[Header] = []                 # what get2rmt gave, in order
        self.results: list[tuple[Header, int]] = []     # put2lcl result or error code
        self.proxy_rc: dict[str, int] = {}
        self.sender = world.loop(self._send_body, f"{name}-s")
        self.receiver = world.loop(self._recv_body, f"{name}-r")

    def _wait_proxy(self, dvk, role: str) -> None:
        # the C proxies poll wait4bind(SELF) until proxies_bind registered them
        self.proxy_rc[role] = dvk.wait4bind(20000)

    def _send_body(self, lp) -> None:
        self._wait_proxy(self.src, "s")
        h = Header()
        while not lp.stopping.is_set():
            try:
                self.src.get2rmt(h, self.spay, 100)
            except E.DvkError as err:
                if err.code == E.EDVSSHUTDOWN:
                    return
                if err.code != E.EDVSTIMEDOUT:
                    time.sleep(0.02)  # e.g. EDVSNOTCONN while a test has the link down
                continue
            data = self.spay.read(h.c_len) if h.c_len > 0 else b""
            self.headers.append(h.copy())
            self.q.put((h.copy(), data))

    def _recv_body(self, lp) -> None:
        self._wait_proxy(self.dst, "r")
        while not lp.stopping.is_set():
            try:
                h, data = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if data:
                self.rpay.write(data)
            try:
                rc = self.dst.put2lcl(h, self.rpay)
            except E.DvkError as err:
                if err.code == E.EDVSSHUTDOWN:
                    return
                rc = err.code
            self.results.append((h, rc))

    def wait(self, n: int) -> list[tuple[Header, int]]:
        """The first `n` put2lcl results (waits for them)."""
        wait_until(lambda: len(self.results) >= n, what=f"{n} commands {self.name}")
        return self.results[:n]

    def cmds(self) -> list[int]:
        return [h.c_cmd for h in self.headers]


class Cluster:
    def __init__(self, world) -> None:
        self.world = world
        self.A, self.B = world.proc_node(1), world.proc_node(2)
        self.dA, self.dB = world.dvk(self.A), world.dvk(self.B)
        self.ab = Direction(world, self.dA, self.dB, "1to2")
        self.ba = Direction(world, self.dB, self.dA, "2to1")
        # A's pair for node 2: its sender is ab's get2rmt thread, its receiver ba's put2lcl one
        self.dA.proxies_bind("node2", 2, self.ab.sender.tid, self.ba.receiver.tid)
        self.dB.proxies_bind("node1", 1, self.ba.sender.tid, self.ab.receiver.tid)
        for d, peer in ((self.dA, 2), (self.dB, 1)):
            d.node_up(f"node{peer}", peer, peer)
            d.proxy_conn(peer, C.CONNECT_SPROXY)
            d.proxy_conn(peer, C.CONNECT_RPROXY)
            d.add_node(DC0, peer)
        for direction in (self.ab, self.ba):
            wait_until(lambda dr=direction: len(dr.proxy_rc) == 2)
            assert direction.proxy_rc == {"s": C.NONE, "r": C.NONE}

    def on(self, d, ep: int, name: str):
        """An actor bound to `ep` on the node of `d`."""
        a = self.world.actor(name)
        assert a.call(d.bind, DC0, ep) == ep
        return a

    def receiving(self, d, ep: int) -> None:
        wait_until(lambda: d.getprocinfo(DC0, ep).p_rts_flags & C.RECEIVING,
                   what=f"{ep} receiving")


@pytest.fixture
def world():
    with make_world() as w:
        yield w


@pytest.fixture
def cl(world):
    c = Cluster(world)
    yield c
    # a proxy loop that died left its direction silent: "nothing was sent" meant nothing
    for lp in (c.ab.sender, c.ab.receiver, c.ba.sender, c.ba.receiver):
        assert lp.error is None, f"proxy loop {lp.thread.name} died: {lp.error!r}"


def check(h: Header, **want) -> None:
    got = {k: getattr(h, k) for k in want}
    assert got == want, f"{h!r}"


def test_link_state(cl):
    for d, peer in ((cl.dA, 2), (cl.dB, 1)):
        n = d.getnodeinfo(peer)
        assert (n.n_flags, n.n_proxies) == (0xE, peer)
        assert d.getdcinfo(DC0).dc_nodes == 0b110
        assert d.getproxyinfo(peer)[0].p_misc_flags == C.MIS_PROXY | C.MIS_CONNECTED


def test_remote_sendrec_latency_pattern(cl):
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "client", CLT, 1)
    srv = cl.on(cl.dB, SRV, "srv")
    clt = cl.on(cl.dA, CLT, "clt")
    m = Message()
    sfut = srv.submit(cl.dB.receive, C.ANY, m)
    cl.receiving(cl.dB, SRV)
    req = msg(m_type=0x77, m1_i1=1234)
    cfut = clt.submit(cl.dA.sendrec, SRV, req)
    sfut.result(10)
    assert (m.m_source, m.m_type, m.m1_i1) == (CLT, 0x77, 1234)
    assert srv.call(cl.dB.send, CLT, msg(m_type=0x78, m1_i1=1235)) == 0   # after SEND_ACK
    cfut.result(10)
    assert (req.m_source, req.m_type, req.m1_i1) == (SRV, 0x78, 1235)
    # the three headers of a remote sendrec, no payload
    (h1, rc1), (h3, rc3) = cl.ab.wait(2)
    ((h2, rc2),) = cl.ba.wait(1)
    check(h1, c_cmd=C.CMD_SNDREC_MSG, c_src=CLT, c_dst=SRV, c_snode=1, c_dnode=2, c_len=0,
          c_dcid=DC0, c_rcode=0)
    check(h2, c_cmd=C.CMD_SEND_MSG, c_src=SRV, c_dst=CLT, c_snode=2, c_dnode=1, c_len=0)
    check(h3, c_cmd=C.CMD_SEND_ACK, c_src=CLT, c_dst=SRV, c_snode=1, c_dnode=2, c_len=0,
          c_rcode=0)
    assert h1.c_msg.m_source == CLT and h2.c_msg.m_source == SRV
    assert (rc1, rc2, rc3) == (MESSAGE_SIZE, MESSAGE_SIZE, 0)
    assert cl.ab.cmds() == [C.CMD_SNDREC_MSG, C.CMD_SEND_ACK]
    assert cl.ba.cmds() == [C.CMD_SEND_MSG]
    # the latency loop: a server thread answers, the client does 50 more round trips
    def serve(count):
        for _ in range(count):
            cl.dB.receive(C.ANY, m)
            cl.dB.send(m.m_source, msg(m_type=m.m_type + 1))

    sfut = srv.submit(serve, 50)
    for i in range(50):
        r = msg(m_type=1000 + 2 * i)
        clt.call(cl.dA.sendrec, SRV, r)
        assert (r.m_source, r.m_type) == (SRV, 1001 + 2 * i)
    sfut.result(10)
    assert len(cl.ab.wait(102)) == 102
    assert all(rc >= 0 for _h, rc in cl.ab.results + cl.ba.results)
    assert cl.dA.getnodeinfo(2).n_pxsent == 102


def test_remote_send_waits_for_ack(cl):
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "sender", SND, 1)
    srv = cl.on(cl.dB, SRV, "srv")
    snd = cl.on(cl.dA, SND, "snd")
    fut = snd.submit(cl.dA.send, SRV, msg(m_type=5, m1_i1=55))
    ((h, rc),) = cl.ab.wait(1)
    check(h, c_cmd=C.CMD_SEND_MSG, c_src=SND, c_dst=SRV)
    assert rc == 0                                  # the server was not receiving: queued
    time.sleep(0.2)
    assert not fut.done() and cl.ba.headers == []   # no ACK before the receive
    m = Message()
    srv.call(cl.dB.receive, C.ANY, m)
    assert (m.m_source, m.m_type, m.m1_i1) == (SND, 5, 55)
    assert fut.result(10) == 0
    ((ack, rc),) = cl.ba.wait(1)
    check(ack, c_cmd=C.CMD_SEND_ACK, c_src=SRV, c_dst=SND, c_snode=2, c_dnode=1, c_rcode=0)
    assert rc == 0


def test_notify_across_nodes(cl):
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "notifier", SND, 1)
    srv = cl.on(cl.dB, SRV, "srv")
    ntf = cl.on(cl.dA, SND, "ntf")
    assert ntf.call(cl.dA.notify, SRV) == 0         # returns when the proxy took it
    ((h, rc),) = cl.ab.wait(1)
    check(h, c_cmd=C.CMD_NTFY_MSG, c_src=SND, c_dst=SRV)
    assert rc == 0                                   # pending on B
    m = Message()
    srv.call(cl.dB.receive, C.ANY, m)
    assert (m.m_source, m.m_type) == (SND, C.NOTIFY_FROM(SND))
    fut = srv.submit(cl.dB.receive, C.ANY, m)
    cl.receiving(cl.dB, SRV)
    ntf.call(cl.dA.notify, SRV)
    fut.result(10)
    assert (m.m_source, m.m_type) == (SND, C.NOTIFY_FROM(SND))
    assert cl.ab.wait(2)[1][1] == MESSAGE_SIZE       # delivered directly
    time.sleep(0.3)
    assert cl.ba.headers == []                       # a notify is never acknowledged


def test_remote_vcopy_both_directions(cl):
    n = 200 * 1024                                    # 4 chunks of at most 64 KiB
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "client", CLT, 1)
    srv = cl.on(cl.dB, SRV, "srv")
    clt = cl.on(cl.dA, CLT, "clt")
    c_out, c_in = cl.dA.alloc(n), cl.dA.alloc(n)
    pattern1 = bytes((i * 7 + 3) & 0xFF for i in range(n))
    pattern2 = bytes((i * 13 + 1) & 0xFF for i in range(n))
    c_out.write(pattern1)
    req = Message()
    sfut = srv.submit(cl.dB.receive, C.ANY, req)
    cl.receiving(cl.dB, SRV)
    cfut = clt.submit(cl.dA.sendrec, SRV, msg(m_type=1, m1_i1=n, m1_p1=c_out.addr,
                                               m1_p2=c_in.addr))
    sfut.result(10)
    assert (req.m1_i1, req.m1_p1, req.m1_p2) == (n, c_out.addr, c_in.addr)
    s_in, s_out = cl.dB.alloc(n), cl.dB.alloc(n)
    s_out.write(pattern2)
    # remote source -> local destination: COPYOUT_RQST / COPYOUT_DATA per chunk
    assert srv.call(cl.dB.vcopy, CLT, req.m1_p1, C.SELF, s_in.addr, n) == 0
    assert s_in.read() == pattern1
    # local source -> remote destination: COPYIN_DATA / COPYIN_ACK per chunk
    assert srv.call(cl.dB.vcopy, C.SELF, s_out.addr, CLT, req.m1_p2, n) == 0
    srv.call(cl.dB.send, CLT, msg(m_type=2))
    cfut.result(10)
    assert c_in.read() == pattern2
    chunks = [65536, 65536, 65536, n - 3 * 65536]
    ab, ba = cl.ab.wait(10), cl.ba.wait(9)
    assert [h.c_cmd for h, _ in ba] == [C.CMD_COPYOUT_RQST] * 4 + [C.CMD_COPYIN_DATA] * 4 + \
        [C.CMD_SEND_MSG]
    assert [h.c_cmd for h, _ in ab] == [C.CMD_SNDREC_MSG] + [C.CMD_COPYOUT_DATA] * 4 + \
        [C.CMD_COPYIN_ACK] * 4 + [C.CMD_SEND_ACK]
    assert [h.c_len for h, _ in ba[:4]] == [0] * 4
    assert [h.v_bytes for h, _ in ba[:4]] == chunks
    assert [h.c_len for h, _ in ab[1:5]] == chunks        # the data rides on COPYOUT_DATA
    assert [h.c_len for h, _ in ba[4:8]] == chunks        # and on COPYIN_DATA
    assert [h.c_len for h, _ in ab[5:9]] == [0] * 4
    for h, _ in ba[:4]:
        check(h, c_src=SRV, c_dst=CLT, v_src=CLT, v_dst=SRV, v_rqtr=SRV)
    for i, (h, _) in enumerate(ba[4:8]):
        check(h, c_src=SRV, c_dst=CLT, v_src=SRV, v_dst=CLT, v_daddr=c_in.addr + i * 65536)
    assert all(rc >= 0 for _h, rc in ab + ba)
    assert [rc for _h, rc in ab[1:5]] == chunks           # put2lcl returns the bytes written
    assert cl.dB.getprocinfo(DC0, SRV).p_rmtcopy == 8


def test_error_ack_when_destination_not_bound(cl):
    cl.dA.rmtbind(DC0, "ghost", 25, 2)               # nobody has endpoint 25 on B
    cl.dB.rmtbind(DC0, "sender", SND, 1)
    snd = cl.on(cl.dA, SND, "snd")
    with raises_code(E.EDVSDSTDIED):
        snd.call(cl.dA.send, 25, Message())
    ((h, rc),) = cl.ab.wait(1)
    check(h, c_cmd=C.CMD_SEND_MSG, c_src=SND, c_dst=25)
    assert rc == E.EDVSDSTDIED                       # B's put2lcl failed (row 13) ...
    ((ack, rc),) = cl.ba.wait(1)                     # ... and sent the error ACK back
    check(ack, c_cmd=C.CMD_SEND_ACK, c_src=25, c_dst=SND, c_snode=2, c_dnode=1,
          c_rcode=E.EDVSDSTDIED, c_len=0)
    assert rc == 0
    # a sendrec caller: the error ACK comes back as SEND_ACK and is refused (EDVSACKDST,
    # a module quirk the DSP relies on); the caller times out
    cl.dB.rmtbind(DC0, "client", CLT, 1)
    clt = cl.on(cl.dA, CLT, "clt")
    with raises_code(E.EDVSTIMEDOUT):
        clt.call(cl.dA.sendrec, 25, Message(), 1000)
    (_h, rc_b) = cl.ab.wait(2)[1]
    (ack, rc_a) = cl.ba.wait(2)[1]
    assert rc_b == E.EDVSDSTDIED
    check(ack, c_cmd=C.CMD_SEND_ACK, c_src=25, c_dst=CLT, c_rcode=E.EDVSDSTDIED)
    assert rc_a == E.EDVSACKDST


def test_error_ack_for_unbound_sender_is_not_sent(cl):
    """Row 6 (source not bound on B) sends no ACK: the sender waits until its timeout."""
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.on(cl.dB, SRV, "srv")
    snd = cl.on(cl.dA, SND, "snd")                   # B has no rmtbind of SND
    with raises_code(E.EDVSTIMEDOUT):
        snd.call(cl.dA.send, SRV, Message(), 800)
    ((_h, rc),) = cl.ab.wait(1)
    assert rc == E.EDVSNOTBIND
    assert cl.ba.headers == []


def test_disconnect_rproxy_wakes_remote_sendrec(cl):
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "client", CLT, 1)
    cl.on(cl.dB, SRV, "srv")                          # bound, never receives
    clt = cl.on(cl.dA, CLT, "clt")
    fut = clt.submit(cl.dA.sendrec, SRV, Message())
    ((_h, rc),) = cl.ab.wait(1)
    assert rc == 0                                    # queued on B
    wait_until(lambda: cl.dA.getprocinfo(DC0, CLT).p_rts_flags == C.RECEIVING)
    assert not fut.done()
    cl.dA.proxy_conn(2, C.DISCONNECT_RPROXY)
    assert error_of(fut) == E.EDVSNOTCONN
    assert cl.dA.getnodeinfo(2).n_flags == 0x6
    with raises_code(E.EDVSNOTCONN):                  # nothing can come from node 2 now
        cl.on(cl.dA, SND, "rcv").call(cl.dA.receive, SRV, Message(), SHORT)


def test_remote_copy_between_two_processes_of_the_other_node(cl):
    """vcopy by A between two endpoints of B: COPYLCL_RQST / COPYLCL_ACK per chunk."""
    n = 100 * 1024
    for ep in (SRV, SRV + 1):
        cl.dA.rmtbind(DC0, f"p{ep}", ep, 2)
    cl.dB.rmtbind(DC0, "requester", SND, 1)
    cl.on(cl.dB, SRV, "p")
    cl.on(cl.dB, SRV + 1, "q")
    rq = cl.on(cl.dA, SND, "rq")
    src, dst = cl.dB.alloc(n), cl.dB.alloc(n)
    data = bytes((i * 31 + 7) & 0xFF for i in range(n))
    src.write(data)
    assert rq.call(cl.dA.vcopy, SRV, src.addr, SRV + 1, dst.addr, n) == 0
    assert dst.read() == data
    assert cl.ab.cmds() == [C.CMD_COPYLCL_RQST] * 2
    assert [h.c_cmd for h, _ in cl.ba.wait(2)] == [C.CMD_COPYLCL_ACK] * 2
    assert [h.v_bytes for h in cl.ab.headers] == [65536, n - 65536]
    assert all(h.c_len == 0 for h in cl.ab.headers + cl.ba.headers)


def test_client_killed_while_served(cl, world):
    """The client process dies while the server on B works on its request: the server's
    reply fails with EDVSDSTDIED, brought back by the error ACK of A's put2lcl."""
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    cl.dB.rmtbind(DC0, "client", 15, 1)
    srv = cl.on(cl.dB, SRV, "srv")
    m = Message()
    sfut = srv.submit(cl.dB.receive, C.ANY, m)
    cl.receiving(cl.dB, SRV)
    child = world.child(cl.A, 15, "sendrec", SRV)
    child.expect("READY")
    sfut.result(10)
    assert (m.m_source, m.m_type) == (15, 77)
    child.kill()
    wait_until(lambda: cl.dA.getprocinfo(DC0, 15).p_rts_flags == C.SLOT_FREE)
    with raises_code(E.EDVSDSTDIED):
        srv.call(cl.dB.send, 15, Message())
    (h, rc) = cl.ba.wait(1)[0]
    assert (h.c_cmd, rc) == (C.CMD_SEND_MSG, E.EDVSDSTDIED)
    check(cl.ab.wait(2)[1][0], c_cmd=C.CMD_SEND_ACK, c_src=15, c_dst=SRV,
          c_rcode=E.EDVSDSTDIED)


def test_concurrent_clients_through_the_relay(cl):
    cl.dA.rmtbind(DC0, "server", SRV, 2)
    clients = []
    for i in range(3):
        cl.dB.rmtbind(DC0, f"c{i}", CLT + i, 1)
        clients.append(cl.on(cl.dA, CLT + i, f"c{i}"))
    srv = cl.on(cl.dB, SRV, "srv")
    rounds = 15

    def serve():
        m = Message()
        for _ in range(rounds * len(clients)):
            cl.dB.receive(C.ANY, m)
            cl.dB.send(m.m_source, msg(m_type=m.m_type, m1_i1=m.m1_i1 + 1, m1_i2=m.m_source))

    def client(i):
        for j in range(rounds):
            r = msg(m_type=i, m1_i1=100 * i + j)
            cl.dA.sendrec(SRV, r)
            assert (r.m_source, r.m_type, r.m1_i1, r.m1_i2) == (SRV, i, 100 * i + j + 1,
                                                                 CLT + i)
        return rounds

    sfut = srv.submit(serve)
    futs = [c.submit(client, i) for i, c in enumerate(clients)]
    assert [f.result(30) for f in futs] == [rounds] * len(clients)
    sfut.result(10)
    assert all(rc >= 0 for _h, rc in cl.ab.results + cl.ba.results)
