"""The compiled relay's writes and the link's own on one socket, and the counters both keep
(dsp_proxy/fastpath.py, dsp_proxy/fastrelay.c; docs/design.md, "The compiled relay").

Each test drives the real C functions through cffi: a `FlowTable` with an established relayed
session, a real `Link` to the session's server whose send lock is the relay's `Wire`, and a
`Relay` that reads the client's frames from a socketpair, as a receiver does.  What the
server's end of the link's socket gets is parsed frame by frame: the ordering rules of the wire
(the relay writes only while the link has nothing of its own waiting, and only under the
link's send lock) keep every frame whole and in order, and these tests fail when one of them
is taken out of fastrelay.c.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import sys
import threading
import time
import types

import pytest

from bench import wire_peers as W
from cluster_helpers import fresh_net, wire_frames
from dsp_proxy import fastpath
from dsp_proxy.cluster import Cluster
from dsp_proxy.link import Link, PeerSpec, cork, uncork
from dsp_proxy.misc import Counters
from dsp_proxy.rproxy import FrameReader
from dvk_cffi import consts as C
from dvk_cffi.wire import HEADER_SIZE, make_header
from fuzz.relay_fuzz import CLIENT, Twins, establish, frame

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled relay is not built")

CLT_EP, EXT_EP, CLT_PID = 50, 10, 77
BIG = C.MAXCOPYBUF


def _copy(size: int = BIG, fill: int | None = None) -> bytes:
    """The client's COPYIN_DATA frame of the established session (relayed to the server)."""
    h = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=CLT_EP, c_dst=EXT_EP,
                    c_snode=CLIENT, c_dnode=0, c_pid=CLT_PID, c_len=size, v_bytes=size,
                    v_src=CLT_EP, v_dst=EXT_EP, v_rqtr=CLT_EP)
    data = os.urandom(size) if fill is None else bytes([fill]) * size
    return bytes(h.buf) + data


def _request(rng: random.Random) -> bytes:
    return frame(rng, C.CMD_SNDREC_MSG, CLT_EP, EXT_EP, CLIENT, 0, CLT_PID)


def _own(marker: int, size: int = 0, cmd: int = C.CMD_SEND_MSG) -> tuple[bytearray, bytes | None]:
    """A frame of the link's own (header, payload), told apart by c_src."""
    if not size:
        return make_header(c_cmd=cmd, c_dcid=0, c_src=marker).buf, None
    h = make_header(c_cmd=C.CMD_COPYOUT_DATA, c_src=marker, c_len=size, v_bytes=size)
    return h.buf, os.urandom(size)


class Rig:
    """An LB host's relay between the client node and one server node, on socketpairs."""

    def __init__(self, wire_class=fastpath.Wire) -> None:
        self.twins = Twins()
        self.table = self.twins.table
        self.svr, _lbsvr = establish(self.twins)
        self.socks: list[socket.socket] = []
        # the server's link: a real Link, its socket's other end is the server
        spec = PeerSpec(nodeid=self.svr, name="srv", host="127.0.0.1", sport=1, rport=1)
        self.link = Link(spec, dvk=None, wire=wire_class(self.table, self.svr))
        out, self.server = self._pair()
        out.setblocking(False)
        self.link.out_sock, self.link.up, self.link.generation = out, True, 1
        self.link.wire.publish(out)
        assert self.link.flush()           # nothing waits: the relay may write
        # the client's link, read by the relay
        cspec = PeerSpec(nodeid=CLIENT, name="clt", host="127.0.0.1", sport=1, rport=1)
        self.clink = Link(cspec, dvk=None, wire=self.table.wire(CLIENT))
        self.clt_in, self.client = self._pair()
        self.clt_in.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 5, 0))
        self.reader = FrameReader(self.clt_in)
        self.relay = fastpath.Relay(self.table, self.reader, CLIENT, {self.svr: self.link},
                                    self._refused, self.clink)
        self.stream = bytearray()

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.socks += [a, b]
        return a, b

    @staticmethod
    def _refused(hbuf: bytes, code: int) -> None:
        raise AssertionError(f"the link refused a relayed frame ({code})")

    def close(self) -> None:
        self.link.wire.publish(None)
        for s in self.socks:
            s.close()
        self.table.free()

    def small_socket(self) -> None:
        """The link's socket takes little at a time (a slow server)."""
        self.link.out_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def pump(self, *frames: bytes) -> None:
        """The client sends `frames`; the receiver reads and relays them, then writes what
        its cork kept and settles, as RPROXY does."""
        self.client.sendall(b"".join(frames))
        reader = self.reader
        deadline = time.monotonic() + 5
        while reader.start != reader.end or select.select([self.clt_in], [], [], 0)[0]:
            assert time.monotonic() < deadline, "the relay did not take the client's frames"
            assert not self.relay.read(0), "a frame of the session went to the Python path"
        for link in uncork():
            link.settle()

    def walk(self, *frames: bytes) -> None:
        """The client sends `frames`; the receiver reads them as the Python path does and the
        relay walks the buffer (`Relay.__call__`): counted in the table, not yet folded."""
        data = b"".join(frames)
        self.client.sendall(data)
        reader = self.reader
        while reader.end - reader.start < len(data):
            reader.fill()
        cork()
        try:
            assert not self.relay(), "a frame of the session went to the Python path"
        finally:
            for link in uncork():
                link.settle()

    def take(self) -> None:
        """The server reads what its socket holds (room in the link's socket again; the link
        has no monitor, so nothing more is written until someone flushes)."""
        self.server.settimeout(5)
        self.stream += self.server.recv(1 << 20)
        self.server.setblocking(False)
        try:
            while True:
                self.stream += self.server.recv(1 << 20)
        except BlockingIOError:
            pass

    def drain(self, frames: int) -> list[tuple[int, int, bytes]]:
        """Everything up to the `frames`-th whole frame, the link writing what it holds
        meanwhile: (c_cmd, c_src, payload) of each frame in order."""
        self.server.setblocking(False)
        deadline = time.monotonic() + 10
        while True:
            parsed = _frames(self.stream)
            if len(parsed) >= frames:
                self.server.setblocking(True)
                return parsed
            assert time.monotonic() < deadline, f"{len(parsed)} of {frames} frames came"
            self.link.flush()
            try:
                self.stream += self.server.recv(1 << 20)
            except BlockingIOError:
                time.sleep(0.001)


def _frames(stream: bytes) -> list[tuple[int, int, bytes]]:
    """The whole frames at the head of `stream` as (c_cmd, c_src, payload)."""
    return [(h.c_cmd, h.c_src, data) for h, data in wire_frames(stream)[0]]


@pytest.fixture
def rig():
    r = Rig()
    yield r
    uncork()
    r.close()


def test_a_relayed_frame_goes_behind_a_frame_the_link_queued_before_it(rig):
    """A writer queued a frame (corked: not written yet); the relay's frame that comes next
    must not overtake it (the queue marks the link busy, and the relay writes only to a quiet
    link)."""
    rng = random.Random(1)
    cork()
    assert rig.link.submit(*_own(701)) == 0
    rig.pump(_request(rng))
    got = rig.drain(2)
    assert [(cmd, src) for cmd, src, _ in got][:1] == [(C.CMD_SEND_MSG, 701)]
    assert got[1][0] == C.CMD_SNDREC_MSG


def test_a_relayed_frame_never_lands_inside_the_links_cut_frame(rig):
    """The link's socket took only part of a frame of the link's own; the server then reads
    some of it.  The relay's frame must wait behind the rest, never go into the middle."""
    rig.small_socket()
    hbuf, data = _own(702, BIG)
    assert rig.link.submit(hbuf, data) == 0
    assert rig.link.unsent, "the socket took the whole frame: no cut to test"
    rig.take()                       # room in the socket again
    request = _request(random.Random(2))
    rig.pump(request)
    got = rig.drain(2)
    assert (got[0][0], got[0][1], got[0][2]) == (C.CMD_COPYOUT_DATA, 702, data)
    assert got[1][0] == C.CMD_SNDREC_MSG and len(got) == 2


def test_the_rest_of_a_frame_the_relay_cut_goes_before_its_next_frames(rig):
    """The relay wrote part of a 64 KiB frame itself: the rest is the link's unsent bytes, so
    the link is not quiet; a frame relayed after the server made room must follow the rest,
    and so must a frame of the link's own."""
    rig.small_socket()
    first, second = _copy(fill=0x11), _copy(fill=0x22)
    rig.pump(first)
    assert rig.link.unsent, "the socket took the whole frame: no cut to test"
    rig.take()
    rig.pump(second)
    rig.take()
    hbuf, data = _own(703)
    assert rig.link.submit(hbuf, data) == 0
    got = rig.drain(3)
    assert [(cmd, pay[:1]) for cmd, _src, pay in got[:2]] == \
        [(C.CMD_COPYIN_DATA, b"\x11"), (C.CMD_COPYIN_DATA, b"\x22")]
    assert got[0][2] == first[HEADER_SIZE:] and got[1][2] == second[HEADER_SIZE:]
    assert (got[2][0], got[2][1]) == (C.CMD_SEND_MSG, 703) and len(got) == 3


OTHER_CLIENT, OTHER_EP = 4, 60


def _other_client(rig: Rig) -> tuple[fastpath.Relay, socket.socket]:
    """A second relayed client node with a session to the same server, handed to the table
    as the router would, and its own receiver's relay: (relay, the client's socket)."""
    sess = types.SimpleNamespace(clt_node=OTHER_CLIENT, svr_node=rig.svr, dcid=0,
                                 clt_ep=OTHER_EP, lbsvr_ep=OTHER_EP + 1, clt_pid=CLT_PID,
                                 svr_pid=900, pending=0, to_server={EXT_EP: EXT_EP})
    assert rig.table.give(sess) >= 0
    rig.table.set_raw_ok(OTHER_CLIENT, True)
    inside, client = rig._pair()
    inside.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 5, 0))
    relay = fastpath.Relay(rig.table, FrameReader(inside), OTHER_CLIENT, {rig.svr: rig.link},
                           rig._refused)
    return relay, client


def test_the_rest_of_a_frame_the_relay_cut_goes_before_another_receivers_frames(rig):
    """One receiver's relay wrote part of a 64 KiB frame and left the rest to the link; before
    that receiver wrote anything more, another receiver relays a frame to the same server.
    The link is not quiet while a rest waits, so that frame goes behind the rest."""
    rig.small_socket()
    first = _copy(fill=0x33)
    rig.client.sendall(first)
    while rig.reader.start == 0:          # until the relay took the whole frame
        assert not rig.relay.read(0)      # the first receiver: still corked afterwards
    assert rig.link.unsent, "the socket took the whole frame: no cut to test"
    rig.take()
    relay, client = _other_client(rig)
    h = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=OTHER_EP, c_dst=EXT_EP,
                    c_snode=OTHER_CLIENT, c_dnode=0, c_pid=CLT_PID)
    client.sendall(bytes(h.buf))
    errors = []

    def other_receiver():
        try:
            assert not relay.read(0)
            for link in uncork():
                link.settle()
        except BaseException as exc:    # reported by the test's thread
            errors.append(exc)
    t = threading.Thread(target=other_receiver, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and not errors, errors
    for link in uncork():
        link.settle()
    got = rig.drain(2)
    assert (got[0][0], got[0][2]) == (C.CMD_COPYIN_DATA, first[HEADER_SIZE:])
    assert (got[1][0], got[1][1]) == (C.CMD_SNDREC_MSG, OTHER_EP + 1) and len(got) == 2


def test_the_rest_of_a_cut_frame_never_starts_the_links_next_connection(rig):
    """The relay wrote part of a 64 KiB frame, and before its receiver could leave the rest to
    the link, the link went down and came up on a new connection.  The rest belongs to the
    old connection: the new one starts with a whole frame."""
    rig.small_socket()
    link = rig.link
    new, new_server = rig._pair()
    new.setblocking(False)
    keep_unsent = link.keep_unsent

    def reconnected_meanwhile(rest, fd):
        link.out_sock = new                 # what the link-down and the new connection do
        link.wire.publish(new)
        keep_unsent(rest, fd)
    link.keep_unsent = reconnected_meanwhile
    rig.client.sendall(_copy(fill=0x44))
    while rig.reader.start == 0:            # until the relay took the whole frame
        assert not rig.relay.read(0)
    assert link.out_sock is new, "the socket took the whole frame: no cut to test"
    for out in uncork():
        out.settle()
    hbuf, data = _own(705)
    assert link.submit(hbuf, data) == 0
    rig.server = new_server
    rig.stream = bytearray()
    got = rig.drain(1)
    assert (got[0][0], got[0][1]) == (C.CMD_SEND_MSG, 705)


def test_the_send_lock_the_relay_held_is_released_when_leaving_the_rest_fails(rig):
    """The relay returns holding the link's send lock after a partial write; whatever happens
    while the receiver leaves the rest to the link, the lock is released (else every later
    write of the link waits for a holder that is gone)."""
    rig.small_socket()

    def broken(rest, fd):
        raise RuntimeError("the link failed while taking the rest")
    rig.link.keep_unsent = broken
    rig.client.sendall(_copy(fill=0x55))
    with pytest.raises(RuntimeError):
        while rig.reader.start == 0:
            rig.relay.read(0)
    assert rig.link.send_lock.acquire(blocking=False), "the relay kept the send lock"
    rig.link.send_lock.release()


class _RacingWire(fastpath.Wire):
    """The relay's wire, with a moment of another thread's between a writer's look at the
    queue and its `settled`, and one right after it released the send lock."""

    on_settled = None
    on_released = None

    def settled(self, seq: int, empty: bool) -> None:
        hook, self.on_settled = self.on_settled, None
        if hook is not None:
            hook()
        super().settled(seq, empty)

    def release(self) -> None:
        super().release()
        hook, self.on_released = self.on_released, None
        if hook is not None:
            hook()


def test_a_frame_queued_while_the_writer_settles_is_not_overtaken_by_the_relay():
    """A writer saw the queue empty under the send lock; before it told the relay the link is
    quiet, another writer queued a frame (and left it to the lock's holder).  The link is not
    quiet then (the sequence number moved), so a relayed frame that comes as soon as the lock
    is free goes behind that frame instead of being written first."""
    rig = Rig(_RacingWire)
    try:
        rng = random.Random(3)
        wire = rig.link.wire
        wire.on_settled = lambda: rig.link.submit(*_own(704))   # finds the lock busy
        wire.on_released = lambda: rig.pump(_request(rng))
        rig.link.flush()
        for link in uncork():
            link.settle()
        got = rig.drain(2)
        assert [(cmd, src) for cmd, src, _ in got][:1] == [(C.CMD_SEND_MSG, 704)]
        assert got[1][0] == C.CMD_SNDREC_MSG
    finally:
        uncork()
        rig.close()


def test_the_relay_writes_nothing_while_a_writer_holds_the_send_lock(rig):
    """The send lock is the relay's too: while a writer of the link holds it (here between its
    look at the queue and its write), the relay hands its frame to the link instead of writing
    to the socket, and the frame goes out once the writer is done."""
    rng = random.Random(5)
    seen = []
    with rig.link.send_lock:
        rig.client.sendall(_request(rng))
        rig.relay.read(0)
        rig.server.setblocking(False)
        try:
            seen.append(rig.server.recv(1 << 16))
        except BlockingIOError:
            pass
    assert not seen, "the relay wrote while another thread held the link's send lock"
    assert rig.link.outq, "the relayed frame was not handed to the link"
    for link in uncork():
        link.settle()
    got = rig.drain(1)
    assert got[0][0] == C.CMD_SNDREC_MSG


def test_the_relays_writes_count_as_the_links_for_its_keep_alive(rig):
    """A frame the relay wrote itself makes the link's last write recent: its HELLO timer
    (SPROXY: `Link.last_write`) sees a busy link."""
    rig.link.last_tx = 0.0
    before = time.monotonic()
    rig.pump(_request(random.Random(6)))
    assert rig.drain(1)[0][0] == C.CMD_SNDREC_MSG
    assert rig.link.last_tx == 0.0, "the frame took the link's own path, not the relay's"
    assert before <= rig.link.last_write() <= time.monotonic()


def test_folding_the_relays_counts_races_no_count_of_the_link(rig):
    """Receiver, writers and the statistics' fold run on different threads; with a thread
    switch forced almost everywhere, the link counters still come out exact (each direction
    is changed only by the thread allowed to count it).  The Python path counts the same
    command as the relay, so a fold racing a count would lose one of them."""
    n, k = 300, 10
    rng = random.Random(7)
    requests = [_request(rng) for _ in range(n)]
    old = sys.getswitchinterval()
    done = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:   # reported by the test's thread
                errors.append(exc)
        return run

    def receiver():     # relays a request (its count left in the table), then counts
        count = rig.clink.received.count        # frames of the Python path
        for req in requests:
            rig.walk(req)
            for _ in range(k):
                count(C.CMD_SNDREC_MSG, HEADER_SIZE, 1, 0, 0)

    def writer():       # the link's own frames, counted under the send lock
        for i in range(n * k):
            assert rig.link.submit(*_own(i + 1, cmd=C.CMD_SNDREC_MSG)) == 0

    def reader():       # the server reads everything
        while not done.is_set():
            try:
                rig.stream += rig.server.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(0.0005)

    def folder():       # the statistics, the load report and the router read meanwhile
        while not done.is_set():
            rig.link.fold_relay()
            rig.clink.fold_relay()

    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=guarded(f), daemon=True)
                   for f in (receiver, writer)]
        others = [threading.Thread(target=guarded(f), daemon=True) for f in (folder, reader)]
        for t in workers + others:
            t.start()
        for t in workers:
            t.join(60)
        done.set()
        for t in others:
            t.join(10)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert not any(t.is_alive() for t in workers + others)
    got = rig.drain(n * (k + 1))
    assert len(got) == n * (k + 1)
    rig.link.fold_relay()
    rig.relay.fold_received()         # the receiver's own fold, as when its connection ends
    sent, received = Counters(), Counters()       # the same frames counted on one thread
    for _ in range(n * (k + 1)):
        sent.count(C.CMD_SNDREC_MSG, HEADER_SIZE, 1, 0, 0)
        received.count(C.CMD_SNDREC_MSG, HEADER_SIZE, 1, 0, 0)
    assert rig.link.sent.as_dict() == sent.as_dict()
    assert rig.clink.received.as_dict() == received.as_dict()


class _Switching(dict):
    """`Counters.by_cmd` that hands the GIL to another thread in the middle of a
    read-modify-write of the thread `racer` (after reading a count, before storing it): that
    thread runs `other` (bounded) and only then the first goes on."""

    def __init__(self, base: dict, racer: threading.Thread, other) -> None:
        super().__init__(base)
        self.racer, self.other = racer, other

    def get(self, key, default=None):
        value = super().get(key, default)
        if threading.current_thread() is self.racer and self.other is not None:
            other, self.other = self.other, None
            other()
        return value


def test_a_fold_from_another_thread_loses_no_count_at_the_worst_moment(rig):
    """The statistics' thread folds the relay's counts (`Link.fold_relay`, what
    `fold_fast` calls) and is switched out in the middle of its addition, while the link's
    receiver counts a received frame and a writer queues and counts a sent one.  No count is
    lost: the fold of what was sent runs under the send lock (the writer leaves its frame to
    the lock's holder, who writes and counts it after the fold), and what was received is
    folded by the receiver alone."""
    rig.walk(_request(random.Random(8)))        # the relay counted a frame each way, the
    #                                             received one still in its table
    go = {name: threading.Event() for name in ("received", "sent")}
    done = {name: threading.Event() for name in ("received", "sent")}

    def meanwhile(name: str):
        def run():
            go[name].set()
            assert done[name].wait(5), f"the {name} side did not run"
        return run

    def receiver():
        go["received"].wait(5)
        rig.clink.received.count(C.CMD_SNDREC_MSG, HEADER_SIZE, 1, 0, 0)
        done["received"].set()

    def writer():
        go["sent"].wait(5)
        assert rig.link.submit(*_own(801, cmd=C.CMD_SNDREC_MSG)) == 0
        done["sent"].set()

    me = threading.current_thread()
    rig.clink.received.by_cmd = _Switching(rig.clink.received.by_cmd, me, meanwhile("received"))
    rig.link.sent.by_cmd = _Switching(rig.link.sent.by_cmd, me, meanwhile("sent"))
    threads = [threading.Thread(target=f, daemon=True) for f in (receiver, writer)]
    for t in threads:
        t.start()
    rig.clink.fold_relay()
    rig.link.fold_relay()
    for name in go:                 # a side the fold did not switch to runs now
        go[name].set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(rig.drain(2)) == 2                # the relayed request and the writer's frame
    rig.link.fold_relay()
    rig.relay.fold_received()
    for counters in (rig.link.sent, rig.clink.received):    # the relay's frame, the other
        assert (counters.frames, dict(counters.by_cmd)) == (2, {C.CMD_SNDREC_MSG: 2})


def test_a_busy_relayed_link_sends_no_hello(tmp_path):
    """A real LB host relays a ping-pong for several of its HELLO intervals: the links the
    relay keeps busy carry no HELLO meanwhile (the relay's writes count as the link's), and
    an idle link still gets its HELLOs."""
    net = fresh_net()
    cfg = tmp_path / "hop.cfg"
    cfg.write_text(W.CONFIG.format(net=net, opts="").replace("fd_interval 1000",
                                                             "fd_interval 500"))
    cluster = Cluster(cfg, rundir=str(tmp_path), log_level="WARNING")
    hop = None
    try:
        cluster.start_kernel(W.HOST)
        hop = W.DspHop(net, lambda: cluster.start_dsp(W.HOST))
        req = W.request()
        hellos = rounds = 0
        gaps = []                          # between round trips: the link idle meanwhile
        with hop.quiet():                  # the peers send no HELLOs: only frames
            hop.s_rx.settimeout(5)
            hop.c_rx.settimeout(5)
            last = time.monotonic()
            end = last + 3.0               # over seven HELLO intervals (0.8 x 500 ms)
            while time.monotonic() < end and rounds < 200_000:
                hop.c_tx.sendall(req)
                while True:                # the server's side: HELLOs counted, then answers
                    hdr = W.recv_exact(hop.s_rx, HEADER_SIZE)
                    (cmd,) = struct.unpack_from("<i", hdr, 0)
                    if cmd != C.CMD_NONE:
                        break
                    hellos += 1
                hop.s_tx.sendall(hop.reply)
                W.recv_frame(hop.c_rx)
                rounds += 1
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            # now idle: the DSP's HELLOs resume within a few intervals
            hop.s_rx.settimeout(3)
            hdr = W.recv_exact(hop.s_rx, HEADER_SIZE)
        # a HELLO is due only after 0.4 s without a write: a pause that long (a stalled test
        # or DSP process) may carry one, a busy link none.  The DSP's write of a request
        # falls somewhere inside its round, so the time between two of its writes is bounded
        # by two consecutive rounds, not one
        pauses = sum(1 for a, b in zip(gaps, gaps[1:]) if a + b >= 0.35)
        assert rounds and hellos <= pauses, \
            f"{hellos} HELLOs on a link the relay kept busy ({rounds} rounds, {pauses} pauses)"
        assert struct.unpack_from("<i", hdr, 0)[0] == C.CMD_NONE
    finally:
        if hop is not None:
            hop.close()
        cluster.stop()


def _tcp_pair(rig: Rig) -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection (the receiver's end, the client's end), closed with the rig."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        rig.socks.append(client)
        inside, _ = listener.accept()
    rig.socks.append(inside)
    return inside, client


def _acks_at_once(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK))


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_the_relays_read_after_a_silence_lets_its_connection_hold_the_acks(rig):
    """A link's connection carries frames one way, so Linux answers each small frame with an
    ACK of its own unless the socket is in its interactive mode (TCP_QUICKACK 0), which Linux
    leaves when its delayed-ACK timer fires: the relay's first read after a silence sets the
    mode again, and a read that follows another at once makes no such call."""
    inside, client = _tcp_pair(rig)
    inside.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 5, 0))
    relay = fastpath.Relay(rig.table, FrameReader(inside), CLIENT, {rig.svr: rig.link},
                           rig._refused, rig.clink)
    rng = random.Random(7)
    inside.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)   # as the timer leaves it
    assert _acks_at_once(inside)
    rig.clink.last_rx = time.monotonic() - 1.0                      # a silence of 1 s
    client.sendall(_request(rng))
    assert not relay.read(0)
    assert not _acks_at_once(inside)
    assert rig.drain(1)[0][0] == C.CMD_SNDREC_MSG
    assert time.monotonic() - 1.0 < rig.clink.last_rx <= time.monotonic()
    inside.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    rig.clink.last_rx = time.monotonic() + 60.0                     # no silence before the read
    client.sendall(_request(rng))
    assert not relay.read(0)
    assert _acks_at_once(inside)
    assert rig.drain(1)[0][0] == C.CMD_SNDREC_MSG
