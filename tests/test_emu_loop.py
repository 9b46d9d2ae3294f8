"""The node kernel's one-thread loop: parked calls, timeouts from the timer heap, queued
requests of a connection whose call is parked, and no thread per connection."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu import protocol as P
from dvk_cffi.emu.server import _Conn
from dvk_cffi.wire import Message
from emu_helpers import CALL_TIMEOUT, DC0, RSYS, FakeProxy, Raw, make_world, wait_until

SYS_EPS = range(10, 30)


@pytest.fixture
def world():
    with make_world() as w:
        yield w


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_many_parked_callers_one_thread(world):
    """20 processes' threads blocked in receive, and the kernel still has one thread and
    serves every new call at once."""
    node = world.proc_node(1)
    d = world.dvk(node)
    futs = []
    actors = []
    for ep in SYS_EPS:
        a = world.actor(f"ep{ep}")
        assert a.call(d.bind, DC0, ep) == ep
        futs.append((ep, a.submit(d.receive, C.ANY, Message())))
        actors.append(a)
    wait_until(lambda: all(d.getprocinfo(DC0, ep).p_rts_flags & C.RECEIVING for ep in SYS_EPS),
               what="all receiving")
    assert _threads(node.proc.pid) == 1
    t0 = time.monotonic()
    for _ in range(50):
        d.getdvsinfo()
    assert time.monotonic() - t0 < CALL_TIMEOUT
    sender = world.actor("sender")
    assert sender.call(d.bind, DC0, 5) == 5
    for ep, fut in futs:
        m = Message()
        m.m_type = ep
        sender.call(d.send, ep, m)
        fut.result(CALL_TIMEOUT)
    assert _threads(node.proc.pid) == 1


def test_timeouts_come_from_the_timer_heap(world):
    """Parked receives with different timeouts end in deadline order, each with
    EDVSTIMEDOUT, while other calls are served."""
    node = world.proc_node(1)
    d = world.dvk(node)
    order: list[int] = []
    lock = threading.Lock()
    futs = []
    for ep, tout in ((10, 600), (11, 200), (12, 400)):
        a = world.actor(f"ep{ep}")
        a.call(d.bind, DC0, ep)

        def recv(tout=tout, ep=ep):
            try:
                d.receive(C.ANY, Message(), tout)
            except E.DvkError as err:
                with lock:
                    order.append(ep)
                return err.code
            return 0

        futs.append(a.submit(recv))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.1:
        d.getdvsinfo()                            # served while the receives are parked
    codes = [f.result(CALL_TIMEOUT) for f in futs]
    assert codes == [E.EDVSTIMEDOUT] * 3
    assert order == [11, 12, 10]
    assert time.monotonic() - t0 >= 0.5


def test_request_behind_a_parked_call_waits_its_turn(world):
    """A client that sends a second request while its first is parked gets both answers,
    in order (the protocol is one call at a time; nothing is lost or mixed)."""
    node = world.proc_node(1)
    raw = Raw(node.path)
    try:
        raw.hello()
        rc, values = raw.call("BIND", C.SELF_BIND, DC0, -1, 10, C.LOCALNODE, b"raw")
        assert (rc, values) == (0, [10])
        first = struct.pack("<H", P.OP["RECEIVE"]) + P.encode_values([C.ANY, 300])
        second = struct.pack("<H", P.OP["GETDVSINFO"])
        raw.sock.sendall(struct.pack("<I", len(first)) + first
                         + struct.pack("<I", len(second)) + second)
        t0 = time.monotonic()
        rc1, _ = P.decode_reply(_frame(raw))
        rc2, values2 = P.decode_reply(_frame(raw))
        assert rc1 == E.EDVSTIMEDOUT and time.monotonic() - t0 >= 0.25
        assert rc2 == 0 and values2[0] == 1
    finally:
        raw.close()


def _frame(raw: Raw) -> bytes:
    head = _exact(raw, 4)
    return _exact(raw, struct.unpack("<I", head)[0])


def _exact(raw: Raw, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = raw.sock.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_parked_caller_that_hangs_up_is_unbound(world):
    """A thread that closes its connection while parked in receive exits: its slot is
    freed and the loop goes on."""
    node = world.proc_node(1)
    d = world.dvk(node)
    raw = Raw(node.path)
    other = world.actor("raw")       # not this thread: it asks while the raw one is parked
    rc, _ = raw.call("HELLO", P.VERSION, os.getpid(), other.tid, b"raw")
    assert rc == 0
    rc, _ = raw.call("BIND", C.SELF_BIND, DC0, -1, 10, C.LOCALNODE, b"raw")
    assert rc == 0
    body = struct.pack("<H", P.OP["RECEIVE"]) + P.encode_values([C.ANY, -1])
    raw.sock.sendall(struct.pack("<I", len(body)) + body)
    wait_until(lambda: d.getprocinfo(DC0, 10).p_rts_flags & C.RECEIVING, what="receiving")
    raw.close()
    wait_until(lambda: d.getprocinfo(DC0, 10).p_rts_flags & C.SLOT_FREE, what="unbound")
    assert d.getdvsinfo()[0] == 1


def test_pipelined_requests_are_all_answered(world):
    """A client that sends thousands of requests at once, reads none of the replies for a while
    and then all of them: each one answered in order, the kernel alive (no recursion per
    queued request, no unbounded reply buffer)."""
    node = world.proc_node(1)
    raw = Raw(node.path)
    try:
        raw.hello()
        n = 5000
        bodies = [struct.pack("<H", P.OP["GETNODEINFO"]) + P.encode_values([i % 3 - 1])
                  for i in range(n)]
        blob = b"".join(struct.pack("<I", len(b)) + b for b in bodies)
        sender = threading.Thread(target=raw.sock.sendall, args=(blob,), daemon=True)
        sender.start()
        time.sleep(0.3)
        got = []
        for _ in range(n):
            rc, _values = P.decode_reply(_frame(raw))
            got.append(rc)
        sender.join(CALL_TIMEOUT)
        assert got == [0] * n
    finally:
        raw.close()
    assert node.proc.poll() is None
    d = world.dvk(node)
    assert d.getdvsinfo()[0] == 1


def test_timer_entries_of_ended_calls_do_not_pile_up(world):
    """Thousands of receives with a long timeout that end at once leave a bounded timer heap."""
    from dvk_cffi.emu.server import TIMER_COMPACT

    node = world.inproc_node(1)
    d = world.dvk(node)
    server, client = world.actor("server"), world.actor("client")
    server.call(d.bind, DC0, 10)
    client.call(d.bind, DC0, 11)
    rounds = TIMER_COMPACT * 2

    def serve():
        m = Message()
        for _ in range(rounds):
            d.receive(C.ANY, m, 30000)
            d.send(11, m, 30000)

    fut = server.submit(serve)
    m = Message()
    deadline = time.monotonic() + 60
    for _ in range(rounds):
        client.call(d.sendrec, 10, m, 30000)
        assert time.monotonic() < deadline
    fut.result(CALL_TIMEOUT)
    with node.kernel.lock:
        assert len(node.server.timers) <= 2 * TIMER_COMPACT + 10


def test_forked_child_is_a_new_process_to_the_kernel(world):
    """After fork the library's connections are the parent's: the child's first call opens its
    own (the kernel sees a new task of the child's pid) and the parent's binding is untouched."""
    node = world.proc_node(1)
    d = world.dvk(node)
    assert d.bind(DC0, 11) == 11
    pid = os.fork()
    if pid == 0:                                              # pragma: no cover - the child
        ok = False
        try:
            ok = (d.bind(DC0, 12) == 12 and d.getprocinfo(DC0, 12).p_lpid == os.getpid()
                  and d.getprocinfo(DC0, 11).p_lpid == os.getppid())
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert d.getprocinfo(DC0, 11).p_lpid == os.getpid()       # the parent goes on as before
    m = Message()
    with pytest.raises(E.DvkError) as exc:                    # and its connection still works
        d.receive(C.ANY, m, 0)
    assert exc.value.code == E.EDVSAGAIN


def _parked(node, op: str) -> bool:
    """A call `op` waits in the in-process node kernel's loop."""
    with node.kernel.lock:
        return any(c.op == op and c.call is not None for c in node.server.fdmap.values()
                   if isinstance(c, _Conn))


def test_a_proxys_command_is_answered_before_the_local_calls_woken_with_it(world):
    """A put2lcl of a remote SEND to a local receiver wakes two calls: the receiver's RECEIVE
    and the sender proxy's GET2RMT, which takes the SEND_ACK.  The proxy is answered first: its
    command goes on to another node, where a process waits for it (the remote sender, held in
    its SEND until the ACK is back), and the receiver's wake-up would otherwise delay it.  Eight
    receivers, each woken with the proxy: the kernel's set of woken tasks has no order, so a
    loop that did not choose would answer a receiver first in some of them."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    px = FakeProxy(world, node, d, 2)
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    px.rproxy.call(d.getdvsinfo)        # its connection is open: no HELLO among the answers
    answered: list[str] = []
    real_send = node.server._send

    def send(conn, data):
        answered.append(conn.op)
        real_send(conn, data)

    node.server._send = send
    for ep in range(10, 18):
        receiver = world.actor(f"ep{ep}")
        assert receiver.call(d.bind, DC0, ep) == ep
        m = Message()
        got = receiver.submit(d.receive, C.ANY, m, int(CALL_TIMEOUT * 1000))
        hdr, ack = px.get_async()
        wait_until(lambda: _parked(node, "RECEIVE"), what="the receive parked")
        wait_until(lambda: _parked(node, "GET2RMT"), what="the get2rmt parked")
        del answered[:]
        assert px.put(c_src=RSYS, c_dst=ep, m_type=ep) >= 0
        assert got.result(CALL_TIMEOUT) == 0 and m.m_type == ep
        ack.result(CALL_TIMEOUT)
        assert hdr.c_cmd == C.CMD_SEND_ACK
        assert answered == ["GET2RMT", "RECEIVE", "PUT2LCL"]
