"""Hostile input to the node kernel: every request is answered, no connection or proxy is lost.

A malformed request (bad endpoints, lengths or types, unknown operations, truncated values) is
answered with an EDVS error on the same connection; a fault of the kernel code inside one call
is logged with its traceback and answered EDVSGENERIC.  The regression test of the dead
COPYLCL_RQST connection runs a real node kernel process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.emu import protocol as P
from dvk_cffi.emu import server as server_mod
from dvk_cffi.emu.memory import ARENA_BASE
from dvk_cffi.emu.node import wait_for_socket
from dvk_cffi.emu.server import MAX_FRAME, RBUF_LIMIT, READ_SIZE, SMALL_READ
from dvk_cffi.info import ProcInfo
from dvk_cffi.logs import LOG_BURST
from dvk_cffi.wire import HEADER_SIZE, MESSAGE_SIZE, Message
from emu_helpers import (
    CALL_TIMEOUT,
    DC0,
    SHORT,
    FakeProxy,
    Raw,
    child_env,
    make_world,
    msg,
    raises_code,
    wait_until,
)

LSYS, RSYS = 10, 20
NO_SLOT_EP = 5000          # an endpoint whose process number has no slot in DC0


@pytest.fixture
def world():
    with make_world() as w:
        yield w


def _op(name: str) -> bytes:
    return struct.pack("<H", P.OP[name])


MALFORMED = [
    ("unknown_op", struct.pack("<H", 60000), E.EDVSNOSYS),
    ("unknown_op_next", struct.pack("<H", len(P.OPS)), E.EDVSNOSYS),
    ("short_body", b"\x01", E.EDVSINVAL),
    ("truncated_int", _op("GETNODEINFO") + b"i\x01\x00", E.EDVSINVAL),
    ("truncated_bytes_len", _op("PROCFS") + b"b\x05", E.EDVSINVAL),
    ("truncated_bytes", _op("PROCFS") + b"b" + struct.pack("<I", 100) + b"abc", E.EDVSINVAL),
    ("bad_tag", _op("GETNODEINFO") + b"x", E.EDVSINVAL),
    ("too_few_args", _op("GETPROCINFO") + P.encode_values([0]), E.EDVSINVAL),
    ("too_many_args", _op("GETDVSINFO") + P.encode_values([1]), E.EDVSINVAL),
    ("bytes_for_int", _op("GETNODEINFO") + P.encode_values([b"1"]), E.EDVSINVAL),
    ("int_for_bytes", _op("PROCFS") + P.encode_values([7]), E.EDVSINVAL),
    ("none_for_int", _op("DC_END") + P.encode_values([None]), E.EDVSINVAL),
    ("int_out_of_range", _op("GETNODEINFO") + P.encode_values([1 << 40]), E.EDVSINVAL),
    ("negative_address", _op("GET2RMT") + P.encode_values([-1, 0]), E.EDVSINVAL),
    ("short_message", _op("SEND") + P.encode_values([LSYS, b"\0" * 10, 0]), E.EDVSINVAL),
    ("long_header", _op("PUT2LCL") + P.encode_values([b"\0" * (HEADER_SIZE + 1), 0]),
     E.EDVSINVAL),
    ("short_dcinfo", _op("DC_INIT") + P.encode_values([b"\0" * 7]), E.EDVSINVAL),
    ("short_dvsinfo", _op("DVS_INIT") + P.encode_values([1, b"\0" * 3]), E.EDVSINVAL),
    ("bad_procfs_view", _op("PROCFS") + P.encode_values([b"no/such/view"]), E.EDVSINVAL),
    ("undecodable_name", _op("PROCFS") + P.encode_values([b"\xff\xfe"]), E.EDVSINVAL),
    ("arena_without_fd", _op("ARENA") + P.encode_values([4096]), E.EDVSBADF),
    ("second_hello", _op("HELLO") + P.encode_values([1, 1, 1, b"x"]), E.EDVSNOSYS),
    ("bad_endpoint_send", _op("SEND") + P.encode_values([1 << 30, bytes(MESSAGE_SIZE), 0]),
     E.EDVSNOTBIND),
]


def test_malformed_requests_are_answered_on_the_same_connection(world):
    node = world.proc_node(1)
    raw = Raw(node.path)
    try:
        rc, _ = raw.call("GETDVSINFO")
        assert rc == E.EDVSBADVALUE                # before HELLO: refused, connection kept
        raw.hello()
        for name, body, code in MALFORMED:
            rc, values = raw.body(body)
            assert (rc, values) == (code, []), name
        rc, values = raw.call("GETDVSINFO")         # the connection still serves
        assert rc == 0 and values[0] == 1
    finally:
        raw.close()
    assert node.proc.poll() is None


def test_random_requests_never_cost_the_connection(world):
    """Mutated and random requests (bounded in count and time), every one answered."""
    node = world.proc_node(1)
    rng = random.Random(1162)
    safe = [op for op in P.OPS if op not in ("SHUTDOWN", "DVS_END", "DC_END", "WAIT4BIND",
                                               "UNBIND", "RECEIVE", "RCVRQST", "GET2RMT",
                                               "DVS_INIT", "ARENA")]
    raw = Raw(node.path)
    deadline = time.monotonic() + 30
    answered = 0
    try:
        raw.hello()
        for _ in range(3000):
            if time.monotonic() > deadline:
                break
            op = rng.choice(safe)
            args = []
            for kind in P.SIGNATURES[op]:
                args.append(rng.choice([rng.randrange(-40, 300), rng.randrange(-(1 << 31), 1 << 31),
                                        None, rng.randbytes(rng.choice([0, 4, MESSAGE_SIZE,
                                                                        HEADER_SIZE]))])
                            if rng.random() < 0.3 else
                            (rng.randrange(-40, 300) if kind in "iu" else
                             rng.randbytes({"m": MESSAGE_SIZE, "h": HEADER_SIZE}.get(kind, 8))))
            body = _op(op) + P.encode_values(args)
            if rng.random() < 0.2:
                body = body[:rng.randrange(1, len(body) + 1)]
            rc, _ = raw.body(body)
            assert rc <= 0 or op in ("GETEP",)
            answered += 1
        rc, values = raw.call("GETDVSINFO")
        assert rc == 0 and values[0] == 1
    finally:
        raw.close()
    assert answered >= 100 and node.proc.poll() is None


def test_fault_in_the_kernel_code_is_logged_and_answered_generic(world, caplog):
    node = world.inproc_node(1)
    d = world.dvk(node)

    def broken(*_args, **_kw):
        raise AttributeError("'NoneType' object has no attribute 'task'")

    node.kernel.getnodeinfo = broken
    caplog.set_level(logging.ERROR, logger="dvk.emu.server")
    with raises_code(E.EDVSGENERIC):
        d.getnodeinfo(1)
    assert any(r.exc_info and "GETNODEINFO" in r.getMessage() for r in caplog.records)
    assert d.getdvsinfo()[0] == 1                   # same thread, same connection, still served


def test_bad_copylcl_keeps_the_proxy_pair(world):
    """A COPYLCL_RQST whose v_dst has no slot: an error for that put2lcl, the pair keeps
    working, and once the proxy's connections close the pair can be registered again."""
    node = world.proc_node(1)
    d = world.dvk(node)
    pd = world.dvk(node)                            # the proxy's own connections
    px = FakeProxy(world, node, pd, 2)
    d.add_node(DC0, 2)
    d.rmtbind(DC0, "rsys", RSYS, 2)
    server = world.actor("server")
    assert server.call(d.bind, DC0, LSYS) == LSYS
    with raises_code(E.EDVSRANGE):
        px.put(c_cmd=C.CMD_COPYLCL_RQST, v_src=LSYS, v_dst=NO_SLOT_EP, v_rqtr=RSYS,
               v_bytes=16)
    with raises_code(E.EDVSRANGE):
        px.put(c_cmd=C.CMD_COPYLCL_RQST, v_src=NO_SLOT_EP, v_dst=LSYS, v_rqtr=RSYS,
               v_bytes=16)
    # the pair still carries traffic both ways
    m = Message()
    fut = server.submit(d.receive, C.ANY, m)
    wait_until(lambda: d.getprocinfo(DC0, LSYS).p_rts_flags & C.RECEIVING, what="receiving")
    assert px.put(m_type=7) == MESSAGE_SIZE
    fut.result(CALL_TIMEOUT)
    assert m.m_type == 7 and m.m_source == RSYS
    h = px.get()
    assert (h.c_cmd, h.c_rcode, h.c_dst) == (C.CMD_SEND_ACK, 0, RSYS)
    px.assert_nothing(SHORT)
    # the proxy process goes away: the pair is freed and a new pair registers on the same id
    pd.close()
    sproxy, rproxy = world.actor("sproxy2"), world.actor("rproxy2")
    sproxy.call(d.getdvsinfo)
    deadline = time.monotonic() + CALL_TIMEOUT
    while True:
        try:
            d.proxies_bind("node2", 2, sproxy.tid, rproxy.tid, C.MAXCOPYBUF)
            break
        except E.DvkError as err:
            assert err.code == E.EDVSRSCBUSY and time.monotonic() < deadline
            time.sleep(0.02)
    d.node_up("node2", 2, 2)
    d.proxy_conn(2, C.CONNECT_SPROXY)
    d.proxy_conn(2, C.CONNECT_RPROXY)
    assert d.getproxyinfo(2)[0].p_lpid == sproxy.tid
    d.add_node(DC0, 2)                              # the old pair's end dropped node 2
    d.rmtbind(DC0, "rsys", RSYS, 2)
    fut = server.submit(d.receive, C.ANY, m)
    wait_until(lambda: d.getprocinfo(DC0, LSYS).p_rts_flags & C.RECEIVING, what="receiving")
    assert rproxy.call(d.put2lcl, px.header(m_type=8), d.alloc(C.MAXCOPYBUF)) == MESSAGE_SIZE
    fut.result(CALL_TIMEOUT)
    assert m.m_type == 8
    assert node.proc.poll() is None


def test_fault_in_the_server_loop_costs_one_connection(world, caplog, monkeypatch):
    """An exception in the loop's own code (here: decoding) closes that connection with a
    logged traceback; the node kernel goes on serving the others."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    other = world.actor("other")
    assert other.call(d.getdvsinfo)[0] == 1         # connected before the fault

    def broken(_body, _pos=0):
        raise RuntimeError("injected fault")

    caplog.set_level(logging.ERROR, logger="dvk.emu.server")
    raw = Raw(node.path)
    try:
        raw.hello()
        monkeypatch.setattr(P, "decode_checked", broken)
        raw.sock.sendall(struct.pack("<I", 2) + b"\0\0")
        assert raw.sock.recv(16) == b""             # that connection is closed
    finally:
        raw.close()
        monkeypatch.undo()
    assert any(r.exc_info and "injected fault" in str(r.exc_info[1]) for r in caplog.records)
    assert other.call(d.getdvsinfo)[0] == 1         # the others are still served
    assert node.thread.is_alive()


def _arena_request(raw: Raw, fd: int, size: int) -> tuple[int, list]:
    """ARENA(size) with `fd` as the frame's SCM_RIGHTS descriptor."""
    body = _op("ARENA") + P.encode_values([size])
    socket.send_fds(raw.sock, [struct.pack("<I", len(body)) + body], [fd])
    return P.decode_reply(P.recv_frame(raw.sock))


def test_an_arena_its_process_can_shrink_is_refused(world):
    """A process keeps its arena's memfd and may ftruncate it after passing it: the node
    kernel's next read of the mapping past the new end of file would be a SIGBUS, which kills
    the node kernel.  So an arena must be sealed against shrinking (the client library's are);
    one that is not is refused, its shrinking harms nobody, and a sealed one is served."""
    node = world.proc_node(1)
    peer = world.actor("peer")
    src, dst = Raw(node.path), Raw(node.path)
    world.cleanup.add(src.close)
    world.cleanup.add(dst.close)
    src.hello()
    assert dst.call("HELLO", P.VERSION, os.getpid(), peer.tid, b"peer")[0] == 0
    assert src.call("BIND", C.SELF_BIND, DC0, -1, LSYS, C.LOCALNODE, None) == (0, [LSYS])
    assert dst.call("BIND", C.SELF_BIND, DC0, -1, LSYS + 1, C.LOCALNODE, None)[0] == 0
    size = 1 << 20
    loose = os.memfd_create("loose-arena", os.MFD_CLOEXEC)
    world.cleanup.add(os.close, loose)
    os.ftruncate(loose, size)
    rc, got = _arena_request(src, loose, size)
    os.ftruncate(loose, 0)
    base = got[0] if rc == 0 else ARENA_BASE
    dst.sock.sendall(P.encode_request("RECEIVE", [C.ANY, -1]))    # the copy's destination
    wait_until(lambda: _rts(src, LSYS + 1) & C.RECEIVING, what="receiving")
    assert src.call("VCOPY", C.SELF, base + 4096, LSYS + 1, base, 8)[0] == E.EDVSFAULT
    assert node.proc.poll() is None
    assert rc == E.EDVSBADF
    sealed = os.memfd_create("sealed-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    world.cleanup.add(os.close, sealed)
    os.ftruncate(sealed, size)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    rc, got = _arena_request(src, sealed, size)
    assert rc == 0
    with pytest.raises(PermissionError):
        os.ftruncate(sealed, 0)
    assert src.call("VCOPY", C.SELF, got[0] + 4096, LSYS + 1, got[0], 8) == (0, [8])
    assert node.proc.poll() is None


def _rts(raw: Raw, ep: int) -> int:
    rc, vals = raw.call("GETPROCINFO", DC0, ep)
    assert rc == 0
    return ProcInfo.unpack(vals[1]).p_rts_flags


def test_requests_behind_a_parked_call_are_read_only_up_to_a_limit(world):
    """A client may send requests while one of its calls waits in the kernel (they are served
    after it); a client that never stops sending them made the node kernel buffer all of them,
    without limit.  The kernel stops reading from that connection past `RBUF_LIMIT` and reads
    again once the call is answered: every request is served in order, the connection kept."""
    node = world.inproc_node(1)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    assert raw.call("BIND", C.SELF_BIND, DC0, -1, LSYS, C.LOCALNODE, None) == (0, [LSYS])
    raw.sock.sendall(P.encode_request("RECEIVE", [C.ANY, 1500]))   # parked for 1.5 s
    pushed = _flood_behind_parked_call(node, raw)
    rest = (-pushed) % len(JUNK)                   # complete the last request
    raw.sock.sendall(JUNK[len(JUNK) - rest:])
    count = (pushed + rest) // len(JUNK)
    codes = [P.decode_reply(body)[0] for body in _replies(raw.sock, 1 + count)]
    assert codes == [E.EDVSTIMEDOUT] + [E.EDVSINVAL] * count
    assert raw.call("GETDVSINFO")[0] == 0


def test_a_parked_client_that_floods_and_dies_is_seen_to_exit(world):
    """While its requests are no longer read, the end of the client is still seen: its task
    exits and its slot is free again."""
    node = world.inproc_node(1)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    assert raw.call("BIND", C.SELF_BIND, DC0, -1, LSYS, C.LOCALNODE, None) == (0, [LSYS])
    raw.sock.sendall(P.encode_request("RECEIVE", [C.ANY, -1]))     # parked for good
    _flood_behind_parked_call(node, raw)
    raw.close()
    wait_until(lambda: node.slot(LSYS).is_free, what="the slot of the closed client freed")
    with node.kernel.lock:
        assert not node.server.conns


#: A request the kernel answers EDVSINVAL (no such /proc view), 4 KiB long.
JUNK = P.encode_request("PROCFS", [b"x" * 4096])


def _flood_behind_parked_call(node, raw: Raw) -> int:
    """Send requests on `raw`, whose call is parked, for up to 1 s or 32 MiB without waiting;
    the bytes the kernel let through (it reads at most RBUF_LIMIT of them)."""
    raw.sock.setblocking(False)
    pushed, deadline = 0, time.monotonic() + 1.0
    while pushed < (32 << 20) and time.monotonic() < deadline:
        try:
            pushed += raw.sock.send(JUNK[pushed % len(JUNK):])
        except BlockingIOError:
            time.sleep(0.005)
    with node.kernel.lock:
        (conn,) = [c for c in node.server.conns if c.task is not None]
        assert conn.call is not None, "the call is still parked"
        assert len(conn.rbuf) <= RBUF_LIMIT + READ_SIZE
    assert pushed < (8 << 20)
    raw.sock.settimeout(CALL_TIMEOUT)
    return pushed


def _replies(sock, count: int) -> list[bytes]:
    """The bodies of the next `count` reply frames on `sock`, however they arrive."""
    buf, out = bytearray(), []
    while len(out) < count:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from("<I", buf)[0]:
            n = struct.unpack_from("<I", buf)[0]
            out.append(bytes(buf[4:4 + n]))
            del buf[:4 + n]
        if len(out) < count:
            more = sock.recv(1 << 16)
            assert more, "the node kernel closed the connection"
            buf += more
    assert not buf
    return out


#: A node kernel process allowed only argv[2] descriptors.
_FDS_LIMITED_NODE = ("import resource, sys\n"
                     "limit = int(sys.argv[2])\n"
                     "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
                     "from dvk_cffi.emu.server import run_node\n"
                     "sys.exit(run_node(1, sys.argv[1]))\n")


def _fds_limited_node(world, limit: int) -> tuple[str, str, subprocess.Popen, Raw]:
    """Node 1's kernel as a process allowed `limit` descriptors, and a first client that
    said HELLO: (socket path, log path, process, client); all cleaned up by `world`."""
    path = os.path.join(world.dir, "node1.sock")
    log_path = os.path.join(world.dir, "node1.log")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _FDS_LIMITED_NODE, path, str(limit)],
                                env=child_env(path), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    world.cleanup.add(_kill, proc)
    wait_for_socket(path, timeout=CALL_TIMEOUT, proc=proc)
    first = Raw(path)
    world.cleanup.add(first.close)
    first.hello()
    return path, log_path, proc, first


def test_connections_past_the_descriptor_limit_wait_without_a_busy_loop(world):
    """Clients holding every descriptor the node kernel may open: accept fails (EMFILE) while
    the listener stays readable, and the loop went round at full speed writing an `accept`
    warning each time (about 100,000 lines a second).  The listener rests instead; the clients
    already connected are served, and once a connection closes a new one is accepted.  The
    reaper, which could not open /proc either, took every thread bound without a connection
    for gone and unbound it; now it keeps it."""
    path, log_path, proc, first = _fds_limited_node(world, 40)
    idle = world.actor("idle")                     # a live thread bound by another, never
    assert first.call("BIND", C.LCL_BIND, DC0, idle.tid, LSYS, C.LOCALNODE, None)[0] == 0
    crowd = []
    for _ in range(48):                            # more than the kernel's 40 descriptors
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        world.cleanup.add(s.close)
        s.connect(path)                            # the backlog takes what accept cannot
        crowd.append(s)
    time.sleep(1.5)                                # the reaper looked at least once
    assert first.call("GETDVSINFO")[1][0] == 1     # the connected client is still served
    # the reaper cannot open /proc without a descriptor: that thread is not gone for it
    assert not _rts(first, LSYS) & C.SLOT_FREE
    with open(log_path, "rb") as f:
        warnings = f.read().count(b"accept")
    assert 1 <= warnings <= 10, f"{warnings} accept warnings in about a second"
    for s in crowd:
        s.close()
    late = Raw(path)
    world.cleanup.add(late.close)
    late.hello()                                   # accepted again
    assert late.call("GETDVSINFO")[1][0] == 1
    assert proc.poll() is None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_a_thread_with_two_connections_binds_again_after_closing_one(world):
    """One thread may open two connections (two `EmuDvk`, or an `EmuDevice` that makes its
    own).  Closing one is the thread's exit to the node kernel (its slot is unbound); the
    other connection goes on as a new task.  It went on as the exited task: a bind made
    through it was never undone, the slot stayed bound after the last connection closed."""
    node = world.inproc_node(1)
    one, two = world.dvk(node), world.dvk(node)     # both in this thread
    assert one.bind(DC0, LSYS) == LSYS
    assert two.getdvsinfo()[0] == 1
    two.close()
    wait_until(lambda: node.slot(LSYS).is_free, what="the exit unbinding the slot")
    assert one.bind(DC0, LSYS) == LSYS
    assert one.getprocinfo(DC0, LSYS).p_lpid == threading.get_native_id()
    one.close()
    wait_until(lambda: node.slot(LSYS).is_free, what="the slot freed with the last connection")
    with node.kernel.lock:
        assert threading.get_native_id() not in node.kernel.tasks


def test_hello_names_a_thread_of_the_connecting_process(world):
    """The node kernel signals a bound thread by its TID (SIGTERM when another process unbinds
    it, or at DC end), and the TID is what HELLO says.  A HELLO with TID 0 made the unbind a
    kill(0, SIGTERM): the node kernel's own process group (-1 would have been every process of
    the user).  HELLO must name a thread of the connecting process; the node kernel here runs
    in a session of its own, so the old code killed nothing but it."""
    path = os.path.join(world.dir, "node1.sock")
    with open(os.path.join(world.dir, "node1.log"), "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _NODE_ALONE, path], env=child_env(path),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    world.cleanup.add(_kill, proc)
    wait_for_socket(path, timeout=CALL_TIMEOUT, proc=proc)
    other = world.actor("other")
    for tid in (0, -os.getpgid(proc.pid), 1, other.tid + 4_000_000):
        raw = Raw(path)
        world.cleanup.add(raw.close)
        rc, _ = raw.call("HELLO", P.VERSION, os.getpid(), tid, b"liar")
        if rc == 0:                                # a task of that TID: have it unbound
            assert raw.call("BIND", C.SELF_BIND, DC0, -1, LSYS, C.LOCALNODE, None)[0] == 0
            admin = Raw(path)
            world.cleanup.add(admin.close)
            admin.hello()
            admin.call("UNBIND", DC0, LSYS, 0)
            time.sleep(0.2)
            assert proc.poll() is None, f"HELLO with TID {tid}: the node kernel was killed"
        assert rc == E.EDVSBADVALUE, f"HELLO with TID {tid} accepted"
    honest = Raw(path)
    world.cleanup.add(honest.close)
    assert honest.call("HELLO", P.VERSION, os.getpid(), other.tid, b"peer")[0] == 0
    assert proc.poll() is None


_NODE_ALONE = ("import sys\n"
               "from dvk_cffi.emu.server import run_node\n"
               "sys.exit(run_node(1, sys.argv[1]))\n")


def test_unbinding_a_slot_bound_to_the_node_kernel_itself_does_not_stop_it(world):
    """LCL_BIND may bind any local process, the node kernel's own too; unbinding a slot of
    another process sends that process SIGTERM (the kernel's way), which here stopped the node
    kernel.  It never signals itself."""
    node = world.proc_node(1)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    assert raw.call("BIND", C.LCL_BIND, DC0, node.proc.pid, LSYS, C.LOCALNODE, None)[0] == 0
    assert raw.call("UNBIND", DC0, LSYS, 0)[0] == E.EDVSAGAIN   # the caller is not bound
    time.sleep(0.3)
    assert node.proc.poll() is None
    assert raw.call("GETDVSINFO")[1][0] == 1


def test_a_request_frame_longer_than_any_request_costs_its_connection_unbuffered(world):
    """No request is near 1 MiB (the longest carry a name or a 60-byte struct), yet the node
    kernel buffered a frame of up to 64 MiB per connection while its bytes came in, so a few
    connections could make it hold gigabytes.  A longer frame is a framing error at once; the
    other clients are served."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    raw.sock.settimeout(SHORT / 1000 * 10)
    raw.sock.sendall(struct.pack("<I", 2 << 20) + _op("PROCFS") + b"b" * 4096)   # 2 MiB
    assert raw.sock.recv(16) == b""                 # closed without waiting for the rest
    assert d.getdvsinfo()[0] == 1


def test_names_of_any_bytes_do_not_poison_the_info_calls(world):
    """The names a client gives (rmtbind, node_up, proxies_bind, HELLO's program name) are C
    byte strings.  The kernel kept them decoded as UTF-8 (undecodable bytes replaced), and its
    info structs encode names as latin-1: a name such as "日本" or b"\\xff" made every later
    GETPROCINFO / GETNODEINFO / GETPROXYINFO of that slot, node or pair a kernel fault
    (EDVSGENERIC), for every client.  A name comes back as the bytes it was (cut to size)."""
    node = world.inproc_node(1)
    d = world.dvk(node)                             # an ordinary client asks
    sproxy, rproxy = world.actor("sproxy"), world.actor("rproxy")
    named = Raw(node.path)
    world.cleanup.add(named.close)
    assert named.call("HELLO", P.VERSION, os.getpid(), sproxy.tid, "代理".encode())[0] == 0
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    assert raw.call("PROXIES_BIND", b"px\xff", 2, sproxy.tid, rproxy.tid, C.MAXCOPYBUF)[0] == 0
    assert raw.call("NODE_UP", "節点".encode(), 2, 2)[0] == 0
    assert raw.call("PROXY_CONN", 2, C.CONNECT_SPROXY)[0] == 0
    assert raw.call("ADD_NODE", DC0, 2)[0] == 0
    assert raw.call("BIND", C.RMT_BIND, DC0, -1, 20, 2, "日本".encode()) == (0, [20])
    assert d.getprocinfo(DC0, 20).p_name.encode("latin-1") == "日本".encode()
    assert d.getnodeinfo(2).n_name.encode("latin-1") == "節点".encode()
    sinfo, _rinfo = d.getproxyinfo(2)
    assert sinfo.p_name.encode("latin-1") == "代理".encode()[:15]
    assert "px" in d.proc_text("proxies/info")


def test_a_connection_that_never_says_hello_is_closed(world, monkeypatch):
    """Connections that never speak would hold the node kernel's descriptors for good: one
    that has said no HELLO within HELLO_TIMEOUT is closed; one that did is kept."""
    monkeypatch.setattr(server_mod, "HELLO_TIMEOUT", 0.5)
    node = world.inproc_node(1)
    silent, talker = Raw(node.path), Raw(node.path)
    world.cleanup.add(silent.close)
    world.cleanup.add(talker.close)
    talker.hello()
    assert silent.sock.recv(1) == b""               # closed by the kernel, not by a timeout
    time.sleep(1.5)                                 # the next look passed
    assert talker.call("GETDVSINFO")[0] == 0
    with node.kernel.lock:
        assert len(node.server.conns) == 1


def _fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_thread_that_ends_closes_its_connection_and_its_task_exits(world):
    """Every thread that calls the DVK gets its own connection to the kernel (a task).  A
    daemon starts short-lived threads for ever (a program start, a restarted proxy pair):
    when such a thread ends, its connection must close on both sides and its task exit, as
    the DVK's exit hook does, or each leaves a descriptor in the process and in the kernel."""
    node = world.proc_node(1)
    dvk = world.dvk(node)
    dvk.getdvsinfo()
    tids: list[int] = []

    def call() -> None:
        tids.append(threading.get_native_id())
        dvk.getdvsinfo()

    mine, kernel = _fds(), _fds(node.proc.pid)
    for _ in range(50):
        t = threading.Thread(target=call)
        t.start()
        t.join(CALL_TIMEOUT)
    wait_until(lambda: _fds() <= mine and _fds(node.proc.pid) <= kernel,
               what="the ended threads' connections closed on both sides")
    alive = {int(line.split()[1]) for line in dvk.proc_text("tasks").splitlines()[1:]}
    assert not alive & set(tids), "tasks of ended threads are still alive in the kernel"
    assert threading.get_native_id() in alive


def _arena_maps(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("dvk-arena" in line for line in f)


def test_buffers_of_ended_owners_are_reused_not_leaked(world):
    """Each proxy thread allocates its payload buffers when it starts, and a daemon restarts
    threads for ever: the memory of a buffer no longer referenced is reused (zeroed), so 500
    restarts' worth stays within the first arena; a buffer still held is never handed out
    again."""
    node = world.proc_node(1)
    dvk = world.dvk(node)
    held = dvk.alloc(C.MAXCOPYBUF)
    held.write(b"kept")
    mine, kernel = _arena_maps(), _arena_maps(node.proc.pid)
    for _ in range(1000):
        b = dvk.alloc(C.MAXCOPYBUF)
        assert b.addr != held.addr
        assert b.read(4) == b"\0\0\0\0"
        b.write(b"used")
        del b
    assert held.read(4) == b"kept"
    assert (_arena_maps(), _arena_maps(node.proc.pid)) == (mine, kernel)


def test_a_limited_thread_is_not_held_by_a_kernel_that_stops_answering(world):
    """A supervising thread limits how long it waits for its node kernel: a kernel stopped by
    SIGSTOP (its socket still accepts) fails that thread's calls with EDVSSHUTDOWN once the
    limit passes, naming the wait, instead of holding it for good; the next call opens a new
    connection, and the kernel answers it once it runs again.  Other threads keep waiting."""
    node = world.proc_node(1)
    dvk = world.dvk(node)
    dvk.limit_answers(0.5)
    assert dvk.getdvsinfo()[0] == 1
    node.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(E.DvkError) as err:
            dvk.getdvsinfo()
        assert time.monotonic() - t0 < CALL_TIMEOUT
        assert err.value.code == E.EDVSSHUTDOWN and "did not answer within 0.5 s" in str(err.value)
        with pytest.raises(E.DvkError):
            dvk.getdvsinfo()       # a new connection: its HELLO is held to the limit too
        unlimited: list = []
        other = threading.Thread(target=lambda: unlimited.append(dvk.getdvsinfo()[0]))
        other.start()
        other.join(1.0)
        assert other.is_alive(), "a thread without a limit must wait for its kernel"
    finally:
        node.proc.send_signal(signal.SIGCONT)
    other.join(CALL_TIMEOUT)
    assert unlimited == [1]
    assert dvk.getdvsinfo()[0] == 1


def test_a_program_that_floods_malformed_requests_does_not_flood_the_kernel_log(world):
    """Every malformed request is answered and its first lines logged, but a program sending
    them in a loop must not fill the node kernel's log: LOG_BURST lines of a kind per window
    are written, the rest counted."""
    node = world.proc_node(1)
    raw = Raw(node.path)
    raw.hello()
    sent = LOG_BURST + 150
    try:
        for _ in range(sent):
            rc, _ = raw.body(_op("GETNODEINFO") + b"x")
            assert rc == E.EDVSINVAL
    finally:
        raw.close()
    with open(node.log) as f:
        lines = [line for line in f if "malformed request" in line]
    assert len(lines) == LOG_BURST, f"{len(lines)} lines for {sent} malformed requests"


#: How long a lingering socket's last close waits for its peer: far longer than any call of
#: the tests waits (CALL_TIMEOUT), so a node kernel that makes that close on its loop fails.
LINGER = 120


def _lingering_socket(world) -> socket.socket:
    """A loopback TCP socket whose last close blocks for LINGER seconds: SO_LINGER set, its
    peer reads nothing and megabytes wait in its send queue.  The peer is closed by the
    cleanup (a reset ends the wait), so a node kernel caught in that close stops at once."""
    lst = socket.socket()
    world.cleanup.add(lst.close)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    sock = socket.create_connection(lst.getsockname())
    world.cleanup.add(sock.close)
    peer, _ = lst.accept()
    world.cleanup.add(peer.close)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    queued = 0
    try:
        while True:
            queued += sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert queued > 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, LINGER))
    return sock


@pytest.mark.parametrize("how", ["request", "past_the_limit", "unread_at_close"])
def test_a_lingering_socket_passed_to_the_node_kernel_does_not_stop_it(world, how):
    """Any local process may pass descriptors to its node kernel (SCM_RIGHTS, as ARENA does)
    and close its own copy: the node kernel's close is then the last one, and a TCP socket
    with SO_LINGER whose peer reads nothing blocks that close for its linger time, which its
    owner chooses.  The node kernel closed such descriptors on its loop and stopped serving
    every process of the node for that long.  Each way a descriptor reaches it: with a
    request; past the descriptors a connection keeps (one message may carry 253, and the
    ones beyond the receive buffer were dropped by the kernel, on the loop); still queued on a
    connection the node kernel closes (here: for a frame over MAX_FRAME, read while the
    descriptor waits behind it)."""
    node = world.proc_node(1)
    other = Raw(node.path)
    world.cleanup.add(other.close)
    other.hello()
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    linger = _lingering_socket(world)
    arena = _op("ARENA") + P.encode_values([4096])
    if how == "request":
        socket.send_fds(raw.sock, [struct.pack("<I", len(arena)) + arena], [linger.fileno()])
        linger.close()
        assert P.decode_reply(P.recv_frame(raw.sock))[0] == E.EDVSBADF
    elif how == "past_the_limit":
        spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(24)]
        try:
            socket.send_fds(raw.sock, [struct.pack("<I", len(arena)) + arena],
                            [*spare, linger.fileno()])
        finally:
            for fd in spare:
                os.close(fd)
        linger.close()
        assert P.decode_reply(P.recv_frame(raw.sock))[0] == E.EDVSBADF
    else:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)   # room for it all
        node.proc.send_signal(signal.SIGSTOP)      # everything queued before a byte is read
        try:
            raw.sock.sendall(struct.pack("<I", 2 << 20))
            for _ in range(READ_SIZE // 4096 + 1):  # more than the first read takes
                raw.sock.sendall(bytes(4096))
            socket.send_fds(raw.sock, [b"\0"], [linger.fileno()])
            linger.close()
        finally:
            node.proc.send_signal(signal.SIGCONT)
        assert raw.sock.recv(16) == b""             # closed for the frame's length
    rc, values = other.call("GETDVSINFO")           # the node kernel still serves the others
    assert rc == 0 and values[0] == 1
    late = Raw(node.path)
    world.cleanup.add(late.close)
    late.hello()
    assert node.proc.poll() is None


@pytest.mark.parametrize("cmd", [C.REPLICA_BIND, C.BKUP_BIND], ids=["replica", "backup"])
def test_a_bound_endpoint_cannot_be_taken_by_a_replica_or_backup_bind(world, cmd):
    """The module refuses every bind of a slot in use (EDVSSLOTUSED: its second check, on
    the local path that REPLICA_BIND and BKUP_BIND take too).  The emulator let these two
    rebind a slot another process held: any local process took a server's endpoint, the
    server's receive waited for ever (its messages went to the thief) and the server's exit
    later unbound the thief's binding.  Refused now; the owner keeps its endpoint."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    FakeProxy(world, node, d, 2)
    d.add_node(DC0, 2)
    server, thief, client = world.actor("server"), world.actor("thief"), world.actor("client")
    assert server.call(d.bind, DC0, LSYS) == LSYS
    m = Message()
    got = server.submit(d.receive, C.ANY, m)
    wait_until(lambda: d.getprocinfo(DC0, LSYS).p_rts_flags & C.RECEIVING, what="receiving")
    node_arg = C.LOCALNODE if cmd == C.REPLICA_BIND else 2
    thief.call(d.getdvsinfo)
    with raises_code(E.EDVSSLOTUSED):
        thief.call(d.bind_X, cmd, DC0, thief.tid, LSYS, node_arg)
    info = d.getprocinfo(DC0, LSYS)
    assert (info.p_lpid, info.p_rts_flags) == (server.tid, C.RECEIVING)
    assert client.call(d.bind, DC0, LSYS + 1) == LSYS + 1
    client.call(d.send, LSYS, msg(m_type=5), 5000)
    got.result(CALL_TIMEOUT)
    assert (m.m_type, m.m_source) == (5, LSYS + 1)


def _idle_thread(world) -> int:
    """The TID of a live thread of this process that makes no call of its own."""
    done = threading.Event()
    world.cleanup.add(done.set)
    tids: list[int] = []
    t = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), done.wait()),
                         daemon=True)
    t.start()
    wait_until(lambda: tids, what="the thread started")
    return tids[0]


def test_a_program_name_is_kept_at_the_length_of_a_linux_one(world):
    """HELLO names the calling thread's program; the node kernel kept the name whole, up to
    a frame (1 MiB) per thread, so one process with a hundred threads made it hold 100 MB and
    its `tasks` view a 100 MB reply (past what a client reads: the view failed for everyone,
    the DSP's load sampling too).  A name is kept as Linux keeps a thread's, 15 bytes."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    tid = _idle_thread(world)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    assert raw.call("HELLO", P.VERSION, os.getpid(), tid, b"n" * (64 << 10))[0] == 0
    assert d.lclbind(DC0, tid, LSYS) == LSYS
    assert d.getprocinfo(DC0, LSYS).p_name == "n" * 15
    (line,) = [ln for ln in d.proc_text("tasks").splitlines() if f" {tid} " in ln]
    assert line.endswith(" " + "n" * 15)


def test_a_program_name_cannot_add_lines_to_the_tasks_view(world):
    """The DSP of an emulated node reads its node's processes from the `tasks` view, one
    line each, to measure the node's load.  A program name with a newline (HELLO says what
    it likes, and Linux lets a thread call itself so) added lines of its own: one that was
    not a PID made every load sample fail, and with it the rest of the DSP's periodic work
    (session expiry, service checks, the autoscaler); one that was a PID counted that
    process's CPU as the node's.  The view shows such a character as '?'."""
    from dsp_proxy.main import _node_pids
    node = world.inproc_node(1)
    d = world.dvk(node)
    tid = _idle_thread(world)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    assert raw.call("HELLO", P.VERSION, os.getpid(), tid, b"x\n1 1 - boom\r")[0] == 0
    lines = d.proc_text("tasks").splitlines()
    assert f"{os.getpid()} {tid} - x?1 1 - boom?" in lines
    assert _node_pids(d)() == {os.getpid()}


def test_a_thread_has_one_call_in_the_kernel_at_a_time(world):
    """A Linux thread is in one DVK call at a time; over two connections of one thread a
    client made two at once.  Two sends of one thread to a server put its descriptor twice in
    the server's senders FIFO, the exit took out one, and the server then received a message
    from a freed slot (source 0, type 0) and woke whatever task held that slot next.  A call
    on a connection of a thread whose other connection has a call waiting in the kernel is
    refused with EDVSBUSY; the first call is not disturbed."""
    node = world.inproc_node(1)
    d = world.dvk(node)
    server = world.actor("server")
    assert server.call(d.bind, DC0, LSYS) == LSYS
    one, two = Raw(node.path), Raw(node.path)
    world.cleanup.add(one.close)
    world.cleanup.add(two.close)
    tid = _idle_thread(world)
    for raw in (one, two):                           # the same thread
        assert raw.call("HELLO", P.VERSION, os.getpid(), tid, b"twice")[0] == 0
    assert one.call("BIND", C.SELF_BIND, DC0, -1, LSYS + 1, C.LOCALNODE, None)[0] == 0
    sent = bytes(msg(m_type=42))
    one.sock.sendall(P.encode_request("SEND", [LSYS, sent, -1]))
    wait_until(lambda: d.getprocinfo(DC0, LSYS + 1).p_rts_flags & C.SENDING, what="sending")
    assert two.call("SEND", LSYS, sent, -1) == (E.EDVSBUSY, [])
    assert two.call("GETDVSINFO") == (E.EDVSBUSY, [])
    m = Message()
    server.call(d.receive, C.ANY, m, 5000)
    assert (m.m_source, m.m_type) == (LSYS + 1, 42)
    assert P.decode_reply(P.recv_frame(one.sock)) == (0, [0])    # the send is answered
    assert two.call("GETDVSINFO")[0] == 0            # nothing waits now: served again
    one.close()
    two.close()
    wait_until(lambda: node.slot(LSYS + 1).is_free, what="the exit unbinding the slot")
    with node.kernel.lock:
        assert not node.slot(LSYS).senders
    with raises_code(E.EDVSTIMEDOUT):
        server.call(d.receive, C.ANY, m, SHORT)


def _held(node) -> int:
    """The bytes the node kernel holds for its connections (unserved requests, untaken
    replies), counted from the buffers themselves."""
    with node.kernel.lock:
        return sum(len(c.rbuf) + len(c.wbuf) for c in node.server.conns)


def test_connections_together_make_the_node_kernel_hold_a_bounded_amount(world, monkeypatch,
                                                                        caplog):
    """Each connection may make the node kernel hold about a MiB (a frame still coming in,
    requests behind a parked call, replies its client does not take), and one process may
    open as many connections as the kernel has descriptors (20,000 here): 300 connections
    each sending most of a frame made it hold 300 MiB, 20,000 would hold 20 GB, more than
    this machine has.  Past BUFFER_BUDGET for all connections together, a connection that
    holds bytes is no longer read, until the total falls again; the other clients are
    served meanwhile, and the held bytes go with the connections.  (Budget made small here.)"""
    caplog.set_level(logging.WARNING, logger="dvk.emu.server")
    budget = 1 << 20
    monkeypatch.setattr(server_mod, "BUFFER_BUDGET", budget)
    node = world.inproc_node(1)
    d = world.dvk(node)
    tid = _idle_thread(world)
    frame = struct.pack("<I", MAX_FRAME) + bytes(MAX_FRAME // 2)   # never completed
    flood = []
    for _ in range(16):
        raw = Raw(node.path)
        world.cleanup.add(raw.close)
        assert raw.call("HELLO", P.VERSION, os.getpid(), tid, b"hog")[0] == 0
        raw.sock.setblocking(False)
        flood.append([raw, 0])
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for item in flood:                           # push what each connection takes
            raw, sent = item
            try:
                item[1] += raw.sock.send(frame[sent:])
            except BlockingIOError:
                pass
        time.sleep(0.05)
    assert sum(sent for _raw, sent in flood) > 2 * budget   # far more than the budget sent
    assert _held(node) <= budget + READ_SIZE + 16 * SMALL_READ
    assert any("over the budget" in r.getMessage() for r in caplog.records)
    assert d.getdvsinfo()[0] == 1                    # another client is served meanwhile
    m = Message()
    assert d.bind(DC0, LSYS) == LSYS
    with raises_code(E.EDVSTIMEDOUT):
        d.receive(C.ANY, m, SHORT)                   # a parked call ends by its timeout
    for raw, _sent in flood:
        raw.close()
    wait_until(lambda: _held(node) == 0, what="the held bytes gone with their connections")
    with node.kernel.lock:
        assert node.server.held == 0 and not node.server.starved


def test_an_arena_of_no_bytes_is_refused(world):
    """ARENA(0) mapped the whole memfd (a length of 0 is "all of it" to mmap) and took no
    address space, so a process was no longer held to the arenas its 32-bit address space
    has room for: every such request kept a mapping and a descriptor in the node kernel.
    An arena of no bytes is refused (EDVSBADF, as an arena that does not fit its file)."""
    node = world.inproc_node(1)
    raw = Raw(node.path)
    world.cleanup.add(raw.close)
    raw.hello()
    fd = os.memfd_create("empty-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    world.cleanup.add(os.close, fd)
    os.ftruncate(fd, 1 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    assert _arena_request(raw, fd, 0) == (E.EDVSBADF, [])
    with node.kernel.lock:
        assert not node.kernel.spaces[os.getpid()].arenas
    assert _arena_request(raw, fd, 4096) == (0, [ARENA_BASE])


_ONE_CALL = ("import os, sys\n"
             "from dvk_cffi.emu.client import EmuDvk\n"
             "print(EmuDvk(os.environ['DVK_SOCKET'], answer_limit=float(sys.argv[1]))"
             ".getdvsinfo()[0], flush=True)\n")


def test_a_process_holding_every_descriptor_gives_one_up_to_another(world):
    """One process may open as many connections as the node kernel has descriptors (20,000
    here, a few seconds' work); then no other process of the node could connect, a DSP
    restarting a proxy thread included, for as long as that process liked.  When accept
    finds no descriptor, the newest connection of the process holding the most (connections
    and arenas), past FAIR_SHARE, is closed with a logged reason; its older ones are kept,
    and the other process is served."""
    path, log_path, proc, first = _fds_limited_node(world, 300)   # FAIR_SHARE and some
    hello = P.encode_request("HELLO", [P.VERSION, os.getpid(), threading.get_native_id(),
                                       b"hog"])
    for _ in range(server_mod.FAIR_SHARE + 60):     # more than the kernel's 300 descriptors
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        world.cleanup.add(s.close)
        s.connect(path)
        s.sendall(hello)                            # kept: not closed for silence
    other = subprocess.run([sys.executable, "-c", _ONE_CALL, str(CALL_TIMEOUT)],
                           env=child_env(path), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=CALL_TIMEOUT * 2)
    assert (other.returncode, other.stdout.strip()) == (0, "1"), other.stderr[-2000:]
    assert first.call("GETDVSINFO")[1][0] == 1      # the hog's oldest connection is kept
    with open(log_path, "rb") as f:
        assert b"closed the newest connection of process %d" % os.getpid() in f.read()
    assert proc.poll() is None


def test_a_client_pipelining_requests_takes_turns_with_the_others(world, monkeypatch):
    """The loop served every complete request a read brought (64 KiB: 10,000 small ones)
    before it looked at another connection, so a process pipelining requests on fifty
    connections held another process's sendrec for seconds (7.7 s measured), more with more
    connections.  A connection is served SERVE_BURST requests a turn; the rest wait for the
    next turn, after the other connections had theirs.  Here the loop is held (the kernel
    lock) while a flood and then one request arrive: when that request is answered, most of
    the flood must still be unanswered (whichever connection the loop happened to read
    first)."""
    node = world.inproc_node(1)
    flood_tid, other_tid = _idle_thread(world), _idle_thread(world)
    flood, other = Raw(node.path), Raw(node.path)
    world.cleanup.add(flood.close)
    world.cleanup.add(other.close)
    assert flood.call("HELLO", P.VERSION, os.getpid(), flood_tid, b"flood")[0] == 0
    assert other.call("HELLO", P.VERSION, os.getpid(), other_tid, b"other")[0] == 0
    count = 10000
    request = P.encode_request("GETDVSINFO", [])
    flood_answered = [0]
    flood_answered_before: list[int] = []     # when the other request was answered
    send = node.server._send

    def watching(conn, data):
        if conn.task is not None and conn.task.tid == flood_tid:
            flood_answered[0] += 1
        elif conn.task is not None and conn.task.tid == other_tid:
            flood_answered_before.append(flood_answered[0])
        send(conn, data)

    monkeypatch.setattr(node.server, "_send", watching)
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with node.kernel.lock:                           # the loop waits: both arrive meanwhile
        flood.sock.sendall(request * count)
        other.sock.sendall(request)
    reply = P.recv_frame(other.sock)
    assert P.decode_reply(reply)[1][0] == 1
    assert flood_answered_before and flood_answered_before[0] < count // 2
    flood.sock.settimeout(CALL_TIMEOUT)
    assert len(_replies(flood.sock, count)) == count     # and every one is answered
