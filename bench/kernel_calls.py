"""A node kernel's share of a relayed round trip, measured apart from the cluster
(docs/performance.md, "A node kernel's calls, measured apart").

    python -m bench.kernel_calls [ROUNDS]

The server node's kernel serves five calls per relayed round trip: the receiver proxy's
put2lcl of the request, the server's RECEIVE (which that put2lcl answers), its SEND of the reply
to the remote client (parked until the ACK), the sender proxy's get2rmt that takes the reply,
and the put2lcl of the client node's SEND_ACK (which ends the SEND).  `run(rounds)` times them
in this process, in two settings, and returns µs per round trip of each:

- `logic_us`: the `NodeKernel` methods called directly (no socket, no server loop);
- `server_us`: the same calls as requests over socket pairs, each handled by the node server's
  own request path (read, decode, dispatch, the parked calls' steps, the replies), with no
  epoll and no other process: the server's Python and its system calls, without wake-ups.

Every round trip checks what each call returns (the message the server receives, the reply
header the sender proxy takes), so a kernel that stops doing the work cannot look fast.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time

from dvk_cffi import consts as C
from dvk_cffi.emu import protocol as P
from dvk_cffi.emu.kernel import NodeKernel, Task
from dvk_cffi.emu.model import unused_tids
from dvk_cffi.emu.server import NodeServer, _Conn
from dvk_cffi.info import DcInfo, DvsInfo
from dvk_cffi.wire import MESSAGE_SIZE, MSG_OFFSET, Header, make_header

NODE, PEER, PXID, DC = 1, 2, 2, 0
SERVER_EP, CLIENT_EP = 10, 11          # system endpoints: the server here, the client on PEER
WARMUP = 500
#: How long the benchmark waits for an answer the kernel owes before it fails.
ANSWER_TIMEOUT = 5.0


def _headers() -> tuple[bytes, bytes]:
    """The client's request (SNDREC) and its node's SEND_ACK, as the receiver proxy gets them."""
    req = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=DC, c_src=CLIENT_EP, c_dst=SERVER_EP,
                      c_snode=PEER, c_dnode=NODE)
    req.c_msg.m_source = CLIENT_EP
    req.c_msg.m_type = 0x0A
    ack = make_header(c_cmd=C.CMD_SEND_ACK, c_dcid=DC, c_src=CLIENT_EP, c_dst=SERVER_EP,
                      c_snode=PEER, c_dnode=NODE)
    return bytes(req.buf), bytes(ack.buf)


def _node() -> tuple[NodeKernel, Task]:
    """Node 1 with the proxy pair of node 2 connected and the client bound remote there."""
    k = NodeKernel()
    boot = Task(tid=0, pid=os.getpid(), comm="bench")
    k.dvs_init(boot, NODE, DvsInfo())
    k.dc_init(boot, DcInfo(dc_flags=C.DC_RUNNING))
    return k, boot


def _connect(k: NodeKernel, boot: Task, stid: int, rtid: int) -> None:
    k.proxies_bind(boot, f"node{PEER}", PXID, stid, rtid, C.MAXCOPYBUF)
    k.node_up(boot, f"node{PEER}", PEER, PXID)
    k.proxy_conn(boot, PXID, C.CONNECT_SPROXY)
    k.proxy_conn(boot, PXID, C.CONNECT_RPROXY)
    k.add_node(boot, DC, PEER)
    k.bind(boot, C.RMT_BIND, DC, -1, CLIENT_EP, PEER, "client")


def _check_reply(hdr: bytes) -> None:
    h = Header(hdr)
    if (h.c_cmd, h.c_src, h.c_dst, h.c_dnode) != (C.CMD_SEND_MSG, SERVER_EP, CLIENT_EP, PEER):
        raise RuntimeError(f"get2rmt took {h!r}, not the server's reply")


def _finish(call):
    """A call's result when it runs to its end now (a fresh call that cannot block, or a
    parked one that was woken)."""
    try:
        call.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("a woken call parked again")


class _IdleThreads:
    """Threads of this process that only wait, for the tasks a HELLO names (a node kernel
    never signals a thread of its own process)."""

    def __init__(self, n: int) -> None:
        self._done = threading.Event()
        self._ready = threading.Semaphore(0)
        self.tids: list[int] = []
        self._threads = [threading.Thread(target=self._wait, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()
        for _ in range(n):
            self._ready.acquire()

    def _wait(self) -> None:
        self.tids.append(threading.get_native_id())
        self._ready.release()
        self._done.wait()

    def stop(self) -> None:
        self._done.set()
        for t in self._threads:
            t.join()


def _timed(one, rounds: int) -> float:
    for _ in range(min(WARMUP, rounds)):
        one()
    t0 = time.perf_counter()
    for _ in range(rounds):
        one()
    return (time.perf_counter() - t0) / rounds * 1e6


def logic(rounds: int) -> float:
    """µs per round trip of the five calls made on a `NodeKernel` directly."""
    sp_tid, rp_tid, srv_tid = unused_tids(3)
    k, boot = _node()
    sproxy, rproxy = k.attach(os.getpid(), sp_tid, "sproxy"), k.attach(os.getpid(), rp_tid,
                                                                         "rproxy")
    _connect(k, boot, sp_tid, rp_tid)
    server = k.attach(os.getpid(), srv_tid, "server")
    k.bind(server, C.SELF_BIND, DC, -1, SERVER_EP, C.LOCALNODE, "")
    req, ack = _headers()
    reply = bytes(MESSAGE_SIZE)
    request = req[MSG_OFFSET:MSG_OFFSET + MESSAGE_SIZE]

    def one() -> None:
        receive = k.receive(server, C.ANY, -1)
        next(receive)                               # nothing queued: it parks
        k.put2lcl(rproxy, req, 0)
        if _finish(receive) != request:
            raise RuntimeError("the server did not receive the request")
        send = k.send(server, CLIENT_EP, reply, -1)
        next(send)                                  # parked until the ACK
        _check_reply(_finish(k.get2rmt_more(sproxy, 0, 500))[0])
        k.put2lcl(rproxy, ack, 0)
        if _finish(send) != 0:
            raise RuntimeError("the ACK did not end the server's send")
        k.runnable.clear()                          # no loop here to resume them

    return _timed(one, rounds)


def server_path(rounds: int) -> float:
    """µs per round trip of the five calls as requests handled by the node server's own
    request path, in this process."""
    rundir = tempfile.mkdtemp(prefix="kcalls")
    k, boot = _node()
    peers: list[socket.socket] = []
    srv = threads = None
    try:
        srv = NodeServer(k, os.path.join(rundir, "node.sock"))
        threads = _IdleThreads(3)     # a HELLO names a thread of the connecting process
        sp_tid, rp_tid, srv_tid = threads.tids

        def conn(tid: int) -> tuple[socket.socket, _Conn]:
            mine, theirs = socket.socketpair()
            mine.settimeout(ANSWER_TIMEOUT)
            theirs.setblocking(False)
            c = _Conn(theirs, os.getpid())   # its peer is this process
            srv.conns.add(c)
            srv.fdmap[theirs.fileno()] = c
            peers.append(mine)
            mine.sendall(P.encode_request("HELLO", [P.VERSION, os.getpid(), tid, b"bench"]))
            srv._event(c, select.EPOLLIN)
            if P.decode_reply(P.recv_frame(mine))[0] != 0:
                raise RuntimeError("HELLO refused")
            return mine, c

        (sp, spc), (rp, rpc), (sv, svc) = conn(sp_tid), conn(rp_tid), conn(srv_tid)
        _connect(k, boot, sp_tid, rp_tid)
        k.bind(svc.task, C.SELF_BIND, DC, -1, SERVER_EP, C.LOCALNODE, "")
        req, ack = _headers()
        put_req = P.encode_hu(P.OP["PUT2LCL"], req, 0)
        put_ack = P.encode_hu(P.OP["PUT2LCL"], ack, 0)
        receive = P.encode_ii(P.OP["RECEIVE"], C.ANY, -1)
        send = P.encode_imi(P.OP["SEND"], CLIENT_EP, bytes(MESSAGE_SIZE), -1)
        get2rmt = P.encode_ii(P.OP["GET2RMT"], 0, 500)
        event, readable = srv._event, select.EPOLLIN

        def answer(sock: socket.socket) -> list:
            try:
                rc, values = P.decode_reply(P.recv_frame(sock))
            except TimeoutError:
                raise RuntimeError("the kernel did not answer a call") from None
            if rc < 0:
                raise RuntimeError(f"the kernel answered {rc}")
            return values

        def one() -> None:
            sv.sendall(receive)
            event(svc, readable)
            rp.sendall(put_req)
            event(rpc, readable)
            if answer(sv)[1] != req[MSG_OFFSET:MSG_OFFSET + MESSAGE_SIZE]:
                raise RuntimeError("the server did not receive the request")
            answer(rp)
            sv.sendall(send)
            event(svc, readable)
            sp.sendall(get2rmt)
            event(spc, readable)
            _check_reply(answer(sp)[1])
            rp.sendall(put_ack)
            event(rpc, readable)
            answer(sv)
            answer(rp)

        with k.lock:
            return _timed(one, rounds)
    finally:
        for s in peers:
            s.close()
        if srv is not None:
            srv._close()
        if threads is not None:
            threads.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def run(rounds: int = 20000) -> dict:
    """Both settings, µs per round trip (one run each)."""
    if rounds <= 0:
        raise ValueError("rounds must be positive")
    return {"rounds": rounds, "logic_us": logic(rounds), "server_us": server_path(rounds)}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)))
