"""The compiled sender and deliverer of a node DSP (fastpath.Sender, fastpath.Receiver;
fastrelay.c rt_send_pump, rt_deliver_pump) against a hostile peer and a failing node kernel.

The link is a socket pair the test writes frames into; the node kernel is a thread on the other
end of a socket pair that answers PUT2LCL and GET2RMT as the emulator does, or not at all, or
with replies no kernel sends.  Whatever the loop in C delivers must be what the Python path
(`check_header`, then the router) would deliver, each frame once; every kernel failure must end
as the Python path ends it.  `make fuzz-relay-asan` and tests/test_fastrelay_asan.py run these
against the module built with AddressSanitizer.
"""

from __future__ import annotations

import errno
import functools
import random
import socket
import struct
import threading
import time
from types import SimpleNamespace

import pytest

from dsp_proxy import fastpath
from dsp_proxy.misc import Counters
from dsp_proxy.rproxy import FrameError, FrameReader, WireLimits, _recv_timeout, check_header
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.api import Buffer
from dvk_cffi.emu import protocol as P
from dvk_cffi.emu.client import EmuDvk
from dvk_cffi.wire import HEADER_SIZE, Header, make_header

pytestmark = pytest.mark.skipif(fastpath.lib is None, reason="the compiled relay is not built")

LOCAL, PEER, LB, NR_NODES, NR_DCS = 2, 1, 0, 4, 2
#: DC 0's endpoint range (nr_tasks, nr_procs) as the Python check knows it
RANGE = (34, 221)
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
_OP_PUT2LCL, _OP_GET2RMT = P.OP["PUT2LCL"], P.OP["GET2RMT"]


class FakeKernel:
    """One thread's connection to a node kernel: a thread that answers each request with
    what `answer(op, values)` returns (bytes of a whole reply frame, or None: no answer, the
    request is kept in `requests`)."""

    def __init__(self, answer) -> None:
        self.client, self.server = socket.socketpair()
        self.answer = answer
        self.requests: list[tuple[str, list]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                body = P.recv_frame(self.server)
                if body is None:
                    return
                op, values = P.decode_request(body)
                self.requests.append((op, values))
                reply = self.answer(op, values)
                if reply is not None:
                    self.server.sendall(reply)
        except (OSError, P.ProtocolError):
            self.server.close()     # as a kernel that died: the connection ends

    def puts(self) -> list[bytes]:
        """The headers of the PUT2LCL requests so far."""
        return [bytes(v[0]) for op, v in self.requests if op == "PUT2LCL"]

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.thread.join(5)


class FakeDvk:
    """The part of EmuDvk the compiled loops use, over one FakeKernel connection; its
    Python-path calls (`put2lcl`) are recorded."""

    backend = "emu"

    def __init__(self, kernel: FakeKernel | None, limit: float = 0.2) -> None:
        self.kernel = kernel
        self.limit = limit
        self.failed: list[BaseException] = []
        self.python_puts: list[bytes] = []
        self.channel_error: BaseException | None = None
        self._local = SimpleNamespace(conn=None if kernel is None else kernel.client)
        if kernel is not None:
            kernel.client.settimeout(limit)     # as EmuDvk's: non-blocking, its limit

    def thread_channel(self):
        if self.channel_error is not None:
            raise self.channel_error
        if self._local.conn is None:
            raise E.DvkError.for_code(E.EDVSSHUTDOWN, "the node kernel stopped")
        return self._local.conn.fileno(), self.limit

    def channel_failed(self, exc):
        self.failed.append(exc)
        self._local.conn = None
        raise E.DvkError.for_code(E.EDVSSHUTDOWN, "the node kernel stopped")

    put2lcl_reply = EmuDvk.put2lcl_reply
    get2rmt_reply = EmuDvk.get2rmt_reply
    _reply_values = EmuDvk._reply_values

    def get2rmt_request(self, payload, timeout):
        return P.encode_ii(_OP_GET2RMT, payload.addr, timeout)

    def put2lcl(self, h: Header, payload) -> int:
        self.python_puts.append(bytes(h.buf))
        return 0


class FakeDeliverer:
    """`rproxy.Deliverer`'s side the compiled deliverer uses: its payload buffer, its parked
    deliveries and `put_done` (each call recorded with its code)."""

    def __init__(self) -> None:
        self.payload = Buffer(memoryview(bytearray(C.MAXCOPYBUF)), 0x1000)
        self.parked: dict = {}
        self.done: list[tuple[bytes, bytes, int]] = []

    def put_done(self, h: Header, data, code: int, autobind: bool) -> int:
        self.done.append((bytes(h.buf), bytes(data[:h.c_len]), code))
        return code


class Node:
    """A node DSP's receiver of the link to PEER, reading a socket pair with the compiled
    deliverer and delivering to a FakeKernel."""

    def __init__(self, answer=None, limit: float = 0.2) -> None:
        self.table = fastpath.FlowTable(LOCAL, LB, NR_NODES, NR_DCS, ())
        self.table.set_dc(0, RANGE)
        self.kernel = FakeKernel(answer or _ok)
        self.dvk = FakeDvk(self.kernel, limit)
        self.rx, self.tx = socket.socketpair()
        _recv_timeout(self.rx, 2.0)
        self.reader = FrameReader(self.rx)
        self.deliverer = FakeDeliverer()
        self.link = SimpleNamespace(peer=PEER, spec=SimpleNamespace(autobind=False),
                                    last_rx=0.0, received=Counters())
        self.receiver = fastpath.Receiver(self.table, self.reader, self.link, self.dvk,
                                          self.deliverer)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()
        self.kernel.close()
        self.table.free()


@pytest.fixture
def node():
    made: list[Node] = []

    def make(*args, **kw) -> Node:
        made.append(Node(*args, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for n in made:
            n.close()


def _ok(op: str, values: list) -> bytes:
    return P.encode_reply(0, [0])


def _frame(cmd: int = C.CMD_SEND_MSG, src: int = 5, dst: int = 7, length: int = 0,
           **fields: int) -> bytes:
    """A frame from PEER for a process of this node (DC 0)."""
    base = dict(c_cmd=cmd, c_dcid=0, c_src=src, c_dst=dst, c_snode=PEER, c_dnode=LOCAL,
                c_len=length, c_pid=77)
    base.update(fields)
    h = make_header(**base)
    return bytes(h.buf) + bytes((i * 7) & 0xFF for i in range(max(0, base["c_len"])))


def test_frames_for_this_node_are_delivered_in_c_once_each(node):
    """The plain case: every valid frame reaches the kernel once, in order, and none is left
    to the Python path."""
    n = node()
    frames = [_frame(dst=7 + i) for i in range(5)] + [
        _frame(C.CMD_COPYIN_DATA, length=300, v_bytes=300)]
    n.tx.sendall(b"".join(frames))
    for _ in range(len(frames)):
        assert not n.receiver.read(0)
        if len(n.kernel.puts()) == len(frames):
            break
    assert n.kernel.puts() == [f[:HEADER_SIZE] for f in frames]
    assert n.reader.start == n.reader.end and not n.dvk.python_puts
    n.receiver.fold_received()
    assert n.link.received.frames == len(frames)


def test_a_put2lcl_the_kernel_does_not_answer_is_not_delivered_again(node):
    """A node kernel that took the PUT2LCL request and did not answer within the answer limit
    (wedged, or killed after it read it) may have delivered the frame: the Python path then
    counts the call as failed (EDVSSHUTDOWN, the error ACK where the kernel sends none) and
    never makes it again.  The compiled deliverer left the frame in the buffer for the Python
    path, which delivered it a second time on a new connection."""
    n = node(answer=lambda op, values: None, limit=0.2)
    first, second = _frame(dst=7), _frame(dst=8)
    n.tx.sendall(first + second)
    python = n.receiver.read(0)
    assert len(n.kernel.puts()) == 1 and len(n.dvk.failed) == 1
    assert isinstance(n.dvk.failed[0], TimeoutError)
    # the frame is taken, and answered as the Python path answers a failed call
    assert n.deliverer.done and n.deliverer.done[0][0] == first[:HEADER_SIZE]
    assert n.deliverer.done[0][2] == E.EDVSSHUTDOWN
    # the next frame is for the Python path (no kernel connection now), not the first again
    assert python and n.reader.has_frame()
    assert bytes(n.reader.view[n.reader.start:n.reader.start + HEADER_SIZE]) == \
        second[:HEADER_SIZE]
    n.receiver.fold_received()
    assert n.link.received.frames == 1


def test_a_kernel_that_closes_the_connection_costs_the_frame_once(node):
    """The kernel closes the connection after reading the request (killed): the frame is
    answered EDVSSHUTDOWN once, as on the Python path; the kernel saw it once."""
    n = node(answer=lambda op, values: (_ for _ in ()).throw(OSError("gone")))
    frame = _frame(C.CMD_COPYIN_DATA, length=64, v_bytes=64)
    n.tx.sendall(frame)
    n.receiver.read(0)
    assert len(n.kernel.puts()) == 1
    assert [d[2] for d in n.deliverer.done] == [E.EDVSSHUTDOWN]
    assert n.deliverer.done[0][1] == frame[HEADER_SIZE:]
    assert n.reader.start == n.reader.end


def test_a_kernel_connection_that_cannot_be_had_leaves_the_frames_to_the_python_path(node):
    """When the thread's kernel connection cannot be opened (the kernel wedged: its HELLO
    times out, DvkError; or gone: DvkUnavailable), the receiver reads on and the frames go to
    the Python path, which answers its own failure; the read never raises the DVK's error
    (which killed the RPROXY thread: a pair restart, the link down)."""
    n = node()
    for err in (E.DvkError.for_code(E.EDVSSHUTDOWN, "the node kernel stopped"),
                OSError(errno.ECONNREFUSED, "no kernel")):
        n.dvk.channel_error = err
        n.tx.sendall(_frame())
        assert n.receiver.read(0)
        assert n.receiver() is True
        n.reader.next(functools.partial(check_header, peer=PEER,
                                        limits=WireLimits(NR_NODES, NR_DCS, {0: RANGE})))
    assert not n.kernel.puts()


@pytest.mark.parametrize("reply", [
    b"\xff\xff\xff\xff",                         # a length past any room
    struct.pack("<I", fastpath.REPLY_ROOM + 1) + bytes(8),
    struct.pack("<I", 3) + b"abc",               # shorter than a status
    struct.pack("<I", 13) + bytes(13),           # the success length, wrong tags
    P.encode_reply(E.EDVSENQUEUED),
    P.encode_reply(0, [-1 << 63]),
    P.encode_reply(0, [1, b"x" * 4000]),
])
def test_replies_no_kernel_sends_end_as_failures_of_that_frame(node, reply):
    """Whatever the kernel connection answers, each frame is put to the kernel at most once
    and each non-plain answer reaches the Python path's repairs once, for its own frame: a
    reply the loop cannot hold fails the connection (EDVSSHUTDOWN for that frame), any other
    goes to the Python path's decoding; nothing is read or written out of bounds (ASan run)."""
    n = node(answer=lambda op, values: reply)
    frames = [_frame(), _frame(dst=9)]
    n.tx.sendall(b"".join(frames))
    for _ in range(3):      # until each frame was put, or the rest is the Python path's
        try:
            n.receiver.read(0)
        except (E.DvkError, BlockingIOError):
            pass
        if len(n.kernel.puts()) == len(frames) or n.reader.has_frame():
            break
    puts = n.kernel.puts()
    assert puts and puts[0] == frames[0][:HEADER_SIZE]
    assert len(set(puts)) == len(puts) and not n.dvk.python_puts
    assert [d[0] for d in n.deliverer.done] == puts


# ------------------------------------------------------------------ what C may deliver
_FIELDS = {"c_cmd": 0, "c_dcid": 4, "c_src": 8, "c_dst": 12, "c_snode": 16, "c_dnode": 20,
           "c_len": 28, "c_batch_nr": 36, "c_flags": 40}
_EDGES = (INT32_MIN, -(1 << 16), -222, -221, -35, -34, -1, 0, 1, 2, 3, 4, 5, 31, 32, 33,
          220, 221, 222, 255, 256, C.MAXCOPYBUF, C.MAXCOPYBUF + 1, 1 << 16, INT32_MAX)


def _python_delivers(hbuf: bytes, limits: WireLimits) -> bool:
    """Whether the Python path would hand this frame to put2lcl as it is (a node without
    sessions it balances: `Router.from_network` delivers what is for the local node)."""
    from dsp_proxy.rproxy import ROUTE_STRUCT
    fields = ROUTE_STRUCT.unpack_from(hbuf)
    try:
        check_header(fields, PEER, limits)
    except FrameError:
        return False
    h = Header(bytearray(hbuf))
    return (h.c_cmd != C.CMD_NONE and not h.c_flags & (C.FLAG_BATCH | C.FLAG_LZ4)
            and h.c_dnode == LOCAL)


def test_c_delivers_no_frame_the_python_check_refuses():
    """Mutations of every routing field at its boundary values, bit flips and random words,
    one frame at a time through rt_deliver: each frame C hands to put2lcl must pass
    check_header and be for this node; each one it leaves stays whole at the head of the
    buffer.  Also with a session the router rewrites for the peer (`set_reverse`): then C
    delivers nothing."""
    table = fastpath.FlowTable(LOCAL, LB, NR_NODES, NR_DCS, ())
    kernel = FakeKernel(_ok)
    try:
        limits = WireLimits(NR_NODES, NR_DCS, {0: RANGE})
        table.set_dc(0, RANGE)
        dvk = FakeDvk(kernel, 2.0)
        buf = bytearray(2 * (HEADER_SIZE + C.MAXCOPYBUF))
        reader = SimpleNamespace(buf=buf, view=memoryview(buf), start=0, end=0,
                                 has_frame=lambda: False)
        link = SimpleNamespace(peer=PEER, spec=SimpleNamespace(autobind=False), last_rx=0.0,
                               received=Counters())
        deliverer = FakeDeliverer()
        rcv = fastpath.Receiver(table, reader, link, dvk, deliverer)
        rng = random.Random(5162)
        base = [_frame(c, length=(16 if c in C.DATA_CMDS else 0))
                for c in sorted(C.VALID_CMDS - {C.CMD_NONE})]
        delivered = refused = 0
        for i in range(6000):
            f = bytearray(rng.choice(base))
            kind = i % 3
            if kind == 0:
                name = rng.choice(list(_FIELDS))
                struct.pack_into("<i", f, _FIELDS[name], rng.choice(_EDGES))
            elif kind == 1:
                for _ in range(rng.randint(1, 3)):
                    bit = rng.randrange(48 * 8)
                    f[bit // 8] ^= 1 << (bit % 8)
            else:
                struct.pack_into("<i", f, 4 * rng.randrange(12), rng.randrange(-(1 << 31),
                                                                              1 << 31))
            length = struct.unpack_from("<i", f, 28)[0]
            body = bytes(f[:HEADER_SIZE]) + bytes(max(0, min(length, C.MAXCOPYBUF)))
            table.set_reverse(PEER, i % 50 == 0)
            buf[:len(body)] = body
            reader.start, reader.end = 0, len(body)
            before = len(kernel.puts())
            rcv()
            took = len(kernel.puts()) - before
            if took:
                assert _python_delivers(body[:HEADER_SIZE], limits), body[:48].hex()
                assert i % 50 != 0
                assert reader.start == len(body) and kernel.puts()[-1] == body[:HEADER_SIZE]
                delivered += 1
            else:
                assert reader.start == 0
                refused += 1
        assert delivered > 100 and refused > 100, (delivered, refused)
    finally:
        kernel.close()
        table.free()


_CYCLE = """
import gc, mmap, socket
from types import SimpleNamespace
from dsp_proxy import fastpath
from dsp_proxy.rproxy import FrameReader
from dvk_cffi import consts as C
from dvk_cffi.api import Buffer
from dvk_cffi.emu import protocol as P

arena = mmap.mmap(-1, 4 * C.MAXCOPYBUF)
table = fastpath.FlowTable(2, 0, 4, 2, ())
a, b = socket.socketpair()
dvk = SimpleNamespace(get2rmt_request=lambda p, t: P.encode_ii(P.OP["GET2RMT"], p.addr, t))
link = SimpleNamespace(peer=1, spec=SimpleNamespace(autobind=False))
for make in (lambda p: fastpath.Sender(table, link, dvk, p, 500),
             lambda p: fastpath.Receiver(table, FrameReader(a), link, dvk,
                                         SimpleNamespace(payload=p))):
    # the payload as EmuDvk.alloc makes it, a view of an arena, owned by the thread's objects
    obj = make(Buffer(memoryview(arena)[4096:4096 + C.MAXCOPYBUF], 0x1000))
    obj.cycle = obj         # garbage only the collector frees (a traceback's frames, ...)
    del obj
    gc.collect()
print("collected")
"""


def test_a_sender_or_receiver_in_a_garbage_cycle_is_collected_without_a_crash():
    """A Sender or Receiver held the DVK's payload buffer (a memoryview of an arena) through
    cffi; when one was part of a reference cycle (a traceback that keeps its thread's frames,
    for one), the collector cleared the memoryview first and the interpreter died with
    SIGSEGV: the whole DSP.  Run in a child process, which such a crash ends."""
    import os
    import subprocess
    import sys

    from dsp_proxy.cluster import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}"
                                      f"{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-c", _CYCLE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "collected" in done.stdout, (done.returncode,
                                                                 done.stderr[-2000:])


# ------------------------------------------------------------------ the sender
class Sending:
    """A node DSP's compiled sender for the link to PEER: the link's socket a socket pair
    published on the link's Wire, the kernel a FakeKernel that answers GET2RMT with the
    commands of `commands` (header, payload) in turn, then EDVSTIMEDOUT."""

    def __init__(self, replies: list) -> None:
        self.table = fastpath.FlowTable(LOCAL, LB, NR_NODES, NR_DCS, ())
        self.table.set_dc(0, RANGE)
        self.table.set_raw_ok(PEER, True)
        self.wire = self.table.wire(PEER)
        self.out, self.peer_end = socket.socketpair()
        self.out.setblocking(False)
        self.wire.publish(self.out)
        with self.wire:
            self.wire.settled(self.wire.seq(), True)
        self.payload = Buffer(memoryview(bytearray(C.MAXCOPYBUF)), 0x2000)
        self.replies = list(replies)
        self.kernel = FakeKernel(self._answer)
        self.dvk = FakeDvk(self.kernel, 1.0)
        self.kept: list[tuple[bytes, int]] = []
        self.link = SimpleNamespace(peer=PEER, wire=self.wire, batch=False, compress=False,
                                    keep_unsent=lambda rest, fd: self.kept.append((rest, fd)))
        self.sender = fastpath.Sender(self.table, self.link, self.dvk, self.payload, 500)
        self.sender.start()

    def _answer(self, op: str, values: list) -> bytes:
        if not self.replies:
            return P.encode_reply(E.EDVSTIMEDOUT)
        reply = self.replies.pop(0)
        if isinstance(reply, bytes):
            return reply
        hbuf, data = reply
        self.payload.view[:len(data)] = data
        return P.encode_reply(0, [0, hbuf, len(self.replies)])

    def written(self) -> bytes:
        out = b""
        self.peer_end.setblocking(False)
        try:
            while chunk := self.peer_end.recv(1 << 20):
                out += chunk
        except BlockingIOError:
            pass
        return out

    def close(self) -> None:
        self.out.close()
        self.peer_end.close()
        self.kernel.close()
        self.table.free()


@pytest.fixture
def sending():
    made: list[Sending] = []

    def make(replies: list) -> Sending:
        made.append(Sending(replies))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            s.close()


def _command(cmd: int = C.CMD_SEND_MSG, length: int = 0, **fields: int) -> tuple[bytes, bytes]:
    """A command local process 5 addresses to endpoint 7 on PEER (header, payload)."""
    base = dict(c_cmd=cmd, c_dcid=0, c_src=5, c_dst=7, c_snode=LOCAL, c_dnode=PEER,
                c_len=length, c_pid=77)
    base.update(fields)
    return bytes(make_header(**base).buf), bytes((i * 3) & 0xFF for i in range(length))


def test_the_sender_writes_each_plain_command_once_in_order(sending):
    cmds = [_command(), _command(C.CMD_COPYIN_DATA, 300, v_bytes=300), _command(c_dst=8)]
    s = sending(cmds)
    with pytest.raises(E.DvkError) as err:
        s.sender.get2rmt(Header(), time.monotonic() + 30)
    assert err.value.code == E.EDVSTIMEDOUT
    assert s.written() == b"".join(h + d for h, d in cmds)
    sent = Counters()
    s.table.fold(PEER, fastpath.SENT, sent, fastpath.ffi.new("relay_tally *"))
    assert sent.frames == 3 and not s.kept


@pytest.mark.parametrize("reply", [
    _command(length=C.MAXCOPYBUF + 1)[0],
    _command(length=-1)[0],
    _command(c_flags=C.FLAG_BATCH, c_batch_nr=1)[0],
    _command(c_cmd=0x7FFF)[0],
    _command(c_dcid=NR_DCS)[0],
])
def test_a_command_the_sender_is_not_sure_of_goes_to_the_python_path(sending, reply):
    """Lengths past the payload buffer or negative, a batch flag, an unknown command or DC:
    handed to the Python path as get2rmt's result, nothing written."""
    s = sending([(reply, b"")])
    hdr = Header()
    assert s.sender.get2rmt(hdr, time.monotonic() + 30) == 0
    assert bytes(hdr.buf) == reply and s.written() == b""


@pytest.mark.parametrize("reply", [
    b"\xff\xff\xff\xff",
    struct.pack("<I", fastpath.REPLY_ROOM + 1) + bytes(16),
])
def test_a_reply_past_its_room_fails_the_kernel_connection(sending, reply):
    s = sending([reply])
    with pytest.raises(E.DvkError) as err:
        s.sender.get2rmt(Header(), time.monotonic() + 30)
    assert err.value.code == E.EDVSSHUTDOWN and s.dvk.failed and s.written() == b""


def test_the_sender_never_writes_to_a_socket_published_after_its_start(sending):
    """The link went down and up while the sender waited in get2rmt: the new socket is not
    its serving's; the command goes to the Python path (which drops it with the old
    generation), not onto the new connection."""
    cmd = _command()
    s = sending([cmd])
    other, other_peer = socket.socketpair()
    try:
        s.wire.publish(None)
        s.wire.publish(other)
        with s.wire:
            s.wire.settled(s.wire.seq(), True)
        hdr = Header()
        assert s.sender.get2rmt(hdr, time.monotonic() + 30) == 0
        assert bytes(hdr.buf) == cmd[0]
        other_peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            other_peer.recv(1)
    finally:
        other.close()
        other_peer.close()


def test_a_command_the_socket_takes_in_part_leaves_its_rest_to_the_link(sending):
    """The link's socket fills: the command written in part is counted once, its rest goes
    to the link (`keep_unsent`, with the socket it belongs to) and the send lock is free
    again; the bytes written and the rest make the command exactly."""
    cmds = [_command(C.CMD_COPYIN_DATA, C.MAXCOPYBUF, v_bytes=C.MAXCOPYBUF)
            for _ in range(64)]
    s = sending(cmds)
    s.out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert s.sender.get2rmt(Header(), time.monotonic() + 30) is None
    assert len(s.kept) == 1 and s.kept[0][1] == s.out.fileno()
    assert s.wire.acquire(blocking=False)
    s.wire.release()
    out = s.written()
    whole, part = divmod(len(out), HEADER_SIZE + C.MAXCOPYBUF)
    frame = cmds[whole][0] + cmds[whole][1]
    assert out[whole * len(frame):] + s.kept[0][0] == frame
    sent = Counters()
    s.table.fold(PEER, fastpath.SENT, sent, fastpath.ffi.new("relay_tally *"))
    assert sent.frames == whole + 1
