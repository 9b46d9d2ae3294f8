"""The router alone (docs/design.md, "Router"): frames in, actions out, no sockets, no links,
no daemon.  The LB's view of the links is a two-method object the test controls."""

from __future__ import annotations

from dsp_proxy import config as cfgmod
from dsp_proxy import topology
from dsp_proxy.group import (
    CONTROL,
    DELIVER,
    LOCAL,
    MT_LOAD_REPORT,
    MT_SVC_START,
    MT_SVC_STOP,
    NO_SERVER,
    SEND,
    Group,
    Router,
    control_message,
)
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Header, Message, make_header

RELAYED = """
lb node0 { nodeid 0; cltname lbhost; lb_eps 100 101; max_sessions 150; period 30; };
server node1 { nodeid 1; rname 127.0.0.1; };
server node2 { nodeid 2; rname 127.0.0.2; };
client node3 { nodeid 3; rname 127.0.0.3; };
client lbhost { nodeid 5; rname 127.0.0.5; };
service latency { ext_ep 10; min_ep 10; max_ep 19; bind external; };
service spawned { ext_ep 30; min_ep 30; max_ep 39; bind local; prog "/bin/true"; };
"""
LOCAL_CLIENTS = RELAYED.replace("cltname lbhost; lb_eps 100 101; ", "")


class Peers:
    """The router's view of the links."""

    def __init__(self, up=(1, 2)):
        self.up_nodes = set(up)
        self.heard = {}
        self.c_nodes: set[int] = set()     # peers that are C DSPs

    def up(self, node):
        return node in self.up_nodes

    def frames(self, node):
        return self.heard.get(node, 0)

    def c_peer(self, node):
        return node in self.c_nodes and node in self.up_nodes


def _router(text=RELAYED, local=5, up=(1, 2), reports=(1, 2)):
    cfg = cfgmod.parse_text(text)
    peers = Peers(up)
    clock = [100.0]
    group = Group(cfg, local, peers, topology.relay_host(cfg), node_pids=lambda: set(),
                  clock=lambda: clock[0])
    for node in reports:
        _report(group, node)
    return Router(local, 0, group), group, peers, clock


def _report(group, node, cpu=0, level=C.LVL_IDLE, services=0xFFFFFFFF):
    m = Message()
    m.load(control_message(MT_LOAD_REPORT, m_source=node, m1_i1=cpu, m1_i2=level,
                           m1_i3=30, m1_p2=services))
    return group.on_control(node, m)


def _req(cmd=C.CMD_SNDREC_MSG, dcid=0, src=50, dst=10, snode=3, dnode=0, pid=77, **kw):
    h = make_header(c_cmd=cmd, c_dcid=dcid, c_src=src, c_dst=dst, c_snode=snode, c_dnode=dnode,
                    c_pid=pid, **kw)
    h.c_msg.m_source, h.c_msg.m_type = src, 0x0A
    return h


def _net(router, h, payload=b"", peer=None):
    return router.from_network(bytes(h.buf), h.route(), memoryview(payload),
                               h.c_snode if peer is None else peer, False)


def _acts(result):
    return [] if result is None else result if isinstance(result, list) else [result]


def _sent(result):
    (act,) = [a for a in _acts(result) if a[0] == SEND]
    return act[1], Header(bytearray(act[2])), act[3]


def test_plain_traffic_for_this_node_is_delivered_by_the_receiver():
    router, _, _, _ = _router()
    h = _req(dnode=5, snode=1, src=10, dst=50)
    (act,) = _acts(_net(router, h))
    assert act[0] == DELIVER and bytes(act[1]) == bytes(h.buf) and act[3] is False


def test_frames_for_another_real_node_get_an_error_ack_on_their_link():
    router, _, _, _ = _router()
    node, ack, _ = _sent(_net(router, _req(dnode=2, snode=1, src=60, dst=10)))
    assert node == 1 and ack.c_cmd == C.CMD_SNDREC_ACK and ack.c_rcode == E.EDVSBADNODEID
    assert (ack.c_dst, ack.c_dnode) == (60, 1)


def test_relayed_request_is_rewritten_and_sent_to_the_chosen_server():
    router, group, _, _ = _router()
    node, out, data = _sent(_net(router, _req()))
    assert node == 1 and data is None
    assert (out.c_snode, out.c_dnode, out.c_src, out.c_dst, out.c_msg.m_source) == \
        (5, 1, 100, 10, 100)
    assert out.c_flags & C.FLAG_CHECK_HDR
    assert group.sessions[(0, 3, 50, 10)].lbsvr_ep == 100
    # a COPY frame in the session: vcopy endpoints translated, the payload goes along
    cp = _req(cmd=C.CMD_COPYIN_DATA, c_len=5, v_src=50, v_dst=10, v_rqtr=50, v_bytes=5)
    node, out, data = _sent(_net(router, cp, b"hello"))
    assert node == 1 and data == b"hello" and (out.v_src, out.v_dst, out.v_rqtr) == \
        (100, 10, 100)


def test_a_run_of_equal_requests_is_rewritten_like_each_frame_alone():
    """The run path (one lookup, strided rewrite) gives the bytes the frame path gives."""
    for cmd, extra in ((C.CMD_SEND_MSG, {}), (C.CMD_COPYOUT_RQST,
                                              {"v_src": 50, "v_dst": 10, "v_rqtr": 50})):
        frames = []
        for i in range(5):
            h = _req(cmd=cmd, **extra)
            h.c_snd_seq = i
            if i == 3:
                h.c_msg.m_source = 7        # only some headers name the client: one by one
            frames.append(bytes(h.buf))
        one, group1, _, _ = _router()
        _net(one, _req())                    # the session exists
        expected = [bytes(_sent(one.from_network(fr, Header(bytearray(fr)).route(),
                                                 memoryview(b""), 3, False))[1].buf)
                    for fr in frames]
        run, group2, _, _ = _router()
        _net(run, _req())
        f = Header(bytearray(frames[0])).route()
        acts = run.from_network_run(memoryview(b"".join(frames)), f, 5, 3, False)
        (act,) = acts
        assert act[0] == SEND and act[1] == 1 and act[3] is None
        assert bytes(act[2]) == b"".join(expected)
        s1, s2 = group1.sessions[(0, 3, 50, 10)], group2.sessions[(0, 3, 50, 10)]
        assert (s2.commands, s2.bytes, s2.pending) == (s1.commands, s1.bytes, s1.pending)
        assert group2.servers[1].commands == group1.servers[1].commands


def test_a_run_without_a_session_or_not_for_the_lb_goes_frame_by_frame():
    router, group, _, _ = _router()
    frames = bytes(_req().buf) * 3
    f = _req().route()
    acts = router.from_network_run(memoryview(frames), f, 3, 3, False)
    # the first request makes the session, the next two follow it
    assert [a[0] for a in acts] == [SEND] * 3 and len(group.sessions) == 1
    h = _req(dnode=5, snode=1, src=10, dst=50)
    acts = router.from_network_run(memoryview(bytes(h.buf) * 2), h.route(), 2, 1, True)
    assert [a[0] for a in acts] == [DELIVER] * 2 and acts[0][3] is True
    h = _req(dnode=2, snode=1, src=60, dst=10)
    acts = router.from_network_run(memoryview(bytes(h.buf) * 2), h.route(), 2, 1, False)
    assert [(a[0], Header(bytearray(a[2])).c_rcode) for a in acts] == \
        [(SEND, E.EDVSBADNODEID)] * 2


def test_server_reply_goes_back_to_the_relayed_client_from_the_lb_node():
    router, group, _, _ = _router()
    _net(router, _req())
    rep = _req(cmd=C.CMD_SEND_MSG, src=10, dst=100, snode=1, dnode=5, pid=88)
    node, out, _ = _sent(_net(router, rep, peer=1))
    assert node == 3
    assert (out.c_snode, out.c_dnode, out.c_src, out.c_dst) == (0, 3, 10, 50)
    assert not out.c_flags & C.FLAG_CHECK_HDR
    assert group.sessions[(0, 3, 50, 10)].svr_pid == 88


def test_local_client_sessions_reply_through_the_put2lcl_thread():
    router, group, _, _ = _router(LOCAL_CLIENTS, local=3)
    node, out, _ = _sent(router.from_local(bytes(_req().buf), memoryview(b"")))
    assert node == 1 and (out.c_snode, out.c_src) == (3, 50)      # the client's real id
    rep = _req(cmd=C.CMD_SEND_MSG, src=10, dst=50, snode=1, dnode=3)
    (act,) = _acts(_net(router, rep, peer=1))
    assert act[0] == LOCAL
    assert Header(bytearray(act[1])).c_snode == 0


def test_least_loaded_server_and_no_server_when_all_down():
    router, group, peers, _ = _router()
    _report(group, 1, cpu=90, level=C.LVL_SATURATED)
    node, _, _ = _sent(_net(router, _req(src=51)))
    assert node == 2
    peers.up_nodes.clear()
    acts = _acts(_net(router, _req(src=52)))
    assert (NO_SERVER,) in acts
    node, ack, _ = _sent(acts)
    assert node == 3 and ack.c_rcode == E.EDVSAGAIN and ack.c_snode == 0


def test_refused_send_turns_into_an_error_reply_for_the_client():
    router, _, _, _ = _router()
    req = _req()
    (act,) = _acts(_net(router, req))
    assert act[0] == SEND and act[4] is not None and act[5] is True
    node, ack, _ = _sent(router.send_failed(act[4], act[5], E.EDVSAGAIN))
    assert node == 3 and ack.c_cmd == C.CMD_SNDREC_ACK and ack.c_rcode == E.EDVSAGAIN


def test_a_request_answered_with_a_refusal_gets_no_second_error():
    """The server's link refuses a client's request (the client gets EDVSNOTCONN), then the
    server is declared down, or the session times out: the client, no longer waiting for
    that request, gets no second error.  A second SNDREC_ACK from the LB node would end the
    client's next sendrec through the LB with an error meant for the last one, and that
    one's reply would then wait for a receive that expects something else."""
    for end in ("server_down", "timeout"):
        router, group, peers, clock = _router()
        (act,) = _acts(_net(router, _req()))
        node, ack, _ = _sent(router.send_failed(act[4], act[5], E.EDVSNOTCONN))
        assert node == 3 and ack.c_rcode == E.EDVSNOTCONN
        if end == "server_down":
            peers.up_nodes.discard(1)
            acts = _acts(group.server_down(1))
        else:
            clock[0] += group.session_timeout + 1
            acts = _acts(group.tick())
        assert not group.sessions, end
        assert not [a for a in acts if a[0] == SEND], (end, acts)


def test_server_down_ends_its_sessions_with_an_error_for_waiting_clients():
    router, group, peers, _ = _router()
    _net(router, _req())
    peers.up_nodes.discard(1)
    node, ack, _ = _sent(group.server_down(1))
    assert node == 3 and ack.c_rcode == E.EDVSNOTCONN and not group.sessions


def test_first_request_answered_service_missing_is_redispatched_once():
    router, group, _, _ = _router()
    req = _req()
    node, _, _ = _sent(_net(router, req))
    assert node == 1
    # server 1's kernel: no such endpoint there
    ack = _req(cmd=C.CMD_SNDREC_ACK, src=10, dst=100, snode=1, dnode=5, c_rcode=E.EDVSNOTBIND)
    node, out, _ = _sent(_net(router, ack, peer=1))
    assert node == 2 and out.c_cmd == C.CMD_SNDREC_MSG        # the request, to server 2
    assert group.counters["redispatched"] == 1
    assert "latency" in group.servers[1].services_down
    # new sessions avoid server 1 until its report says the service is bound again
    node, _, _ = _sent(_net(router, _req(src=51)))
    assert node == 2
    _report(group, 1, services=0)
    assert "latency" in group.servers[1].services_down
    _report(group, 1, services=0b1)
    assert not group.servers[1].services_down


def test_a_client_addressing_an_unbound_endpoint_of_the_range_marks_no_service_down():
    """One client's first requests to an endpoint of the service's range that no server
    binds (11, the service's ext_ep being 10): each server answers EDVSNOTBIND for it, which
    says nothing of the service.  The client gets the error; the service stays usable on
    both servers for everybody else.  (Marking it down let one client take a service from
    every client until the servers' next load reports, again each period.)"""
    router, group, _, _ = _router()
    node, _, _ = _sent(_net(router, _req(dst=11)))
    ack = _req(cmd=C.CMD_SNDREC_ACK, src=11, dst=100, snode=node, dnode=5,
               c_rcode=E.EDVSNOTBIND)
    to, out, _ = _sent(_net(router, ack, peer=node))
    assert to == 3 and out.c_rcode == E.EDVSNOTBIND
    assert not any(s.services_down for s in group.servers.values())
    assert group.counters["redispatched"] == 0
    node, out, _ = _sent(_net(router, _req(src=51)))           # another client: served
    assert node in (1, 2) and out.c_cmd == C.CMD_SNDREC_MSG


def test_error_inside_an_established_session_reaches_the_client():
    router, group, _, _ = _router()
    _net(router, _req())
    _net(router, _req(cmd=C.CMD_SEND_MSG, src=10, dst=100, snode=1, dnode=5), peer=1)  # answer
    ack = _req(cmd=C.CMD_SNDREC_ACK, src=10, dst=100, snode=1, dnode=5, c_rcode=E.EDVSNOTBIND)
    node, out, _ = _sent(_net(router, ack, peer=1))
    assert node == 3 and out.c_rcode == E.EDVSNOTBIND and group.counters["redispatched"] == 0
    assert not group.sessions                    # the server endpoint is gone: session over


def test_prog_service_asks_the_server_and_parks_until_started():
    router, group, _, _ = _router()
    acts = _acts(_net(router, _req(dst=30)))
    (ctl,) = [a for a in acts if a[0] == CONTROL]
    m = Message()
    m.load(ctl[2])
    assert m.m_type == MT_SVC_START and ctl[1] == 1
    reply = Message()
    reply.load(control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=33, m1_p2=m.m1_p2))
    node, out, _ = _sent(group.on_control(1, reply))
    assert node == 1 and out.c_dst == 33


def test_program_start_ids_wrap_within_their_32_bit_field_and_still_match():
    """The id of a start request travels in a 32-bit field: after 2**32 - 1 starts the next
    id must still be one the server's answer can name (never 0, which means no start)."""
    router, group, _, _ = _router()
    group._req_id = 2**32 - 1
    acts = _acts(_net(router, _req(dst=30)))
    (ctl,) = [a for a in acts if a[0] == CONTROL]
    m = Message()
    m.load(ctl[2])
    assert m.m1_p2 == 1 == group._req_id
    reply = Message()
    reply.load(control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=33, m1_p2=m.m1_p2))
    node, out, _ = _sent(group.on_control(1, reply))
    assert node == 1 and out.c_dst == 33
    assert not group.starting


def test_a_program_started_for_a_session_that_ended_meanwhile_is_stopped():
    """The session ended (here its server went down and came back) before the server's DSP
    answered its start: a program it started anyway serves nobody, and nobody else would
    stop it.  The answer of another node for that start changes nothing."""
    router, group, _, _ = _router()
    (ctl,) = [a for a in _acts(_net(router, _req(dst=30))) if a[0] == CONTROL]
    m = Message()
    m.load(ctl[2])
    reply = Message()
    reply.load(control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=33, m1_p2=m.m1_p2))
    assert not _acts(group.on_control(2, reply))        # not the node it asked
    assert group.starting                                 # its start still waits
    group.server_down(1)
    assert not group.sessions
    (stop,) = [a for a in _acts(group.on_control(1, reply)) if a[0] == CONTROL]
    s = Message()
    s.load(stop[2])
    assert stop[1] == 1 and s.m_type == MT_SVC_STOP and (s.m1_i1, s.m1_i2, s.m1_p1) == (0, 33, 30)
    assert not group.abandoned and not _acts(group.on_control(1, reply))   # once


def test_frames_parked_while_a_program_starts_are_bounded_and_refused_with_an_error():
    """A client (or a peer posing as one) that floods a session while its program starts:
    the frames parked for it stay within PARKED_MAX frames and PARKED_BYTES bytes; a request
    beyond them gets EDVSAGAIN at once, other commands are dropped; what was parked goes to
    the program once it started, in order."""
    from dsp_proxy import group as groupmod
    router, group, _, _ = _router()
    acts = _acts(_net(router, _req(dst=30)))
    (ctl,) = [a for a in acts if a[0] == CONTROL]
    data = bytes(range(256)) * (C.MAXCOPYBUF // 256)
    replies = []
    for i in range(groupmod.PARKED_MAX + 40):
        replies += _acts(_net(router, _req(cmd=C.CMD_COPYIN_DATA, dst=30, c_len=len(data),
                                           v_src=50, v_dst=30, v_rqtr=50,
                                           v_bytes=len(data)), data))
        replies += _acts(_net(router, _req(dst=30, c_tv_sec=i)))
    sess = group.sessions[(0, 3, 50, 30)]
    assert len(sess.parked) <= groupmod.PARKED_MAX
    assert sum(120 + len(d) for _, d in sess.parked) <= groupmod.PARKED_BYTES
    errors = [Header(bytearray(a[2])) for a in replies if a[0] == SEND]
    assert errors and all(h.c_rcode == E.EDVSAGAIN and h.c_dnode == 3 for h in errors)
    parked = list(sess.parked)
    m = Message()
    m.load(ctl[2])
    reply = Message()
    reply.load(control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=33, m1_p2=m.m1_p2))
    sent = [a for a in _acts(group.on_control(1, reply)) if a[0] == SEND]
    assert len(sent) == len(parked)
    assert [Header(bytearray(a[2])).c_tv_sec for a in sent] == \
        [Header(bytearray(h)).c_tv_sec for h, _ in parked]


def test_frames_parked_for_all_starting_sessions_together_are_bounded(monkeypatch):
    """Each starting session parks at most PARKED_BYTES, but sessions are many (max_sessions
    per DC, in every DC a service covers: 157 x 32 x 256 KiB is 1.2 GiB): together they park
    at most PARKED_TOTAL beyond each one's first request (which always gets in: it asks for
    the program); a request beyond that gets EDVSAGAIN at once, as beyond a session's own
    bound."""
    from dsp_proxy import group as groupmod
    monkeypatch.setattr(groupmod, "PARKED_TOTAL", 2 * groupmod.PARKED_BYTES, raising=False)
    router, group, _, _ = _router()
    data = bytes(range(256)) * (C.MAXCOPYBUF // 256)
    replies = []
    for dcid in (0, 1, 2):
        for src in (50, 51):
            _net(router, _req(dcid=dcid, src=src, dst=30))
            for i in range(groupmod.PARKED_MAX):
                replies += _acts(_net(router, _req(cmd=C.CMD_COPYIN_DATA, dcid=dcid, src=src,
                                                   dst=30, c_len=len(data), v_src=src,
                                                   v_dst=30, v_rqtr=src,
                                                   v_bytes=len(data)), data))
                replies += _acts(_net(router, _req(dcid=dcid, src=src, dst=30, c_tv_sec=i)))
    assert len(group.starting) == 6
    total = sum(s.parked_bytes for s in group.starting.values())
    assert all(s.parked for s in group.starting.values())    # every first request got in
    assert total <= groupmod.PARKED_TOTAL + 6 * 120
    errors = [Header(bytearray(a[2])) for a in replies if a[0] == SEND]
    assert errors and all(h.c_rcode == E.EDVSAGAIN for h in errors)


def _started_program(router, group, src, snode, ep, node=1):
    """A session of client src@snode for the prog service, its program started at `ep`."""
    acts = _acts(_net(router, _req(dst=30, src=src, snode=snode)))
    (ctl,) = [a for a in acts if a[0] == CONTROL]
    m = Message()
    m.load(ctl[2])
    reply = Message()
    reply.load(control_message(MT_SVC_START | C.MT_ACKNOWLEDGE, m1_i1=ep, m1_p2=m.m1_p2))
    to, out, _ = _sent(group.on_control(node, reply))
    assert (to, out.c_dst) == (node, ep)


def test_a_client_reaches_only_its_own_program_not_another_sessions():
    """Two client nodes' sessions of a `prog` service on one server, their programs on
    endpoints 33 and 34 of the service's range.  Client 50@3 addressing 34 at the LB node
    (a request, a run of them, a copy) would reach the program started for client 60@4's
    session: it gets EDVSDSTDIED instead, nothing goes to the server, and both sessions go
    on (each still reaches its own program)."""
    router, group, _, _ = _router(TWO_CLIENT_NODES, up=(1,), reports=(1,))
    _started_program(router, group, 50, 3, 33)
    _started_program(router, group, 60, 4, 34)
    for dst in (34, 31):
        node, ack, _ = _sent(_net(router, _req(dst=dst, src=50, snode=3)))
        assert (node, ack.c_cmd, ack.c_rcode, ack.c_dst, ack.c_src) == \
            (3, C.CMD_SNDREC_ACK, E.EDVSDSTDIED, 50, dst)
    h = _req(cmd=C.CMD_SEND_MSG, dst=34, src=50, snode=3)
    acts = router.from_network_run(memoryview(bytes(h.buf) * 3), h.route(), 3, 3, False)
    assert acts and all(a[0] == SEND and a[1] == 3 and
                        Header(bytearray(a[2])).c_rcode == E.EDVSDSTDIED for a in acts)
    cp = _req(cmd=C.CMD_COPYIN_DATA, dst=34, src=50, snode=3, c_len=5, v_src=50, v_dst=34,
              v_rqtr=50, v_bytes=5)
    assert not [a for a in _acts(_net(router, cp, b"hello")) if a[0] == SEND and a[1] == 1]
    # a copy addressed to its own program that names the other one (the server's kernel
    # copies between the endpoints named, here from its program into 60@4's): the copy's
    # error ACK, nothing to the server; the same copy within the session goes out mapped
    for v in ((30, 34, 50), (34, 30, 50), (30, 30, 34)):
        lcl = _req(cmd=C.CMD_COPYLCL_RQST, dst=30, src=50, snode=3, v_src=v[0], v_dst=v[1],
                   v_rqtr=v[2], v_bytes=5)
        node, ack, _ = _sent(_net(router, lcl))
        assert (node, ack.c_cmd, ack.c_rcode) == (3, C.CMD_COPYLCL_ACK, E.EDVSDSTDIED), v
    lcl = _req(cmd=C.CMD_COPYLCL_RQST, dst=30, src=50, snode=3, v_src=30, v_dst=30, v_rqtr=50,
               v_bytes=5)
    node, out, _ = _sent(_net(router, lcl))
    assert (node, out.c_dst, out.v_src, out.v_dst, out.v_rqtr) == (1, 33, 33, 33, 100)
    assert sorted(group.sessions) == [(0, 3, 50, 30), (0, 4, 60, 30)]
    for src, snode, ep in ((50, 3, 33), (60, 4, 34)):
        node, out, _ = _sent(_net(router, _req(dst=30, src=src, snode=snode)))
        assert (node, out.c_dst) == (1, ep)


def test_a_client_node_over_its_share_of_a_services_programs_gives_one_back():
    """A `prog` service of two endpoints (30-31) on the one usable server: node 3's two
    idle sessions have its two programs, and every new session of another node was answered
    EDVSAGAIN by the server (no free endpoint) for as long as they lasted.  Node 4, under its
    share (one of two), takes node 3's least recently used session: that one's program is
    stopped, then node 4's is asked for, on the same server.  Then both nodes are at their
    share and get EDVSAGAIN without asking the server."""
    text = TWO_CLIENT_NODES.replace("min_ep 30; max_ep 39;", "min_ep 30; max_ep 31;") \
        .replace("lb_eps 100 101", "lb_eps 100 109")
    router, group, _, clock = _router(text, up=(1,), reports=(1,))
    _started_program(router, group, 50, 3, 30)
    clock[0] += 1
    _started_program(router, group, 51, 3, 31)
    clock[0] += 1
    _net(router, _req(dst=30, src=51, snode=3, cmd=C.CMD_SEND_MSG))   # 50: least recent
    acts = _acts(_net(router, _req(dst=30, src=60, snode=4)))
    controls = []
    for a in acts:
        if a[0] == CONTROL:
            m = Message()
            m.load(a[2])
            controls.append((a[1], m.m_type, m.m1_i2))
    assert controls[0] == (1, MT_SVC_STOP, 30) and controls[1][:2] == (1, MT_SVC_START)
    errors = [Header(bytearray(a[2])) for a in acts if a[0] == SEND]
    assert [(h.c_dnode, h.c_dst, h.c_rcode) for h in errors] == [(3, 50, E.EDVSNOSPC)]
    assert sorted(group.sessions) == [(0, 3, 51, 30), (0, 4, 60, 30)]
    assert group.counters["sessions_taken_back"] == 1
    for src, snode in ((61, 4), (52, 3)):
        acts = _acts(_net(router, _req(dst=30, src=src, snode=snode)))
        assert not [a for a in acts if a[0] == CONTROL]
        node, ack, _ = _sent(acts)
        assert (node, ack.c_dst, ack.c_rcode) == (snode, src, E.EDVSAGAIN)
    assert sorted(group.sessions) == [(0, 3, 51, 30), (0, 4, 60, 30)]


def test_a_clients_copy_names_only_itself_and_its_services_endpoints():
    """A relayed client's copy commands went to the server with their vcopy endpoints as
    the client wrote them: a COPYLCL_RQST in its session had the server's kernel copy
    between any two processes of the server (another service's, a system process), with a
    requester (v_rqtr) of the client's choosing, whose privilege the kernel checks.  Each
    endpoint a copy names must be the client or one of the service's range; anything else
    gets the copy's error ACK and nothing goes to the server.  The client's ordinary copies
    (answering the server's, naming both ends) go out, runs of them too."""
    router, group, _, _ = _router()
    _net(router, _req())                                      # 50@3 -> latency (10..19)
    for v in ((10, 5, 50), (30, 11, 50), (10, 11, 2), (10, 50, 100)):
        cp = _req(cmd=C.CMD_COPYLCL_RQST, v_src=v[0], v_dst=v[1], v_rqtr=v[2], v_bytes=8)
        node, ack, _ = _sent(_net(router, cp))
        assert (node, ack.c_cmd, ack.c_rcode, ack.c_dst) == \
            (3, C.CMD_COPYLCL_ACK, E.EDVSDSTDIED, 50), v
        h = _req(cmd=C.CMD_COPYOUT_RQST, v_src=v[0], v_dst=v[1], v_rqtr=v[2], v_bytes=8)
        acts = router.from_network_run(memoryview(bytes(h.buf) * 2), h.route(), 2, 3, False)
        assert acts and not [a for a in acts if a[0] == SEND and a[1] != 3], v
    for v in ((10, 11, 50), (50, 10, 10), (10, 50, 50)):
        cp = _req(cmd=C.CMD_COPYOUT_RQST, v_src=v[0], v_dst=v[1], v_rqtr=v[2], v_bytes=8)
        node, out, _ = _sent(_net(router, cp))
        assert node == 1 and 100 in (out.v_src, out.v_dst, out.v_rqtr), v
        acts = router.from_network_run(memoryview(bytes(cp.buf) * 2), cp.route(), 2, 3, False)
        assert [a[1] for a in acts] == [1], v


def test_relayed_endpoints_are_a_pool_per_dc_and_come_back():
    router, group, _, _ = _router()
    for dcid in (0, 1):
        for src in (50, 51):
            _net(router, _req(dcid=dcid, src=src))
    assert sorted((s.dcid, s.lbsvr_ep) for s in group.sessions.values()) == \
        [(0, 100), (0, 101), (1, 100), (1, 101)]
    node, ack, _ = _sent(_net(router, _req(dcid=0, src=52)))
    assert ack.c_rcode == E.EDVSNOSPC
    with group.lock:
        group._end(group.sessions[(0, 3, 50, 10)], None, [])
    _net(router, _req(dcid=0, src=52))          # slot 100 again, in its next generation
    assert group.sessions[(0, 3, 52, 10)].lbsvr_ep == C._ENDPOINT(1, 100)


TWO_CLIENT_NODES = RELAYED.replace("client node3", "client node4 { nodeid 4; rname 127.0.0.4; };\n"
                                    "client node3")


def test_a_client_node_over_its_share_of_a_full_table_gives_back_its_idlest_session():
    """A client node that took every translated endpoint (two, lb_eps 100 101), here with
    endpoints it may not even have, does not keep another client node out: the newcomer, under
    its share (one of two), takes the session of node 3 that waits for nothing, although it is
    the newer one; then each node is at its share and gets EDVSNOSPC."""
    router, group, _, clock = _router(TWO_CLIENT_NODES)
    _net(router, _req(src=50))                           # waits for its reply
    clock[0] += 1
    _net(router, _req(cmd=C.CMD_NTFY_MSG, src=51))       # waits for nothing
    clock[0] += 1
    acts = _acts(_net(router, _req(src=60, snode=4)))
    assert [a[0] for a in acts] == [SEND] and acts[0][1] in (1, 2)   # node 4's request out
    assert sorted(group.sessions) == [(0, 3, 50, 10), (0, 4, 60, 10)]
    assert group.sessions[(0, 4, 60, 10)].lbsvr_ep == C._ENDPOINT(1, 101)
    assert group.counters["sessions_taken_back"] == 1
    for src, snode in ((61, 4), (52, 3)):
        node, ack, _ = _sent(_net(router, _req(src=src, snode=snode)))
        assert (node, ack.c_rcode, ack.c_dst) == (snode, E.EDVSNOSPC, src)
    assert group.counters["sessions_taken_back"] == 1 and len(group.sessions) == 2


def test_a_late_reply_to_a_session_that_ended_never_reaches_the_next_client_of_its_slot():
    """Node 3's clients hold both translated endpoints (lb_eps 100 101), each waiting for
    server 1's reply; a client of node 4 takes one back.  Its session used to get the very
    endpoint, so server 1's reply to node 3's request (sent to 100 before or after) reached
    node 4's client as the reply to its own request: one node could have its requests
    answered into another node's sessions.  The slot comes back in a new generation; the
    stale reply names no session and is left to this node's kernel (which refuses it), the
    new session's own reply reaches its client; the compiled relay's flows use the same
    endpoints.  Generations wrap within a 32-bit endpoint."""
    from dsp_proxy import group as groupmod
    router, group, _, clock = _router(TWO_CLIENT_NODES, up=(1,), reports=(1,))
    _net(router, _req(src=50))
    clock[0] += 1
    _net(router, _req(src=51))
    clock[0] += 1
    acts = _acts(_net(router, _req(src=60, snode=4)))
    (out,) = [Header(bytearray(a[2])) for a in acts if a[0] == SEND and a[1] == 1]
    new_ep = group.sessions[(0, 4, 60, 10)].lbsvr_ep
    assert out.c_src == new_ep and C._ENDPOINT_P(new_ep) == 100 and new_ep != 100
    stale = _req(cmd=C.CMD_SEND_MSG, src=10, dst=100, snode=1, dnode=5, pid=88)
    (act,) = _acts(_net(router, stale, peer=1))
    assert act[0] == DELIVER                       # not SEND to node 4
    mine = _req(cmd=C.CMD_SEND_MSG, src=10, dst=new_ep, snode=1, dnode=5, pid=88)
    node, out, _ = _sent(_net(router, mine, peer=1))
    assert (node, out.c_dst, out.c_src, out.c_snode) == (4, 60, 10, 0)
    with group.lock:
        group._end(group.sessions[(0, 4, 60, 10)], None, [])
        group.lb_eps_gen[(0, 100)] = groupmod.LB_EP_GENERATIONS - 1
    _net(router, _req(src=61, snode=4))
    last = group.sessions[(0, 4, 61, 10)].lbsvr_ep
    assert C._ENDPOINT_P(last) == 100 and 0 < last + C._ENDPOINT_GEN_SIZE < 2**31
    with group.lock:
        group._end(group.sessions[(0, 4, 61, 10)], None, [])
    _net(router, _req(src=62, snode=4))
    assert group.sessions[(0, 4, 62, 10)].lbsvr_ep == 100      # wrapped


def test_a_session_taken_back_while_its_client_waits_answers_it_with_edvsnospc():
    """Every session of the node over its share waits for a reply: the least recently used
    one ends, and its client gets EDVSNOSPC instead of waiting for a reply that cannot come."""
    text = TWO_CLIENT_NODES.replace("lb_eps 100 101; max_sessions 150", "lb_eps 100 109; "
                                    "max_sessions 3")
    router, group, _, clock = _router(text)
    for src in (50, 51, 52):
        _net(router, _req(src=src))
        clock[0] += 1
    _net(router, _req(src=51, cmd=C.CMD_SEND_MSG))       # 50 is now the least recently used
    acts = _acts(_net(router, _req(src=60, snode=4)))
    errors = [Header(bytearray(a[2])) for a in acts if a[0] == SEND and a[1] == 3]
    assert [(h.c_cmd, h.c_dst, h.c_rcode) for h in errors] == \
        [(C.CMD_SNDREC_ACK, 50, E.EDVSNOSPC)]
    assert sorted(group.sessions) == [(0, 3, 51, 10), (0, 3, 52, 10), (0, 4, 60, 10)]
    node, ack, _ = _sent(_net(router, _req(src=61, snode=4)))   # share of 3 over 2: one
    assert ack.c_rcode == E.EDVSNOSPC and node == 4


def test_one_client_node_alone_keeps_its_full_table():
    """With no other client node asking, a full table stays as it is (EDVSNOSPC)."""
    text = RELAYED.replace("max_sessions 150", "max_sessions 1")
    router, group, _, _ = _router(text)
    _net(router, _req(src=50))
    node, ack, _ = _sent(_net(router, _req(src=51)))
    assert ack.c_rcode == E.EDVSNOSPC and list(group.sessions) == [(0, 3, 50, 10)]
    assert group.counters["sessions_taken_back"] == 0


def test_only_the_lb_host_relays_and_only_for_the_link_peer():
    router, _, _, _ = _router(local=2, reports=(1,))
    node, ack, _ = _sent(_net(router, _req()))          # node 2 is not the LB host
    assert ack.c_rcode == E.EDVSBADNODEID and node == 3
    router, _, _, _ = _router()
    node, ack, _ = _sent(_net(router, _req(), peer=1))   # c_snode 3 on node 1's link
    assert ack.c_rcode == E.EDVSBADNODEID


def test_idle_sessions_expire_with_an_error_for_a_waiting_client():
    router, group, _, clock = _router()
    _net(router, _req())
    clock[0] += group.session_timeout + 1
    node, ack, _ = _sent(group.tick())
    assert ack.c_rcode == E.EDVSTIMEDOUT and not group.sessions


def test_group_module_does_no_io():
    import dsp_proxy.group as g
    src = open(g.__file__).read()
    for name in ("import socket", "import selectors", "from .link", "from .rproxy",
                 "from .sproxy", "from .main", "import dsp_proxy.link"):
        assert name not in src


def test_a_c_server_serves_sessions_without_a_load_report_but_no_prog_service():
    """A C DSP never reports its load nor gets control frames: its server runs while its link
    is up (its unknown load counts as IDLE, the session count decides), but a `prog` service
    never goes to it (nobody would start the program there)."""
    router, group, peers, _ = _router(RELAYED.replace("lb_eps 100 101", "lb_eps 100 119"),
                                      reports=(2,))
    peers.c_nodes.add(1)
    assert group.is_live(group.servers[1]) and group.is_c_server(group.servers[1])
    chosen = {_sent(_net(router, _req(src=50 + i)))[0] for i in range(4)}
    assert chosen == {1, 2}, "sessions spread over the C server and ours by their count"
    for i in range(4):
        acts = _acts(_net(router, _req(dst=30, src=60 + i)))
        assert [a[1] for a in acts if a[0] == CONTROL] == [2], acts
    peers.up_nodes.discard(2)           # only the C server left: a prog service has none
    (act,) = [a for a in _acts(_net(router, _req(dst=30, src=70))) if a[0] == SEND]
    assert Header(bytearray(act[2])).c_rcode == E.EDVSAGAIN
    peers.up_nodes.discard(1)           # its link lost: not running any more
    assert not group.is_live(group.servers[1])
