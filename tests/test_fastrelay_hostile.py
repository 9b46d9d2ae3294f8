"""The compiled relay's own read loop and tables against what a hostile peer can send.

tests/test_fastpath.py and `make fuzz-relay` hand the relay whole frames in a buffer; here the
receiver's loop in C (`Relay.read`, fastrelay.c `rt_pump`) reads them from a real socket the
way a peer delivers them: cut at every byte, in chunks around the header size, with lengths at
and beyond their limits, filling the read buffer to its last byte.  Whatever it carries must be
what the router alone sends, byte for byte; every header it cannot carry is left whole, at its
place, to the Python check.  The session and flow tables are driven to their limits and beyond
with ids no caller should pass.  `make fuzz-relay-asan` runs these under AddressSanitizer.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import threading
from types import SimpleNamespace

import pytest

from dsp_proxy import fastpath
from dsp_proxy.rproxy import FrameError, FrameReader, _recv_timeout, check_header
from dvk_cffi import consts as C
from dvk_cffi.wire import HEADER_SIZE
from fuzz.relay_fuzz import CLIENT, LB_HOST, SERVERS, Twins, establish, frame, report

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled relay is not built")

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
MAX_FRAME = HEADER_SIZE + C.MAXCOPYBUF
#: The endpoints a client's copy commands name: itself and the service it addresses (one
#: naming any other goes to the router, which refuses it).
CLIENT_EPS = (50, 10)


def _client(rng: random.Random, cmd: int) -> bytes:
    """A frame of the established session's client (50 -> 10)."""
    return frame(rng, cmd, 50, 10, CLIENT, 0, 77, eps=CLIENT_EPS)
_C_LEN = 28          # offset of c_len in the header (dvk_cffi/wire.py)


class Pumped:
    """An LB host's twins (fuzz/relay_fuzz.py) with an established session and the receiver
    of the client's link reading a socket pair through the compiled relay."""

    def __init__(self, cap: int | None = None) -> None:
        self.t = Twins()
        self.rx, self.tx = socket.socketpair()
        try:
            self.svr, self.lbsvr = establish(self.t)
            _recv_timeout(self.rx, 2.0)
            self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            self.reader = FrameReader(self.rx)
            if cap is not None:           # the relay takes the buffer's size as it is
                self.reader.buf = bytearray(cap)
                self.reader.view = memoryview(self.reader.buf)
            self.relay = fastpath.Relay(self.t.table, self.reader, CLIENT, self.t.links,
                                        _no_refusal)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.rx.close()
        self.tx.close()
        self.t.table.free()

    def session_frames(self, rng: random.Random, n: int) -> list[bytes]:
        """Requests, ACKs and COPY data of the established session, as its client sends."""
        cmds = (C.CMD_SNDREC_MSG, C.CMD_COPYIN_DATA, C.CMD_SEND_ACK)
        return [_client(rng, rng.choice(cmds)) for _ in range(n)]

    def router_sends(self, frames: list[bytes]) -> bytes:
        """What the router alone sends for `frames` (each one frame to the server)."""
        out = []
        for f in frames:
            acts = self.t._route(self.t.rb, f, CLIENT)
            assert acts != "refused" and len(acts) == 1, acts
            kind, to, hbuf, data = acts[0]
            assert to == self.svr, acts
            out.append(hbuf + (data or b""))
        return b"".join(out)

    def relayed(self) -> bytes:
        """What the relay handed to the links since the last call."""
        spans = self.t.spans
        assert all(node == self.svr for node, _span, _n in spans)
        out = b"".join(span for _node, span, _n in spans)
        spans.clear()
        return out

    def read(self) -> bool:
        """One read of the receiver, as `RProxy._serve` does it when no whole frame waits."""
        assert not self.reader.has_frame()
        return self.relay.read(0)


def _no_refusal(hbuf: bytes, code: int) -> None:
    raise AssertionError("no link refuses here")


@pytest.fixture
def pumped():
    made = []

    def make(cap: int | None = None) -> Pumped:
        made.append(Pumped(cap))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


def test_frames_cut_at_every_byte_are_relayed_whole(pumped):
    """Three frames (one with a payload) arrive in two reads, cut at each of their bytes:
    whatever is whole is relayed, the rest waits for the next read."""
    p = pumped()
    rng = random.Random(1)
    frames = [_client(rng, C.CMD_SNDREC_MSG),
              _client(rng, C.CMD_COPYIN_DATA),
              _client(rng, C.CMD_SEND_ACK)]
    data = b"".join(frames)
    assert len(data) > 3 * HEADER_SIZE
    for cut in range(1, len(data)):
        want = p.router_sends(frames)
        p.tx.sendall(data[:cut])
        assert p.read() is False
        p.tx.sendall(data[cut:])
        assert p.read() is False
        assert p.relayed() == want, cut
        assert p.reader.start == p.reader.end
        p.t.compare()


@pytest.mark.parametrize("chunk", [1, 2, 119, 120, 121, 239, 241, 4096])
def test_a_stream_in_chunks_around_the_header_size_is_relayed_in_order(pumped, chunk):
    p = pumped()
    frames = p.session_frames(random.Random(chunk), 40)
    want = p.router_sends(frames)
    data = b"".join(frames)
    for pos in range(0, len(data), chunk):
        p.tx.sendall(data[pos:pos + chunk])
        assert p.read() is False
    assert p.relayed() == want
    assert p.reader.start == p.reader.end
    p.t.compare()


_BAD_LENGTHS = [(-1, 0), (-HEADER_SIZE, 0), (-HEADER_SIZE - 1, 0), (INT32_MIN, 0),
                (INT32_MAX, 0), (C.MAXCOPYBUF + 1, 0)]
_BAD_IDS = ["-1", "-120", "-121", "int32-min", "int32-max", "maxcopybuf+1"]


@pytest.mark.timeout(60, method="thread")     # a walk that loops on a length would hang in C
@pytest.mark.parametrize("cmd,c_len,payload", [
    *((C.CMD_SNDREC_MSG, n, k) for n, k in _BAD_LENGTHS),
    (C.CMD_SNDREC_MSG, 1, 1),                        # a payload on a command that has none
    (C.CMD_SNDREC_MSG, C.MAXCOPYBUF, C.MAXCOPYBUF),  # the same, as long as a payload may be
    *((C.CMD_COPYIN_DATA, n, k) for n, k in _BAD_LENGTHS),
], ids=[*(f"request-{i}" for i in _BAD_IDS), "request-1", "request-maxcopybuf",
        *(f"copy-data-{i}" for i in _BAD_IDS)])
def test_a_bad_c_len_stops_the_relay_at_that_header(pumped, cmd, c_len, payload):
    """The frames before the bad header are relayed; the bad one is left whole, at its place,
    to the Python check, which refuses it (the link then closes).  A negative length must
    not move the walk back or keep it in place."""
    p = pumped()
    rng = random.Random(2)
    good = p.session_frames(rng, 3)
    want = p.router_sends(good)
    bad = bytearray(_client(rng, cmd)[:HEADER_SIZE])
    struct.pack_into("<i", bad, _C_LEN, c_len)
    head = b"".join(good)
    p.tx.sendall(head + bytes(bad) + bytes(payload))
    whole = False
    while not whole:                   # a 64 KiB payload may take more than one read
        whole = p.read()
    assert p.relayed() == want
    assert p.reader.start == len(head)
    assert p.reader.has_frame()
    with pytest.raises(FrameError, match="c_len|payload"):
        p.reader.next(functools.partial(check_header, peer=CLIENT, limits=p.t.limits))


def test_a_payload_of_maxcopybuf_waits_for_its_last_byte(pumped):
    p = pumped()
    rng = random.Random(3)
    big = bytearray(_client(rng, C.CMD_COPYIN_DATA)[:HEADER_SIZE])
    struct.pack_into("<i", big, _C_LEN, C.MAXCOPYBUF)
    big += bytes(rng.randrange(256) for _ in range(C.MAXCOPYBUF))
    want = p.router_sends([bytes(big)])
    p.tx.sendall(big[:-1])
    while p.reader.end - p.reader.start < len(big) - 1:
        assert p.read() is False
    assert p.relayed() == b"" and p.reader.start == 0
    p.tx.sendall(big[-1:])
    assert p.read() is False
    assert p.relayed() == want
    p.t.compare()


def test_reads_that_fill_the_buffer_to_its_last_byte(pumped):
    """A read buffer that holds exactly one largest frame: each such frame fills it; a frame
    after a relayed one is moved to the front and its rest fills the buffer exactly."""
    p = pumped(cap=MAX_FRAME)
    rng = random.Random(4)

    def copy_frame() -> bytes:
        h = bytearray(_client(rng, C.CMD_COPYIN_DATA)[:HEADER_SIZE])
        struct.pack_into("<i", h, _C_LEN, C.MAXCOPYBUF)
        return bytes(h) + rng.randbytes(C.MAXCOPYBUF)

    frames = [copy_frame(), copy_frame()]
    want = p.router_sends(frames)
    p.tx.sendall(b"".join(frames))          # both are queued before the first read
    for _ in frames:
        assert p.read() is False
        assert p.reader.start == p.reader.end == MAX_FRAME
    assert p.relayed() == want

    small = _client(rng, C.CMD_SNDREC_MSG)
    big = copy_frame()
    want = p.router_sends([small, big])
    p.tx.sendall(small + big[:-600])
    assert p.read() is False
    assert (p.reader.start, p.reader.end) == (len(small), MAX_FRAME - 600 + len(small))
    p.tx.sendall(big[-600:])
    assert p.read() is False
    assert (p.reader.start, p.reader.end) == (MAX_FRAME, MAX_FRAME)
    assert p.relayed() == want
    p.t.compare()


def test_a_full_read_buffer_of_the_receiver_is_relayed_frame_for_frame(pumped):
    """More frames than the receiver's buffer holds, sent at once: the reads fill it, the
    frame cut at its end is moved to the front and completed."""
    p = pumped()
    rng = random.Random(5)
    cap = len(p.reader.buf)
    frames = p.session_frames(rng, 3 * cap // 300)
    want = p.router_sends(frames)
    sender = threading.Thread(target=p.tx.sendall, args=(b"".join(frames),), daemon=True)
    sender.start()
    got, reads = [], 0
    while sum(map(len, got)) < len(want) and reads < 10_000:
        assert p.read() is False
        assert 0 <= p.reader.start <= p.reader.end <= cap
        got.append(p.relayed())
        reads += 1
    sender.join(10)
    assert b"".join(got) == want
    p.t.compare()


_EXTREMES = [0, 1, 2, 3, 5, 31, 32, 63, 64, HEADER_SIZE, C.MASK_ACKNOWLEDGE, 0xFFFF,
             C.MAXCOPYBUF, C.MAXCOPYBUF + 1, -1, -2, -C.NR_TASKS, -C.NR_TASKS - 1, -HEADER_SIZE,
             -HEADER_SIZE - 1, INT32_MIN, INT32_MAX]


def test_every_header_field_at_its_extremes_agrees_with_the_router():
    """Each 32-bit word of the header of a client's and a server's frames (requests, ACKs,
    COPY data), set in turn to the boundary values of ids, counts and lengths: the relay
    carries the frame exactly as the router sends it or leaves it to the router, whose answer
    is the same with and without the relay (fuzz/relay_fuzz.py `Twins.feed` compares)."""
    t = Twins()
    try:
        establish(t)
        rng = random.Random(7)

        def session_frame(cmd: int, server_side: bool) -> tuple[bytes, int]:
            sess = t.gb.sessions[(0, CLIENT, 50, 10)]
            if server_side:
                return (frame(rng, cmd, 10, sess.lbsvr_ep, sess.svr_node, LB_HOST, 900),
                        sess.svr_node)
            return _client(rng, cmd), CLIENT

        relayed = 0
        for cmd, server_side in ((C.CMD_SNDREC_MSG, False), (C.CMD_COPYIN_DATA, False),
                                 (C.CMD_SEND_ACK, False), (C.CMD_SEND_MSG, True),
                                 (C.CMD_COPYIN_DATA, True), (C.CMD_SNDREC_ACK, True)):
            for off in range(0, HEADER_SIZE, 4):
                for value in _EXTREMES:
                    if (0, CLIENT, 50, 10) not in t.gb.sessions:   # a mutant ended it
                        for node in SERVERS:
                            for group in (t.ga, t.gb):
                                report(group, node)
                        establish(t)
                    # a valid frame first: the router hands the session over again
                    t.feed(*session_frame(C.CMD_SEND_MSG if server_side else C.CMD_SNDREC_MSG,
                                          server_side))
                    data, peer = session_frame(cmd, server_side)
                    mutant = bytearray(data)
                    struct.pack_into("<i", mutant, off, value)
                    if off == _C_LEN:          # the payload as long as c_len says, up to 300
                        mutant = mutant[:HEADER_SIZE] + bytes(max(0, min(value, 300)))
                    relayed += t.feed(bytes(mutant), peer)
        assert relayed > 500 and t.refused > 500, (relayed, t.refused)
    finally:
        t.table.free()


def _table() -> fastpath.FlowTable:
    table = fastpath.FlowTable(5, 0, C.NR_NODES, C.NR_DCS, [])
    for node in range(C.NR_NODES):
        table.set_raw_ok(node, True)
    table.set_dc(0, (C.NR_TASKS, C.NR_PROCS))
    return table


def _session(clt_ep: int, to_server: dict) -> SimpleNamespace:
    return SimpleNamespace(clt_node=CLIENT, svr_node=SERVERS[0], dcid=0, clt_ep=clt_ep,
                           lbsvr_ep=100, clt_pid=77, svr_pid=900, pending=0,
                           to_server=to_server)


def _relays(table: fastpath.FlowTable, clt_ep: int, dst: int) -> bool:
    """A request of client endpoint `clt_ep` to `dst` is relayed by the table."""
    rng = random.Random(clt_ep)
    reader = SimpleNamespace(buf=bytearray(frame(rng, C.CMD_SNDREC_MSG, clt_ep, dst, CLIENT, 0,
                                                 77)), start=0)
    reader.end = len(reader.buf)
    reader.view = memoryview(reader.buf)
    spans = []
    sink = SimpleNamespace(submit_span=lambda span, n: spans.append(bytes(span)) or 0)
    relay = fastpath.Relay(table, reader, CLIENT, {SERVERS[0]: sink}, _no_refusal)
    return relay() is False and reader.start == reader.end and len(spans) == 1


def test_session_and_flow_tables_beyond_their_limits():
    """Sessions and flows are given until the tables refuse; a refusal leaves what is there
    relaying; many sessions ending and starting (deleted flow slots, rebuilds) keep every
    lookup right."""
    table = _table()
    try:
        sids = []
        while len(sids) < 100_000:
            sid = table.give(_session(60, {}))
            if sid < 0:
                break
            sids.append(sid)
        assert 0 < len(sids) < 100_000 and len(set(sids)) == len(sids)
        table.take(sids[0], True)
        assert table.give(_session(60, {})) == sids[0]      # a freed slot is used again
        assert fastpath.lib.rt_map(table.table, sids[0], 12, 20) == 0
        flows = 2
        for sid in sids[1:]:                                # two flows per mapping
            if fastpath.lib.rt_map(table.table, sid, 1000 + sid, 30000 + sid):
                break
            flows += 2
        assert 2 < flows < 2 * len(sids)
        assert _relays(table, 60, 12)
        for sid in sids:
            table.take(sid, True)
        assert not _relays(table, 60, 12)

        rng = random.Random(6)
        live: dict[int, int] = {}
        for i in range(20_000):
            if live and (len(live) > 2000 or rng.random() < 0.5):
                sid = rng.choice(list(live))
                table.take(sid, True)
                del live[sid]
            else:
                clt_ep = 1 + i % 60
                sid = table.give(_session(clt_ep, {10 + i % 7: 20 + i}))
                assert sid >= 0
                live[sid] = clt_ep
        for sid in live:
            table.take(sid, True)
        sid = table.give(_session(61, {12: 20}))
        assert sid >= 0 and _relays(table, 61, 12)
        assert not _relays(table, 61, 13)
    finally:
        table.free()


@pytest.mark.parametrize("bad", [-1, 64, 65, INT32_MAX, INT32_MIN])
def test_ids_out_of_range_are_refused_everywhere(bad):
    """Every entry point of the table checks the node, session, DC and direction it is given
    (run under AddressSanitizer by `make fuzz-relay-asan`)."""
    lib, ffi = fastpath.lib, fastpath.ffi
    table = _table()
    t = table.table
    try:
        out = ffi.new("int64_t[4]")
        tally = ffi.new("relay_tally *")
        assert lib.rt_give(t, bad, 1, 0, 1, 1, 1, 1, 0) == -1
        assert lib.rt_give(t, 1, bad, 0, 1, 1, 1, 1, 0) == -1
        assert lib.rt_map(t, bad, 1, 2) == -1
        assert lib.rt_take(t, bad, 1, out) == -1
        assert not lib.rt_fold(t, bad, 0, tally)
        assert not lib.rt_fold(t, 0, bad, tally)
        assert lib.rt_wire_last_tx(t, bad) == 0.0
        lib.rt_set_dc(t, bad, 1, 0, 0)
        lib.rt_set_raw_ok(t, bad, 1)
        lib.rt_untally(t, bad, ffi.new("unsigned char[]", HEADER_SIZE), HEADER_SIZE)
        lib.rt_wire_fd(t, bad, 0)
        lib.rt_wire_enqueued(t, bad)
        lib.rt_wire_settled(t, bad, 0, 1)
        assert lib.rt_wire_seq(t, bad) == 0
        assert not lib.rt_wire_trylock(t, bad)
        lib.rt_wire_lock(t, bad)
        lib.rt_wire_unlock(t, bad)
        assert lib.rt_set_cmd(t, bad, fastpath.K_VALID) == -1
        buf = ffi.new("unsigned char[]", HEADER_SIZE)
        segs, n, python = ffi.new("relay_seg[4]"), ffi.new("int *"), ffi.new("int *")
        assert lib.rt_relay(t, bad, buf, 0, HEADER_SIZE, segs, 4, n, python) == 0
        assert n[0] == 0 and python[0] == 1
    finally:
        table.free()


@pytest.mark.parametrize("c_len", [-1, -HEADER_SIZE, INT32_MIN, C.MAXCOPYBUF + 1, INT32_MAX])
def test_a_refused_span_with_a_bad_length_ends_the_take_back(c_len):
    """Taking back the count of a refused span stops at a header whose length no walk lets
    through (a negative one would otherwise step back or in place forever, under the table's
    lock): the frames before it are taken back, nothing after it."""
    lib, ffi = fastpath.lib, fastpath.ffi
    table = _table()
    try:
        good = bytearray(HEADER_SIZE)
        struct.pack_into("<i", good, 0, C.CMD_SEND_ACK)
        bad = bytearray(good)
        struct.pack_into("<i", bad, _C_LEN, c_len)
        span = bytes(good + bad + good)
        lib.rt_untally(table.table, 1, ffi.from_buffer(span), len(span))
        tally = ffi.new("relay_tally *")
        assert lib.rt_fold(table.table, 1, fastpath.SENT, tally)
        assert (tally.frames, tally.bytes) == (-1, -HEADER_SIZE)
    finally:
        table.free()


def test_a_take_back_that_leaves_only_per_command_figures_is_still_folded():
    """A relayed SEND_ACK counted and a refused SNDREC of the same size taken back: frames
    and bytes are 0 in all, the per-command figures are not, and the fold hands them over."""
    lib, ffi = fastpath.lib, fastpath.ffi
    t = Twins()
    try:
        svr, _ = establish(t)
        links = {svr: SimpleNamespace(submit_span=lambda span, nframes: 0)}
        relay = fastpath.Relay(t.table, t.reader, CLIENT, links, _no_refusal)
        rng = random.Random(5)
        t.reader.load(_client(rng, C.CMD_SEND_ACK))
        assert relay() is False and t.reader.start == t.reader.end
        taken = bytearray(HEADER_SIZE)
        struct.pack_into("<ii", taken, 0, C.CMD_SNDREC_MSG, 0)
        lib.rt_untally(t.table.table, svr, ffi.from_buffer(bytes(taken)), HEADER_SIZE)
        tally = ffi.new("relay_tally *")
        assert lib.rt_fold(t.table.table, svr, fastpath.SENT, tally)
        by_cmd = {t.table._slots[s]: tally.by_cmd[s] for s in range(64) if tally.by_cmd[s]}
        assert (tally.frames, tally.bytes) == (0, 0)
        assert by_cmd == {C.CMD_SEND_ACK: 1, C.CMD_SNDREC_MSG: -1}
        assert not lib.rt_fold(t.table.table, svr, fastpath.SENT, tally)   # handed over once
    finally:
        t.table.free()
