"""The compiled relay (dsp_proxy/fastpath.py) against the router it stands in for.

Two LB hosts get the same frames: one routes everything in Python, the other hands its
established sessions to the compiled relay.  Whatever the relay carries must leave it exactly as
the router would have sent it (same node, same bytes), every frame it leaves must get the
router's own answer, and the sessions must agree afterwards (pending request, counters, the
set of sessions).  The frames are valid session traffic and mutations of it.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from test_router import RELAYED, _report, _router

from bench import wire_peers as W
from cluster_helpers import fresh_net
from dsp_proxy import fastpath
from dsp_proxy.cluster import Cluster
from dsp_proxy.group import SEND, SERVER_GONE, SERVICE_DOWN
from dsp_proxy.rproxy import FrameError, WireLimits, check_header
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, ROUTE_STRUCT, Header, make_header

CONFIG = RELAYED.replace("lb_eps 100 101", "lb_eps 100 120")

LB_HOST, CLIENT, SERVERS = 5, 3, (1, 2)


def test_the_compiled_relay_is_built():
    """`make venv` builds it; without it every frame takes the Python path (still correct,
    but not what the benchmarks measure)."""
    assert fastpath.lib is not None, "dsp_proxy/_fastrelay is not built: run make venv"


class Reader:
    """The part of a receiver's read buffer the relay uses."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def load(self, data: bytes) -> None:
        self.buf[:len(data)] = data
        self.start, self.end = 0, len(data)


class Sink:
    """A link that takes every span (what the relay wrote is what the test compares)."""

    def __init__(self, node: int, spans: list) -> None:
        self.node, self.spans = node, spans

    def submit_span(self, span, nframes: int) -> int:
        self.spans.append((self.node, bytes(span), nframes))
        return 0


class Twins:
    """The same LB host twice: A with the compiled relay, B with the router only."""

    def __init__(self) -> None:
        self.ra, self.ga, _, self.clock_a = _router(CONFIG)
        self.rb, self.gb, _, self.clock_b = _router(CONFIG)
        self.table = fastpath.FlowTable(LB_HOST, 0, C.NR_NODES, C.NR_DCS,
                                        SERVER_GONE | SERVICE_DOWN)
        ranges = {dc: (C.NR_TASKS, C.NR_PROCS) for dc in range(C.NR_DCS)}
        self.limits = WireLimits(C.NR_NODES, C.NR_DCS, dc_ranges=ranges)
        for node in range(C.NR_NODES):
            self.table.set_raw_ok(node, True)
        for dc, rng in ranges.items():
            self.table.set_dc(dc, rng)
        self.ga.fast = self.table
        self.spans: list = []
        self.links = {n: Sink(n, self.spans) for n in range(C.NR_NODES)}
        self.reader = Reader()
        self.relays: dict[int, fastpath.Relay] = {}
        self.relayed = self.python = 0

    def _route(self, router, frame: bytes, peer: int):
        f = ROUTE_STRUCT.unpack_from(frame)
        try:
            check_header(f, peer, self.limits)
        except FrameError:
            return "refused"
        hbuf, payload = frame[:HEADER_SIZE], memoryview(frame[HEADER_SIZE:])
        acts = router.from_network(hbuf, f, payload, peer, False)
        acts = [] if acts is None else acts if isinstance(acts, list) else [acts]
        return [_plain(a) for a in acts]

    def feed(self, frame: bytes, peer: int) -> None:
        expected = self._route(self.rb, frame, peer)
        relay = self.relays.get(peer)
        if relay is None:
            relay = self.relays[peer] = fastpath.Relay(self.table, self.reader, peer,
                                                       self.links, _no_refusal)
        self.reader.load(frame)
        self.spans.clear()
        relay()
        if self.reader.start == len(frame):
            self.relayed += 1
            (node, out, nframes), = self.spans
            assert nframes == 1
            assert expected != "refused", "the relay carried a frame the check refuses"
            ((kind, to, hbuf, data),) = expected
            assert (kind, to) == (SEND, node)
            assert out == hbuf + (data or b""), _diff(out, hbuf)
        else:
            assert self.reader.start == 0 and not self.spans
            self.python += 1
            assert self._route(self.ra, frame, peer) == expected
        self.compare()

    def compare(self) -> None:
        """The sessions of A (with what the relay kept) and of B agree."""
        with self.ga.lock:
            self.ga._fast_sync()
        a, b = self.ga.sessions, self.gb.sessions
        assert a.keys() == b.keys()
        for key, sa in a.items():
            sb = b[key]
            assert (sa.pending, sa.commands, sa.bytes, sa.svr_node, sa.lbsvr_ep, sa.svr_pid,
                    sa.to_server, sa.first is None) == \
                   (sb.pending, sb.commands, sb.bytes, sb.svr_node, sb.lbsvr_ep, sb.svr_pid,
                    sb.to_server, sb.first is None), key
            assert sa.last_used == sb.last_used
        for nid, srv in self.ga.servers.items():
            other = self.gb.servers[nid]
            assert (srv.commands, srv.bytes, srv.sessions) == \
                   (other.commands, other.bytes, other.sessions)

    def advance(self, seconds: float) -> None:
        self.clock_a[0] += seconds
        self.clock_b[0] += seconds
        acts_a = [_plain(a) for a in self.ga.tick()]
        acts_b = [_plain(a) for a in self.gb.tick()]
        assert acts_a == acts_b


def _plain(act):
    if act[0] == SEND:
        return (SEND, act[1], bytes(act[2]), bytes(act[3]) if act[3] is not None else None)
    return tuple(bytes(x) if isinstance(x, (bytearray, memoryview)) else x for x in act)


def _no_refusal(hbuf: bytes, code: int) -> None:
    raise AssertionError("a sink refused nothing")


def _diff(a: bytes, b: bytes) -> str:
    fa, fb = Header(bytearray(a[:HEADER_SIZE])), Header(bytearray(b[:HEADER_SIZE]))
    return f"relay {fa!r}\nrouter {fb!r}"


def _frame(rng: random.Random, cmd: int, src: int, dst: int, snode: int, dnode: int,
           pid: int, rcode: int = 0, eps=(50, 10, 100)) -> bytes:
    length = rng.choice((1, 7, 300)) if cmd in C.DATA_CMDS else 0
    v = [rng.choice(eps) for _ in range(3)]
    h = make_header(c_cmd=cmd, c_dcid=0, c_src=src, c_dst=dst, c_snode=snode, c_dnode=dnode,
                    c_pid=pid, c_rcode=rcode, c_len=length, v_src=v[0], v_dst=v[1],
                    v_rqtr=v[2], v_bytes=length)
    h.c_msg.m_source = rng.choice((src, dst, 7))
    h.c_msg.m_type = 0x0A
    return bytes(h.buf) + bytes(rng.randrange(256) for _ in range(length))


def _establish(t: Twins, src: int = 50, dst: int = 10, pid: int = 77) -> tuple[int, int]:
    """A client's first request and the server's reply: the session is established (and
    handed to the relay in A).  Returns (server node, the client as the server sees it)."""
    rng = random.Random(0)
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, src, dst, CLIENT, 0, pid), CLIENT)
    sess = t.gb.sessions[(0, CLIENT, src, 10)]
    t.feed(_frame(rng, C.CMD_SEND_MSG, dst, sess.lbsvr_ep, sess.svr_node, LB_HOST, 900),
           sess.svr_node)
    assert t.ga.sessions[(0, CLIENT, src, 10)].fast_sid >= 0
    return sess.svr_node, sess.lbsvr_ep


def test_a_sendrec_session_is_relayed_as_the_router_would_send_it():
    t = Twins()
    svr, lbsvr = _establish(t)
    rng = random.Random(1)
    for _ in range(50):
        t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)
        t.feed(_frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 900), svr)
        t.feed(_frame(rng, C.CMD_SEND_ACK, 50, 10, CLIENT, 0, 77), CLIENT)
    assert t.relayed == 150
    sess = t.ga.sessions[(0, CLIENT, 50, 10)]
    assert sess.pending == 0 and sess.commands == 1 + 100


def test_what_the_relay_cannot_decide_goes_to_the_router():
    """A new PID, a session-ending error code, another endpoint of the service, a frame the
    check refuses: each leaves the relay and gets the router's answer."""
    t = Twins()
    svr, lbsvr = _establish(t)
    rng = random.Random(2)
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 11, CLIENT, 0, 77), CLIENT)   # new mapping
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)   # relayed again
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 7, 77), CLIENT)   # bad dnode
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, 4, 0, 77), CLIENT)        # not the peer
    t.feed(_frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 901), svr)  # server's new PID
    t.feed(_frame(rng, C.CMD_SNDREC_ACK, 10, lbsvr, svr, LB_HOST, 0, E.EDVSDSTDIED), svr)
    assert (0, CLIENT, 50, 10) not in t.ga.sessions       # the server endpoint died
    _establish(t)
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 78), CLIENT)   # the client's new PID
    assert (t.relayed, t.python) == (1, 10)


def test_idle_sessions_expire_as_with_the_router():
    t = Twins()
    svr, lbsvr = _establish(t)
    rng = random.Random(3)
    t.feed(_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77), CLIENT)
    t.advance(1.0)
    t.feed(_frame(rng, C.CMD_SEND_MSG, 10, lbsvr, svr, LB_HOST, 900), svr)
    t.advance(t.ga.session_timeout + 1)
    assert not t.ga.sessions and not t.gb.sessions


@pytest.mark.parametrize("seed", range(6))
def test_mutated_session_traffic_agrees_with_the_router(seed):
    """Random commands, fields and flags around three established sessions; thousands of
    frames, each compared."""
    rng = random.Random(seed)
    t = Twins()
    clients = (50, 51, 52)
    for src in clients:
        _establish(t, src=src)
    cmds = sorted(C.VALID_CMDS) + [0x55, C.MASK_ACKNOWLEDGE | 0x1F]
    flags = (0, 0, 0, C.FLAG_CHECK_HDR, C.FLAG_BATCH, C.FLAG_LZ4, C.FLAG_DSP_PEER)
    codes = (0, 0, 0, E.EDVSDSTDIED, E.EDVSNOTREADY, E.EDVSAGAIN, E.EDVSSRCDIED)
    for i in range(3000):
        if i % 500 == 499:
            t.advance(rng.choice((0.5, 5.0)))
        src = rng.choice(clients)
        cmd = rng.choice(cmds)
        if rng.random() < 0.5:       # the client's side
            frame = _frame(rng, cmd, src, rng.choice((10, 10, 11, 30)), CLIENT,
                           rng.choice((0, 0, 0, LB_HOST, 2)), rng.choice((77, 77, 0, -1, 78)),
                           rng.choice(codes), eps=(src, 10, 11, 100, 101))
            peer = CLIENT
        else:                        # a server's side
            sess = t.gb.sessions.get((0, CLIENT, src, 10))
            svr = sess.svr_node if sess is not None else rng.choice(SERVERS)
            lbsvr = sess.lbsvr_ep if sess is not None else 100
            frame = _frame(rng, cmd, rng.choice((10, 10, 11)), rng.choice((lbsvr, lbsvr, 101)),
                           svr, rng.choice((LB_HOST, LB_HOST, 0)),
                           rng.choice((900, 900, 0, 901)), rng.choice(codes),
                           eps=(10, 11, lbsvr, 50))
            peer = svr
        frame = bytearray(frame)
        f = Header(memoryview(frame)[:HEADER_SIZE])
        f.c_flags = rng.choice(flags)
        if rng.random() < 0.05:
            f.c_batch_nr = 1
        if rng.random() < 0.05:
            f.c_dcid = rng.choice((1, 31, 40, -1))
        t.feed(bytes(frame), peer)
        for s in clients:                # a session that ended starts again
            if (0, CLIENT, s, 10) not in t.gb.sessions and rng.random() < 0.2:
                for node in SERVERS:     # the service is bound again where it went down
                    for group in (t.ga, t.gb):
                        _report(group, node)
                _establish(t, src=s)
    assert t.relayed > 300 and t.python > 300


def test_a_refused_span_answers_the_clients_requests():
    """A link that refuses what the relay wrote (down, full): the counted frames are taken
    back and every request in the span gets the router's error reply for its client."""
    t = Twins()
    svr, _ = _establish(t)
    replies = []

    def refused(hbuf: bytes, code: int) -> None:
        replies.append(t.ga.fast_refused(hbuf, code))

    class Down:
        def submit_span(self, span, nframes):
            return E.EDVSNOTCONN

    links = {n: Down() for n in range(C.NR_NODES)}
    relay = fastpath.Relay(t.table, t.reader, CLIENT, links, refused)
    rng = random.Random(4)
    frames = [_frame(rng, C.CMD_SNDREC_MSG, 50, 10, CLIENT, 0, 77),
              _frame(rng, C.CMD_SEND_ACK, 50, 10, CLIENT, 0, 77)]
    t.reader.load(b"".join(frames))
    assert relay() is False and t.reader.start == t.reader.end
    (node, ack, _data, _request, _relayed) = replies[0][1:]
    assert replies[1] is None              # an ACK answers nobody
    expected = t.gb.error_reply(Header(bytearray(frames[0][:HEADER_SIZE])), E.EDVSNOTCONN,
                                True)
    assert (node, bytes(ack)) == (expected[1], bytes(expected[2])) == (CLIENT, bytes(ack))
    sent = fastpath.ffi.new("relay_tally *")
    fastpath.lib.rt_fold(t.table.table, svr, 1, sent)
    assert (sent.frames, sent.bytes) == (0, 0)


@pytest.mark.parametrize("fast", ["1", "0"], ids=["compiled-relay", "python-path"])
def test_relayed_copy_data_keeps_every_byte_while_the_server_reads_slowly(tmp_path, monkeypatch,
                                                                          fast):
    """A real LB host relays 8 MiB of 64 KiB COPY frames to a server peer that does not read
    for a while: its socket fills, writes stop halfway and what is left, sent or queued, stays
    a view of the read buffer until it is copied.  Every frame arrives whole, in order, with
    its own bytes, rewritten for the server; by the compiled relay and by the router alike."""
    monkeypatch.setenv(fastpath.ENV, fast)
    net = fresh_net()
    cfg = tmp_path / "hop.cfg"
    cfg.write_text(W.CONFIG.format(net=net, opts=""))
    cluster = Cluster(cfg, rundir=str(tmp_path), log_level="WARNING")
    hop = None
    try:
        cluster.start_kernel(W.HOST)
        hop = W.DspHop(net, lambda: cluster.start_dsp(W.HOST))
        frames = [W.copy_frame() for _ in range(128)]
        with hop.quiet():                      # no HELLOs between the frames meanwhile
            sender = threading.Thread(target=hop.c_tx.sendall, args=(b"".join(frames),))
            sender.start()
            time.sleep(1.0)                    # the server peer reads nothing yet
            hop.s_rx.settimeout(20)
            for k, frame in enumerate(frames):
                while True:
                    hdr = W.recv_exact(hop.s_rx, HEADER_SIZE)
                    h = Header(bytearray(hdr))
                    data = W.recv_exact(hop.s_rx, h.c_len) if h.c_len else b""
                    if h.c_cmd != C.CMD_NONE:
                        break
                assert (h.c_cmd, h.c_snode, h.c_dnode, h.c_dst) == \
                    (C.CMD_COPYIN_DATA, W.HOST, W.SRV, W.EXT_EP), k
                assert data == frame[HEADER_SIZE:], f"frame {k} changed on the way"
            sender.join(20)
        deadline = time.monotonic() + 10     # the status file is written every tick
        while True:
            st = cluster.status(W.HOST)
            sent = st["links"][str(W.SRV)]["sent"]["by_cmd"].get(str(C.CMD_COPYIN_DATA))
            if sent == len(frames) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sent == len(frames)
        assert st["fast_relay"] is (fast == "1")
        assert st["group"]["fast_sessions"] == (fast == "1")
    finally:
        if hop is not None:
            hop.close()
        cluster.stop()
