"""Wire-level peers for the one-hop benchmarks, and the load loops shared by every hop.

`DspHop` runs one DSP (with its emulated node kernel) as the LB host of relayed mode:
node 5 `lbhost` hosts the balancer of the virtual LB node 0; a wire-level *client* peer
(relayed client node 3) and a wire-level *server* peer (node 1) speak the DSP wire protocol to
it directly from this process: their own connections in both directions, source
addresses bound, HELLOs, the server's load report.  A client request goes
client -> DSP -> server with the LB rewrite, the reply server -> DSP -> client: one proxy hop
each way, with the session lookup and header rewrite the DSP does for real traffic.

`TcpHop` is the same pair of peers through a plain TCP forwarder (HAProxy or the Python
forwarder): one connection client <-> forwarder <-> server carrying the same frames.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from dvk_cffi import consts as C
from dvk_cffi.wire import make_header

H = 120
HELLO_EVERY = 0.25

#: fd_fall 30 (a 30 s silence limit): a measurement pauses the peers' HELLOs while the server
#: peer sends nothing (the 64 KiB and 120-byte streams back to back, with their drains); with a
#: 5 s limit the DSP rightly declared the server dead mid-stream and the rate came out negative.
CONFIG = """
lb node0 {{ nodeid 0; cltname lbhost; lb_eps 100 200; fd_interval 1000; fd_fall 30;
           period 30; max_sessions 150; }};
server node1 {{ nodeid 1; rname {net}.1; {opts} }};
client node3 {{ nodeid 3; rname {net}.3; {opts} }};
client lbhost {{ nodeid 5; rname {net}.5; {opts} }};
service latency {{ dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; }};
"""
LB, SRV, CLT, HOST = 0, 1, 3, 5
CLT_EP, EXT_EP, PID = 50, 10, 4242


def nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def hello(snode: int, dnode: int, report: bool = False) -> bytes:
    h = make_header(c_cmd=C.CMD_NONE, c_dcid=-1, c_src=C.NONE, c_dst=C.NONE, c_snode=snode,
                    c_dnode=dnode, c_pid=os.getpid(), c_flags=C.FLAG_DSP_PEER)
    if report:
        m = h.c_msg
        m.m_source, m.m_type, m.m1_i1, m.m1_i2, m.m1_i3 = snode, C.MT_LOAD_LEVEL, 1, \
            C.LVL_IDLE, 30
    return bytes(h.buf)


def request(cmd: int = C.CMD_SNDREC_MSG, dcid: int = 0, clt_ep: int = CLT_EP) -> bytes:
    """What the relayed client node sends to the LB node (120 bytes)."""
    h = make_header(c_cmd=cmd, c_dcid=dcid, c_src=clt_ep, c_dst=EXT_EP, c_snode=CLT,
                    c_dnode=LB, c_pid=PID)
    h.c_msg.m_source, h.c_msg.m_type = clt_ep, 0x0A
    return bytes(h.buf)


def copy_frame(size: int = C.MAXCOPYBUF, clt_ep: int = CLT_EP) -> bytes:
    h = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=clt_ep, c_dst=EXT_EP,
                    c_snode=CLT, c_dnode=LB, c_pid=PID, c_len=size, v_bytes=size,
                    v_src=clt_ep, v_dst=EXT_EP, v_rqtr=clt_ep)
    return bytes(h.buf) + os.urandom(size)


def reply_to(req: bytes, snode: int = SRV) -> bytes:
    """The server's answer (SEND_MSG back to the requester) to a received request header."""
    cmd, dcid, src, dst, rsnode = struct.unpack_from("<5i", req, 0)
    h = make_header(c_cmd=C.CMD_SEND_MSG, c_dcid=dcid, c_src=dst, c_dst=src, c_snode=snode,
                    c_dnode=rsnode, c_pid=PID + 1)
    h.c_msg.m_source, h.c_msg.m_type = dst, 0x0B
    return bytes(h.buf)


def recv_exact(s: socket.socket, n: int, buf: bytearray | None = None) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


def recv_frame(s: socket.socket) -> bytes:
    """The next frame that is not a HELLO (header only; payloads are skipped)."""
    while True:
        hdr = recv_exact(s, H)
        (length,) = struct.unpack_from("<i", hdr, 28)
        if length:
            recv_exact(s, length)
        if struct.unpack_from("<i", hdr, 0)[0] != C.CMD_NONE:
            return hdr


class Hop:
    """Client side (c_tx, c_rx) and server side (s_rx, s_tx) sockets of one hop."""

    name = "?"
    c_tx: socket.socket
    c_rx: socket.socket
    s_rx: socket.socket
    s_tx: socket.socket
    reply: bytes = b""

    def quiet(self):
        """Context: keep-alive traffic paused while a measurement runs."""
        return _NullCtx()

    def close(self) -> None:
        pass


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TcpHop(Hop):
    """Client -> TCP forwarder at (host, port) -> server listening at (shost, sport)."""

    def __init__(self, name: str, host: str, port: int, listener: socket.socket) -> None:
        self.name = name
        c = nodelay(socket.create_connection((host, port), timeout=5))
        c.settimeout(None)
        c.sendall(request())
        listener.settimeout(5)
        for _ in range(10):  # skip connections the forwarder made for readiness probes
            s, _ = listener.accept()
            try:
                req = recv_frame(s)
                break
            except ConnectionError:
                s.close()
        nodelay(s)
        s.settimeout(None)
        self.c_tx = self.c_rx = c
        self.s_rx = self.s_tx = s
        # the server answers what it receives: fix the reply once from a first request
        self.reply = reply_to(req)
        s.sendall(self.reply)
        recv_frame(c)

    def close(self) -> None:
        for s in (self.c_tx, self.s_tx):
            s.close()


class DspHop(Hop):
    """The wire peers around a running DSP of node `lbhost` (see the module doc)."""

    def __init__(self, net: str, start_dsp, timeout: float = 20.0) -> None:
        self.name = "DSP"
        self.net = net
        addr = {n: f"{net}.{n}" for n in (SRV, CLT, HOST)}
        # listeners for the DSP's SPROXY connections (its sport for each peer)
        s_listen = _listen(addr[SRV], 3000 + HOST)
        c_listen = _listen(addr[CLT], 3000 + LB)
        self.proc = start_dsp()
        self.s_tx = _connect(addr[SRV], addr[HOST], 3000 + SRV, timeout)
        self.c_tx = _connect(addr[CLT], addr[HOST], 3000 + CLT, timeout)
        self.s_rx = _accept(s_listen, timeout)
        self.c_rx = _accept(c_listen, timeout)
        s_listen.close()
        c_listen.close()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.s_tx.sendall(hello(SRV, HOST, report=True))
        self.c_tx.sendall(hello(CLT, HOST))
        self.keeper = threading.Thread(target=self._keep_alive, daemon=True)
        self.keeper.start()
        # the first request makes the session and waits for the server's load report
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                self.c_tx.sendall(request())
                self.s_rx.settimeout(0.5)
                try:
                    req = recv_frame(self.s_rx)
                    break
                except TimeoutError:
                    pass
                finally:
                    self.s_rx.settimeout(None)
            self.s_tx.sendall(hello(SRV, HOST, report=True))
            if time.monotonic() > deadline:
                raise TimeoutError("the DSP did not forward the first request")
        self.reply = reply_to(req)
        with self.lock:
            self.s_tx.sendall(self.reply)
            recv_frame(self.c_rx)

    def _keep_alive(self) -> None:
        hs, hc = hello(SRV, HOST, report=True), hello(CLT, HOST)
        while not self.stop.wait(HELLO_EVERY):
            with self.lock:
                try:
                    self.s_tx.sendall(hs)
                    self.c_tx.sendall(hc)
                except OSError:
                    return

    def quiet(self):
        return self.lock

    def close(self) -> None:
        self.stop.set()
        for s in (self.c_tx, self.c_rx, self.s_tx, self.s_rx):
            s.close()


def _listen(host: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(4)
    return s


def _connect(src: str, host: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, 0))
        try:
            s.connect((host, port))
            return nodelay(s)
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _accept(listener: socket.socket, timeout: float) -> socket.socket:
    listener.settimeout(timeout)
    s, _ = listener.accept()
    s.settimeout(None)
    return nodelay(s)


# ------------------------------------------------------------------------------ load loops
def pingpong(hop: Hop, rounds: int, secs: float) -> list[float]:
    """Round trips of one 120-byte request and reply; returns the times in microseconds."""
    req, rep = request(), hop.reply
    last = bytearray(req)
    struct.pack_into("<i", last, 60 + 4, 0xFF)   # m_type 0xFF: the echo thread stops
    s_rx, s_tx, c_tx, c_rx = hop.s_rx, hop.s_tx, hop.c_tx, hop.c_rx

    def echo():
        while True:
            try:
                got = recv_frame(s_rx)
                if struct.unpack_from("<i", got, 64)[0] == 0xFF:
                    return
                s_tx.sendall(rep)
            except OSError:
                return
    out: list[float] = []
    with hop.quiet():
        t = threading.Thread(target=echo, daemon=True)
        t.start()
        clock = time.perf_counter
        end = clock() + secs
        for _ in range(rounds):
            t0 = clock()
            c_tx.sendall(req)
            recv_frame(c_rx)
            t1 = clock()
            out.append((t1 - t0) * 1e6)
            if t1 > end:
                break
        c_tx.sendall(bytes(last))
        t.join(10)
    return out


def stream(hop: Hop, blob: bytes, secs: float, unit: int) -> tuple[float, float]:
    """Send `blob` repeatedly one way for `secs`; returns (units/s, bytes/s) measured from the
    first send to the last byte received."""
    s_rx, c_tx = hop.s_rx, hop.c_tx
    got = [0]
    total = [None]
    done = threading.Event()
    t_end = [0.0]

    def sink():
        # a short timeout: the sink may have read everything before the sender set `total`
        buf = bytearray(1 << 20)
        n = 0
        while True:
            try:
                k = s_rx.recv_into(buf)
            except TimeoutError:
                if total[0] is not None and n >= total[0]:
                    break
                continue
            if not k:
                break
            n += k
            got[0] = n
            t_end[0] = time.perf_counter()      # the last byte received
            if total[0] is not None and n >= total[0]:
                break
        done.set()
    old_timeout = s_rx.gettimeout()
    s_rx.settimeout(0.1)
    with hop.quiet():
        t = threading.Thread(target=sink, daemon=True)
        t.start()
        sent = 0
        t0 = time.perf_counter()
        end = t0 + secs
        while time.perf_counter() < end:
            c_tx.sendall(blob)
            sent += len(blob)
        total[0] = sent
        if not done.wait(15):
            raise TimeoutError(f"{hop.name}: only {got[0]} of {sent} bytes arrived")
        t.join(1)
    s_rx.settimeout(old_timeout)
    elapsed = t_end[0] - t0
    return sent / unit / elapsed, sent / elapsed
