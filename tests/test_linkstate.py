"""The link state machine as a table (docs/design.md, "Links"), and `Link` carrying it out."""

from __future__ import annotations

import collections
import socket
import threading

import pytest

from dsp_proxy.link import Link, PeerSpec
from dsp_proxy.linkstate import C_PEER_TABLE, TABLE, Effect, Event, State, transition
from dvk_cffi import consts as C
from dvk_cffi.wire import hello_header, make_header

S, Ev, F = State, Event, Effect

EXPECTED = {
    (S.DOWN, Ev.OUT_CONNECTED): (S.OUT_ONLY, {F.KEEP_OUT}),
    (S.DOWN, Ev.IN_ACCEPTED): (S.IN_ONLY, {F.KEEP_IN}),
    (S.OUT_ONLY, Ev.IN_ACCEPTED): (S.UP, {F.KEEP_IN, F.CONNECT}),
    (S.OUT_ONLY, Ev.OUT_CONNECTED): (S.OUT_ONLY, {F.CLOSE_OUT, F.KEEP_OUT}),
    (S.OUT_ONLY, Ev.OUT_LOST): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.OUT_ONLY, Ev.TIMEOUT): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.OUT_ONLY, Ev.STOP): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.IN_ONLY, Ev.OUT_CONNECTED): (S.UP, {F.KEEP_OUT, F.CONNECT}),
    (S.IN_ONLY, Ev.IN_ACCEPTED): (S.IN_ONLY, {F.CLOSE_IN, F.KEEP_IN}),
    (S.IN_ONLY, Ev.IN_LOST): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.IN_ONLY, Ev.TIMEOUT): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.IN_ONLY, Ev.STOP): (S.DOWN, {F.CLOSE_OUT, F.CLOSE_IN}),
    (S.UP, Ev.OUT_LOST): (S.DOWN, {F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN, F.REPORT_DOWN}),
    (S.UP, Ev.IN_LOST): (S.DOWN, {F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN, F.REPORT_DOWN}),
    (S.UP, Ev.KERNEL_REFUSED): (S.DOWN, {F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN,
                                         F.REPORT_DOWN}),
    (S.UP, Ev.STOP): (S.DOWN, {F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN, F.REPORT_DOWN}),
    (S.UP, Ev.IN_ACCEPTED): (S.UP, {F.HOLD_IN}),
    (S.UP, Ev.OUT_CONNECTED): (S.OUT_ONLY, {F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN,
                                            F.KEEP_OUT, F.REPORT_DOWN}),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_transition(state, event):
    new, effects = transition(state, event)
    want_state, want_effects = EXPECTED.get((state, event), (state, set()))
    assert (new, set(effects)) == (want_state, want_effects)


#: Where a peer that never announced itself (it may be a C DSP) differs.
C_PEER = {
    (S.UP, Ev.OUT_LOST): (S.IN_ONLY, {F.DISCONNECT, F.CLOSE_OUT, F.REPORT_DOWN}),
    (S.IN_ONLY, Ev.TIMEOUT): (S.IN_ONLY, set()),
    (S.IN_ONLY, Ev.IN_ACCEPTED): (S.IN_ONLY, {F.HOLD_IN}),
    (S.UP, Ev.OUT_CONNECTED): (S.UP, {F.DISCONNECT, F.CLOSE_OUT, F.KEEP_OUT, F.REPORT_DOWN,
                                      F.CONNECT}),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_transition_with_a_peer_that_may_be_a_c_dsp(state, event):
    new, effects = transition(state, event, c_peer=True)
    want_state, want_effects = C_PEER.get((state, event),
                                          EXPECTED.get((state, event), (state, set())))
    assert (new, set(effects)) == (want_state, want_effects)
    assert set(C_PEER_TABLE) == set(C_PEER)
    # a working link's incoming connection is closed only when it is lost itself, the kernel
    # refuses the link or we stop: never for the other direction, never for a newcomer
    if state in (S.UP, S.IN_ONLY) and F.CLOSE_IN in effects:
        assert event in (Ev.IN_LOST, Ev.STOP, Ev.KERNEL_REFUSED)


@pytest.mark.parametrize("c_peer", [False, True])
def test_a_newcomer_never_ends_a_working_link(c_peer):
    """Whatever the peer: a new connection from its address while the link is up is held
    aside, never closes a working connection (a loop of them stopped a DSP peer's link for
    as long as it ran)."""
    new, effects = transition(S.UP, Ev.IN_ACCEPTED, c_peer=c_peer)
    assert (new, effects) == (S.UP, (F.HOLD_IN,))


def test_the_table_has_nothing_else_and_no_state_waits_for_ever():
    assert set(TABLE) == set(EXPECTED)
    # every state but DOWN is left by a loss or by the half-open timeout
    for state in (S.OUT_ONLY, S.IN_ONLY):
        assert transition(state, Ev.TIMEOUT)[0] is S.DOWN
    assert transition(S.UP, Ev.IN_LOST)[0] is S.DOWN
    # sockets are closed before a new one is kept, the link out of service before they close
    for (_s, _e), (_n, effects) in TABLE.items():
        if F.KEEP_IN in effects and F.CLOSE_IN in effects:
            assert effects.index(F.CLOSE_IN) < effects.index(F.KEEP_IN)
        if F.DISCONNECT in effects:
            assert effects.index(F.DISCONNECT) < effects.index(F.CLOSE_OUT)


class FakeKernel:
    def __init__(self, refuse=False):
        self.calls = []
        self.refuse = refuse

    def proxy_conn(self, peer, status):
        self.calls.append(status)
        if self.refuse and status == C.CONNECT_RPROXY:
            from dvk_cffi.errors import DvkError
            raise DvkError.for_code(-1)


def _pair():
    a, b = socket.socketpair()
    return a, b


def test_link_carries_out_the_table():
    events = []
    kernel = FakeKernel()
    link = Link(PeerSpec(2, "n2", "127.0.0.1", 1, 1), kernel, post=events.append)
    out, out_peer = _pair()
    inn, in_peer = _pair()
    assert link.event(Ev.OUT_CONNECTED, out) and link.state is S.OUT_ONLY
    assert link.half_open_for() >= 0 and not link.up
    assert link.event(Ev.IN_ACCEPTED, inn) and link.state is S.UP and link.up
    assert kernel.calls == [C.CONNECT_RPROXY, C.CONNECT_SPROXY]
    gen = link.generation
    # a loss reported for a socket that is not the link's is stale: nothing happens
    other, _o = _pair()
    assert not link.event(Ev.IN_LOST, other) and link.up
    assert link.event(Ev.IN_LOST, inn, "test") and link.state is S.DOWN
    assert kernel.calls[-2:] == [C.DISCONNECT_SPROXY, C.DISCONNECT_RPROXY]
    assert events == [("link_down", 2, "test")] and link.generation > gen
    # both shut down at once, closed by their own threads when they no longer use them
    assert link.retired_out == [out] and link.retired_in == [inn]
    assert out_peer.recv(1) == b"" and in_peer.recv(1) == b""
    link.close_retired(incoming=False)
    link.close_retired(incoming=True)
    assert out.fileno() == -1 and inn.fileno() == -1
    for s in (out_peer, in_peer, other, _o):
        s.close()


def test_kernel_refusal_tears_the_link_down():
    link = Link(PeerSpec(2, "n2", "127.0.0.1", 1, 1), FakeKernel(refuse=True))
    out, p1 = _pair()
    inn, p2 = _pair()
    link.event(Ev.OUT_CONNECTED, out)
    link.event(Ev.IN_ACCEPTED, inn)
    assert link.state is S.DOWN and not link.up
    p1.close()
    p2.close()


def test_a_stopping_link_refuses_new_connections():
    link = Link(PeerSpec(2, "n2", "127.0.0.1", 1, 1), FakeKernel())
    link.stop()
    s, p = _pair()
    assert not link.event(Ev.IN_ACCEPTED, s) and s.fileno() == -1
    p.close()


class StuckKernel(FakeKernel):
    """A node kernel that does not answer CONNECT_RPROXY until `go` is set (stopped, wedged)."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()
        self.stuck = threading.Event()

    def proxy_conn(self, peer, status):
        if status == C.CONNECT_RPROXY:
            self.stuck.set()
            assert self.go.wait(20)
        super().proxy_conn(peer, status)


def test_a_kernel_that_does_not_answer_holds_no_other_thread():
    """The kernel is called outside the link's lock: while a CONNECT waits for a kernel that
    does not answer, the supervisor's stop and the acceptor's events return at once; the calls
    are then made in the order decided, and the superseded CONNECT never puts the link up."""
    kernel = StuckKernel()
    events = []
    link = Link(PeerSpec(2, "n2", "127.0.0.1", 1, 1), kernel, post=events.append)
    out, out_peer = _pair()
    inn, in_peer = _pair()
    link.event(Ev.OUT_CONNECTED, out)
    connecting = threading.Thread(target=link.event, args=(Ev.IN_ACCEPTED, inn))
    connecting.start()
    try:
        assert kernel.stuck.wait(20)
        assert link.state is S.UP and not link.up     # up only once the kernel agreed
        newer, newer_peer = _pair()
        done = threading.Event()

        def other_threads():
            link.event(Ev.IN_ACCEPTED, newer)    # the acceptor: the peer connected again
            link.stop()                          # the supervisor stops
            done.set()
        helper = threading.Thread(target=other_threads)
        helper.start()
        assert done.wait(10), "a thread waited for the kernel through the link's lock"
        assert link.state is S.DOWN and not link.up
    finally:
        kernel.go.set()
        connecting.join(20)
        helper.join(20)
    assert not connecting.is_alive() and not link.up
    assert kernel.calls == [C.CONNECT_RPROXY, C.CONNECT_SPROXY,
                            C.DISCONNECT_SPROXY, C.DISCONNECT_RPROXY]
    assert link.kernel_todo == collections.deque() and link.downs == 1
    for sock in (out_peer, in_peer, newer_peer):
        sock.close()
    link.close_retired(incoming=False)
    link.close_retired(incoming=True)


def _up(link, kernel=None):
    out, out_peer = _pair()
    inn, in_peer = _pair()
    link.event(Ev.OUT_CONNECTED, out)
    link.event(Ev.IN_ACCEPTED, inn)
    assert link.up
    return (out, out_peer), (inn, in_peer)


def test_a_c_peers_incoming_connection_outlives_the_outgoing_one():
    """A peer that never announced itself keeps its incoming connection when ours is lost
    (the C sender never connects again): the link is IN_ONLY and comes up again with a new
    outgoing connection, RPROXY being told to serve the same socket again."""
    events = []
    link = Link(PeerSpec(3, "c3", "127.0.0.1", 1, 1), FakeKernel(), post=events.append)
    (out, out_peer), (inn, in_peer) = _up(link)
    serial = link.in_serial
    link.down("send failed", link.generation, outgoing=True)
    assert link.state is S.IN_ONLY and not link.up and link.in_sock is inn
    assert link.retired_in == [] and link.retired_out == [out]
    assert events == [("link_down", 3, "send failed")]
    assert link.half_open_for() >= 0 and not link.event(Ev.TIMEOUT)   # no timeout: it waits
    out2, out2_peer = _pair()
    assert link.event(Ev.OUT_CONNECTED, out2) and link.up and link.in_sock is inn
    assert link.in_serial > serial
    for sock in (out_peer, in_peer, out2_peer):
        sock.close()
    link.stop()


def test_an_announced_peer_loses_both_directions_with_one():
    link = Link(PeerSpec(2, "n2", "127.0.0.1", 1, 1), FakeKernel())
    (out, out_peer), (inn, in_peer) = _up(link)
    link.announced = True
    link.down("send failed", link.generation, outgoing=True)
    assert link.state is S.DOWN and link.retired_in == [inn] and link.retired_out == [out]
    for sock in (out_peer, in_peer):
        sock.close()


def test_a_new_connection_waits_aside_until_the_current_one_is_lost():
    """While a C peer's link is up, a new connection from its address is held aside: the
    working one stays; once that one is lost the held one takes over (unless it closed
    meanwhile, then it is dropped)."""
    link = Link(PeerSpec(3, "c3", "127.0.0.1", 1, 1), FakeKernel())
    (out, out_peer), (inn, in_peer) = _up(link)
    first, first_peer = _pair()
    second, second_peer = _pair()
    assert link.event(Ev.IN_ACCEPTED, first) and link.up and link.in_sock is inn
    assert link.event(Ev.IN_ACCEPTED, second) and link.in_candidate is second
    assert first.fileno() == -1                  # only the newest waits
    assert link.event(Ev.IN_LOST, inn, "lost")
    assert link.state is S.IN_ONLY and link.in_sock is second and link.in_candidate is None
    # a held connection that closed before its turn is dropped
    (out2, out2_peer) = _pair()
    link.event(Ev.OUT_CONNECTED, out2)
    assert link.up
    third, third_peer = _pair()
    link.event(Ev.IN_ACCEPTED, third)
    third_peer.close()
    link.event(Ev.IN_LOST, second, "lost")
    assert link.state is S.DOWN and link.in_sock is None and third.fileno() == -1
    for sock in (out_peer, in_peer, first_peer, second_peer, out2_peer):
        sock.close()
    link.stop()


def test_a_held_connection_that_announces_itself_takes_over_from_a_silent_one():
    """A connection held aside takes over when it announces itself (a HELLO with
    FLAG_DSP_PEER from the peer, behind other frames) while the current one never did, the
    peer having announced itself on an earlier connection; one that says anything else, or
    announces another node, or closed, changes nothing, nor does an announcing one once the
    current connection announced itself, or while the peer never did (a C DSP's connection
    is never ended for a newcomer)."""
    events = []
    link = Link(PeerSpec(3, "n3", "127.0.0.1", 1, 1), FakeKernel(), post=events.append)
    (out, out_peer), (inn, in_peer) = _up(link)
    held, held_peer = _pair()
    assert link.event(Ev.IN_ACCEPTED, held) and link.in_candidate is held
    assert not link.check_candidate()                        # nothing came on it yet
    request = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=1, c_dst=2, c_snode=3,
                          c_dnode=1)
    held_peer.sendall(bytes(request.buf) + bytes(hello_header(3, 1).buf)[:60])
    assert not link.check_candidate() and link.in_sock is inn    # half a HELLO
    held_peer.sendall(bytes(hello_header(3, 1).buf)[60:])
    assert not link.check_candidate() and link.in_sock is inn    # never announced: may be C
    link.dsp_peer = True                        # it announced itself on an earlier connection
    link.announced = True
    assert not link.check_candidate() and link.in_sock is inn    # the current one announced
    link.announced = False
    assert link.check_candidate()
    assert link.state is S.IN_ONLY and link.in_sock is held and link.in_candidate is None
    assert link.retired_in == [inn] and link.retired_out == [out]
    assert events and events[-1][0] == "link_down" and "takes over" in events[-1][2]
    out2, out2_peer = _pair()
    assert link.event(Ev.OUT_CONNECTED, out2) and link.up
    # a stray that says nothing, another node's HELLO, a plain C HELLO: held, nothing more
    stray, stray_peer = _pair()
    link.event(Ev.IN_ACCEPTED, stray)
    stray_peer.sendall(bytes(hello_header(2, 1).buf))
    plain = hello_header(3, 1)
    plain.c_flags = 0
    stray_peer.sendall(bytes(plain.buf))
    assert not link.check_candidate() and link.in_sock is held and link.up
    gone, gone_peer = _pair()                   # one that closed is dropped
    link.event(Ev.IN_ACCEPTED, gone)
    assert stray.fileno() == -1
    gone_peer.close()
    assert not link.check_candidate() and link.in_candidate is None and gone.fileno() == -1
    assert link.in_sock is held and link.up
    for sock in (out_peer, in_peer, held_peer, out2_peer, stray_peer):
        sock.close()
    link.stop()


def test_a_peer_that_announced_itself_is_known_as_a_dsp_across_connections():
    """`dsp_peer` is what earlier connections said: set at the next link-up after a
    connection announced itself, kept while later ones have not (yet)."""
    link = Link(PeerSpec(3, "n3", "127.0.0.1", 1, 1), FakeKernel())
    (out, out_peer), (inn, in_peer) = _up(link)
    assert not link.dsp_peer
    link.announced = True
    link.down("lost", link.generation)
    (out2, out2_peer), (inn2, in2_peer) = _up(link)
    assert link.dsp_peer and not link.announced
    link.down("lost", link.generation)
    (out3, out3_peer), (inn3, in3_peer) = _up(link)
    assert link.dsp_peer
    for sock in (out_peer, in_peer, out2_peer, in2_peer, out3_peer, in3_peer):
        sock.close()
    link.stop()


def test_an_announced_link_holds_newcomers_and_keeps_an_announcing_held_one():
    """An announced link's working connection outlives any newcomer (held aside, one at a
    time, taking over once the current one is lost); a held connection that announced
    itself is kept and a later newcomer closed instead, so a loop of connections from the
    peer's address cannot push the peer's own one out."""
    events = []
    link = Link(PeerSpec(3, "n3", "127.0.0.1", 1, 1), FakeKernel(), post=events.append)
    (out, out_peer), (inn, in_peer) = _up(link)
    link.announced = True
    socks = []
    for _ in range(3):
        stray, stray_peer = _pair()
        socks.append(stray_peer)
        assert link.event(Ev.IN_ACCEPTED, stray) and link.up and link.in_sock is inn
        assert link.in_candidate is stray
    assert events == []
    peer_own, peer_own_peer = _pair()
    link.event(Ev.IN_ACCEPTED, peer_own)
    peer_own_peer.sendall(bytes(hello_header(3, 1).buf))
    assert not link.check_candidate() and link.in_sock is inn     # the current one announced
    late, late_peer = _pair()
    assert not link.event(Ev.IN_ACCEPTED, late) and late.fileno() == -1
    assert link.in_candidate is peer_own and link.up and events == []
    assert link.event(Ev.IN_LOST, inn, "lost")
    assert link.state is S.IN_ONLY and link.in_sock is peer_own
    for sock in (out_peer, in_peer, peer_own_peer, late_peer, *socks):
        sock.close()
    link.stop()
