"""The LB's raw-header fast path gives the very frames the full path gives, and the relayed
endpoint pool is per DC (issue: speed).  No processes: a Group over a fake DSP and links."""

from __future__ import annotations

from types import SimpleNamespace

from dsp_proxy import config as cfgmod
from dsp_proxy import topology
from dsp_proxy.group import Group
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Header, make_header

CFG = """
lb node0 { nodeid 0; cltname lbhost; lb_eps 100 101; max_sessions 150; period 30; }
server node1 { nodeid 1; rname 127.0.0.1; }
client node3 { nodeid 3; rname 127.0.0.3; }
client lbhost { nodeid 5; rname 127.0.0.5; }
service latency { ext_ep 10; min_ep 10; max_ep 19; bind external; }
"""


class FakeLink:
    def __init__(self):
        self.up = True
        self.frames = []
        self.received = SimpleNamespace(frames=0)

    def submit(self, hbuf, data=None, generation=None, copy=True):
        self.frames.append((bytes(hbuf), bytes(data) if data else b""))
        return True


def _group():
    cfg = cfgmod.parse_text(CFG.replace("}\n", "};\n"))
    links = {1: FakeLink(), 0: FakeLink()}
    errors = []
    dsp = SimpleNamespace(cfg=cfg, local=5, relay_host=topology.relay_host(cfg),
                          node_pids=lambda: set(), links=links, on_no_server=lambda: None,
                          put2lcl=SimpleNamespace(put=lambda h, d=b"": errors.append(h)))

    def send_to_node(node, h, data=b""):
        if node == 3:       # the relayed client's link (the LB node's pair)
            errors.append(h)
            return True
        return links[node].submit(h.buf, data)
    dsp.send_to_node = send_to_node
    g = Group(dsp)
    s = g.servers[1]
    s.level, s.reported = C.LVL_IDLE, 1.0
    return g, links, errors


def _req(cmd=C.CMD_SNDREC_MSG, dcid=0, src=50, dst=10, pid=77):
    h = make_header(c_cmd=cmd, c_dcid=dcid, c_src=src, c_dst=dst, c_snode=3, c_dnode=0,
                    c_pid=pid)
    h.c_msg.m_source, h.c_msg.m_type = src, 0x0A
    return h


def test_fast_path_frames_equal_the_full_path():
    g, links, _ = _group()
    g.from_network(_req(), b"", None)              # the first request creates the session
    (first, _), = links[1].frames
    sess = next(iter(g.sessions.values()))
    assert sess.lbsvr_ep == 100 and sess.svr_node == 1
    # the next request takes the fast path: same bytes as the full rewrite would give
    req = _req(cmd=C.CMD_SEND_MSG)
    assert g.fast_path(memoryview(bytes(req.buf)), req.route(), memoryview(b""))
    fast, _ = links[1].frames[-1]
    assert fast == bytes(g._rewrite_forward(req, sess).buf)
    out = Header(bytearray(fast))
    assert (out.c_snode, out.c_dnode, out.c_src, out.c_dst, out.c_msg.m_source) == \
        (5, 1, 100, 10, 100)
    assert out.c_flags & C.FLAG_CHECK_HDR
    # a COPY frame with a payload: the vcopy endpoints are translated too
    cp = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=50, c_dst=10, c_snode=3,
                     c_dnode=0, c_pid=77, c_len=5, v_src=50, v_dst=10, v_rqtr=50, v_bytes=5)
    assert g.fast_path(bytes(cp.buf), cp.route(), memoryview(b"hello"))
    hb, data = links[1].frames[-1]
    h = Header(bytearray(hb))
    assert data == b"hello" and (h.v_src, h.v_dst, h.v_rqtr) == (100, 10, 100)
    # the server's reply goes back to the client through the (raw) reverse path
    rep = make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=0, c_src=10, c_dst=100, c_snode=1,
                      c_dnode=5, c_pid=88)
    rep.c_msg.m_source = 10
    assert g.fast_path(bytes(rep.buf), rep.route(), memoryview(b""))
    assert sess.svr_pid == 88


def test_fast_path_declines_what_needs_the_full_path():
    g, links, _ = _group()
    req = _req()
    assert not g.fast_path(bytes(req.buf), req.route(), memoryview(b""))  # no session yet
    assert not links[1].frames and not g.sessions
    g.from_network(req, b"", None)
    other_pid = _req(pid=78)                        # a new client process: new session
    assert not g.fast_path(bytes(other_pid.buf), other_pid.route(), memoryview(b""))
    links[1].up = False                             # the server's link is down
    assert not g.fast_path(bytes(req.buf), req.route(), memoryview(b""))
    assert len(links[1].frames) == 1


def test_translated_endpoints_are_a_pool_per_dc():
    g, links, errors = _group()
    for dcid in (0, 1):
        for src in (50, 51):
            g.from_network(_req(dcid=dcid, src=src), b"", None)
    eps = sorted((s.dcid, s.lbsvr_ep) for s in g.sessions.values())
    assert eps == [(0, 100), (0, 101), (1, 100), (1, 101)]
    g.from_network(_req(dcid=0, src=52), b"", None)     # DC0's pool is empty
    assert errors and errors[-1].c_rcode == E.EDVSNOSPC
    sess = g.sessions[(0, 3, 50, 10)]
    with g.lock:
        g._end(sess, None)
    g.from_network(_req(dcid=0, src=52), b"", None)     # its endpoint went back to DC0
    assert g.sessions[(0, 3, 52, 10)].lbsvr_ep == 100
