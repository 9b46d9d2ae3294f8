"""Faults through the virtual LB with real processes: a dead service program, a frozen server
whose socket is full, and many clients at once.  A dead, frozen or restarted server may cost a
client at most one error reply."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time

from cluster_helpers import cluster_from, wait_for
from dsp_proxy import topology
from dsp_proxy.cluster import module_argv
from dsp_proxy.misc import resolve
from dvk_cffi import consts as C
from dvk_cffi.wire import HEADER_SIZE, hello_header, make_header
from fuzz.chaos import CONFIG, LB_HOST, SERVERS, Chaos, soak
from fuzz.loadclient import read_records

#: COPY data frames (64 KiB) the flooding client sends: enough to fill the LB host's socket
#: to a frozen server (about 4 MiB queued there, the rest in the frozen node's receive buffer).
FLOOD_FRAMES = 160
#: Requests per client of the 8-client test (`make chaos` runs 10,000 with --soak).
SOAK_REQUESTS = int(os.environ.get("DSP_SOAK_REQUESTS", "1000"))


def commands(cl, server: int) -> int:
    group = (cl.status(LB_HOST) or {}).get("group") or {}
    return group.get("servers", {}).get(str(server), {}).get("commands", 0)


def ready(chaos: Chaos) -> None:
    for n in SERVERS:
        chaos.start_server(n)
    for n in SERVERS:
        wait_for(lambda n=n: chaos.server_bound(n), 15, f"server {n} bound")
    wait_for(lambda: all(chaos.server_live(n) for n in SERVERS), 20, "servers live")


def test_dead_service_program_new_sessions_use_the_other_server(tmp_path):
    """The program on server 1 is killed: every new session succeeds (through server 2); once
    the program is bound again, new sessions reach server 1 again."""
    with cluster_from(CONFIG, tmp_path) as cl:
        chaos = Chaos(cl, tmp_path)
        try:
            ready(chaos)
            chaos.servers[1].kill()
            chaos.servers[1].wait()
            ok, tried = chaos.new_sessions(10)
            assert ok == tried, f"new sessions with server 1's program dead: {ok}/{tried}"
            chaos.start_server(1)
            wait_for(lambda: chaos.server_bound(1), 15, "server 1 bound again")
            before = commands(cl, 1)
            deadline = time.monotonic() + 20
            results = []
            while commands(cl, 1) == before and time.monotonic() < deadline:
                results.append(chaos.new_sessions(4))
                time.sleep(0.5)
            assert all(ok == tried for ok, tried in results), results
            assert commands(cl, 1) > before, "no new session reached server 1 again"
        finally:
            chaos.close()


# ------------------------------------------------------------------------ frozen server
class FakeRelayedClient:
    """Poses as relayed client node 3 towards the LB host (node 3's DSP is not started): one
    connection each way from node 3's address, HELLOs, requests in sessions, ACKs for the
    replies."""

    def __init__(self, cl) -> None:
        self.cl = cl
        spec = next(s for s in topology.peer_specs(cl.cfg, LB_HOST) if s.nodeid == 3)
        me, host = resolve(spec.host), resolve(cl.cfg.nodes_by_id[LB_HOST].rname)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((me, spec.sport))
        self.listener.listen(4)
        self.listener.settimeout(15)
        self.back, _ = self.listener.accept()
        self.back.settimeout(0.2)
        self.out = socket.socket()
        self.out.bind((me, 0))
        self.out.connect((host, spec.rport))
        self.out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.replies: dict[tuple[int, int], float] = {}
        self.error_acks = 0
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._hello, daemon=True)]
        for t in self.threads:
            t.start()

    def _hello(self) -> None:
        h = bytes(hello_header(3, 0, 4243).buf)
        while not self.stop.wait(0.2):
            try:
                with self.lock:
                    self.out.sendall(h)
            except OSError:
                return

    def _read(self) -> None:
        buf = bytearray()
        while not self.stop.is_set():
            try:
                chunk = self.back.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= HEADER_SIZE:
                cmd, _dcid, src, dst, _sn, _dn, rcode, length = struct.unpack_from("<8i", buf)
                if len(buf) < HEADER_SIZE + max(0, length):
                    break
                m1_i1 = struct.unpack_from("<i", buf, 68)[0]
                del buf[:HEADER_SIZE + max(0, length)]
                if cmd == C.CMD_SEND_MSG:
                    with self.cond:
                        self.replies[(dst, m1_i1)] = time.monotonic()
                        self.cond.notify_all()
                    self.send(self.frame(C.CMD_SEND_ACK, dst, src))
                elif cmd & C.MASK_ACKNOWLEDGE and rcode < 0:
                    self.error_acks += 1

    @staticmethod
    def frame(cmd: int, clt_ep: int, dst: int = 10, seq: int = 0) -> bytes:
        h = make_header(c_cmd=cmd, c_dcid=0, c_src=clt_ep, c_dst=dst, c_snode=3, c_dnode=0,
                        c_pid=4243)
        h.c_msg.m_source, h.c_msg.m_type, h.c_msg.m1_i1 = clt_ep, 0x0A, seq
        return bytes(h.buf)

    @staticmethod
    def data_frame(clt_ep: int, n: int) -> bytes:
        h = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=clt_ep, c_dst=10, c_snode=3,
                        c_dnode=0, c_pid=4243, c_len=n, v_src=clt_ep, v_dst=10, v_rqtr=clt_ep,
                        v_bytes=n)
        return bytes(h.buf) + os.urandom(n)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.out.sendall(data)

    def call(self, clt_ep: int, seq: int, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        self.send(self.frame(C.CMD_SNDREC_MSG, clt_ep, seq=seq))
        with self.cond:
            assert self.cond.wait_for(lambda: (clt_ep, seq) in self.replies, timeout), \
                f"no reply to {clt_ep}@3 request {seq}"
        return self.replies[(clt_ep, seq)] - t0

    def close(self) -> None:
        self.stop.set()
        for s in (self.out, self.back, self.listener):
            s.close()
        for t in self.threads:
            t.join(2)


def send_queue(src: str, dst: str) -> int | None:
    """Bytes queued on the TCP connections from src to dst (ss), None without ss."""
    try:
        out = subprocess.run(["ss", "-tnH", "src", src, "dst", dst], capture_output=True,
                             text=True, timeout=10).stdout
    except OSError:
        return None
    return sum(int(line.split()[2]) for line in out.splitlines() if line.split()[2:3])


def session_server(cl, client: str) -> int | None:
    for s in ((cl.status(LB_HOST) or {}).get("group") or {}).get("sessions", []):
        if s["client"] == client:
            return int(s["server"].split("@")[1])
    return None


def test_frozen_server_with_a_full_socket_does_not_stall_the_other(tmp_path):
    """A relayed client floods its session on server A with COPY data while A's whole node is
    frozen, so the LB host's socket to A fills; a client of node 4 served by server B keeps its
    normal latency meanwhile, and so does the flooding client's own session on B (a frozen peer
    delays only its own traffic: no thread blocks on another peer's socket)."""
    # failure detection after 5 s: a thread blocked on A's socket stays blocked that long
    slow_fd = CONFIG.replace("fd_interval 500; fd_fall 3;", "fd_interval 1000; fd_fall 5;")
    assert slow_fd != CONFIG
    with cluster_from(slow_fd, tmp_path, only=[1, 2, 4, 5]) as cl:
        chaos = Chaos(cl, tmp_path)
        fake = None
        try:
            ready(chaos)
            rec = tmp_path / "steady.rec"
            steady = chaos._popen(4, module_argv("fuzz.loadclient", "--out", rec, "--threads", 1,
                                                 "--ep-base", 50, "--pause", 0.01, "--seconds",
                                                 120, "--until", chaos.until), "steady")
            chaos.other.append(steady)
            srv_b = wait_for(lambda: session_server(cl, "50@4"), 15, "node 4's session")
            fake = FakeRelayedClient(cl)
            both = C.NODE_SCONNECTED | C.NODE_RCONNECTED
            wait_for(lambda: cl.dvk(LB_HOST).getnodeinfo(3).n_flags & both == both, 10,
                     "the fake client's link up at the LB host")
            # sessions of the fake client: one on A (not node 4's server), one on B
            by_server: dict[int, int] = {}
            for ep in range(60, 70):
                fake.call(ep, 1)
                srv = wait_for(lambda ep=ep: session_server(cl, f"{ep}@3"), 5,
                               f"the session of {ep}@3 in the LB host's figures")
                by_server.setdefault(srv, ep)
                if len(by_server) == 2:
                    break
            assert len(by_server) == 2, f"the fake client's sessions: {by_server}"
            srv_a = next(n for n in by_server if n != srv_b)
            ep, ep_b = by_server[srv_a], by_server[srv_b]
            time.sleep(3)
            t_freeze = time.monotonic()
            victims = [chaos.servers[srv_a], cl.dsps[srv_a], cl.kernels[srv_a]]
            for p in victims:
                p.send_signal(signal.SIGSTOP)
            try:
                # COPY data in A's session: 64 KiB a frame, so the socket to A fills soon;
                # what is left once A's session ended is dropped (data opens no session)
                # whole frames only (blocking sends), from a thread of their own: while the LB
                # host does not read this link, the flooder's other requests wait behind them
                flood = fake.data_frame(ep, C.MAXCOPYBUF)
                sent = [0]

                def flooder():
                    t_end = time.monotonic() + 2.0
                    while time.monotonic() < t_end and sent[0] < FLOOD_FRAMES:
                        try:
                            fake.send(flood)
                        except OSError:
                            return
                        sent[0] += 1
                flood_thread = threading.Thread(target=flooder, daemon=True)
                flood_thread.start()
                time.sleep(2.5)
                queued = send_queue(resolve(cl.cfg.nodes_by_id[LB_HOST].rname),
                                    resolve(cl.cfg.nodes_by_id[srv_a].rname))
                # the flooder's own session on B: its requests must not wait behind A's socket
                own_b = []
                for i in range(5):
                    try:
                        own_b.append(fake.call(ep_b, 100 + i, timeout=10))
                    except (TimeoutError, AssertionError):
                        own_b.append(float("inf"))
                    time.sleep(0.1)
                time.sleep(max(0.0, t_freeze + 5 - time.monotonic()))
                flood_thread.join(10)
            finally:
                for p in reversed(victims):
                    p.send_signal(signal.SIGCONT)
            t_thaw = time.monotonic()
            time.sleep(1)
            chaos.until.touch()
            steady.wait(30)
            recs = read_records(str(rec))
            before = sorted(t1 - t0 for _w, _s, t0, t1, r in recs
                            if r == "ok" and t1 < t_freeze)
            during = [(t1 - t0, r) for _w, _s, t0, t1, r in recs
                      if t1 >= t_freeze and t0 <= t_thaw]
            assert len(before) > 20 and during, (len(before), len(during))
            p99 = before[int(len(before) * 0.99)]
            bound = max(0.75, 5 * p99)
            worst = max(d for d, _ in during)
            print(f"flood {sent[0]} x 64 KiB to server {srv_a}; node 4 client on server {srv_b}: "
                  f"p99 before {p99 * 1000:.1f} ms, worst while frozen {worst * 1000:.1f} ms "
                  f"({len(during)} requests), error ACKs to the flooder {fake.error_acks}, "
                  f"LB host -> A send queue {queued} bytes; the flooder's own requests to B: "
                  f"{', '.join(f'{x * 1000:.0f}' for x in own_b)} ms")
            # the fault was delivered: the LB host's socket to A filled (else nothing below
            # would show that a full socket stalls no one)
            assert queued is not None and queued >= 1 << 20, \
                f"LB host -> A send queue {queued} bytes: the flood did not fill it"
            assert all(r == "ok" for _, r in during), [r for _, r in during if r != "ok"][:5]
            assert worst < bound, f"worst {worst:.3f} s while A was frozen (bound {bound:.3f})"
            assert max(own_b) < bound, \
                f"the flooding client's session on B waited {max(own_b):.3f} s (bound {bound:.3f})"
        finally:
            if fake is not None:
                fake.close()
            chaos.close()


# ------------------------------------------------------------------------ many clients
def test_eight_clients_through_the_lb_lose_nothing(tmp_path):
    """8 clients x DSP_SOAK_REQUESTS sendrec (1,000 here; `make chaos` runs 10,000): every
    request gets its own reply."""
    with cluster_from(CONFIG, tmp_path) as cl:
        chaos = Chaos(cl, tmp_path)
        try:
            ready(chaos)
            fig = soak(cl, tmp_path, SOAK_REQUESTS)
        finally:
            chaos.close()
        assert fig["lost"] == 0 and fig["misrouted"] == 0, fig
        assert fig["ok"] == fig["expected"], fig


def test_the_put2lcl_queue_is_bounded_in_bytes_for_a_peer_that_floods_copy_data():
    """A peer flooding a local client's session with 64 KiB COPY frames fills the put2lcl
    queue; it holds at most PUT2LCL_QUEUE_BYTES (a 64 KiB frame over), not PUT2LCL_QUEUE_MAX
    frames of 64 KiB (half a gigabyte, measured as a DSP's RSS going from 32 to 552 MB); the
    frames beyond are dropped as for a full queue, and draining makes room again."""
    from dsp_proxy import rproxy
    p = rproxy.Put2lclThread(ctx=None, gate=None)
    h = make_header(c_cmd=C.CMD_COPYIN_DATA, c_len=C.MAXCOPYBUF)
    data = bytes(C.MAXCOPYBUF)          # one object: the test itself holds no copies
    queued = 0
    for _ in range(rproxy.PUT2LCL_QUEUE_MAX):
        if not p.put(h, data):
            break
        queued += 1
    held = queued * (HEADER_SIZE + C.MAXCOPYBUF)
    print(f"{queued} frames of 64 KiB queued ({held >> 20} MiB) before the queue refused")
    assert p.refused == 1 and held <= rproxy.PUT2LCL_QUEUE_BYTES + HEADER_SIZE + C.MAXCOPYBUF
    p.queue.get()
    assert p.put(h, data) and not p._full


class _BusyKernel:
    """The deliverer's view of a DVK whose remote descriptor of the sender stays busy: every
    put2lcl is EDVSENQUEUED; the error ACKs the deliverer sends are kept."""

    def __init__(self) -> None:
        self.dvk = self
        self.acks: list = []

    def alloc(self, size: int):
        from types import SimpleNamespace
        return SimpleNamespace(view=memoryview(bytearray(size)))

    def put2lcl(self, h, payload) -> int:
        from dvk_cffi import errors as E
        return E.EDVSENQUEUED

    def count_error(self, code: int) -> None:
        pass

    def execute(self, act, deliverer=None) -> None:
        self.acks.append(act)


def test_deliveries_parked_behind_a_busy_descriptor_are_bounded_in_bytes():
    """A peer that keeps one remote descriptor busy and sends 64 KiB COPY frames behind it:
    a receiver parks at most MAX_PARKED_BYTES of them (MAX_PARKED frames of 64 KiB were
    64 MiB per link); the frames beyond fail at once with EDVSAGAIN, as beyond MAX_PARKED."""
    from dsp_proxy import rproxy
    from dvk_cffi import errors as E
    from dvk_cffi.wire import Header
    kernel = _BusyKernel()
    d = rproxy.Deliverer(kernel, peer=2)
    h = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=60, c_dst=61, c_snode=2,
                    c_dnode=1)
    assert d.deliver(h, b"", False) == E.EDVSENQUEUED
    data = bytes(C.MAXCOPYBUF)
    copy = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=60, c_dst=61, c_snode=2,
                       c_dnode=1, c_len=C.MAXCOPYBUF, v_bytes=C.MAXCOPYBUF)
    results = [d.deliver(Header(bytearray(copy.buf)), data, False)
               for _ in range(rproxy.MAX_PARKED_BYTES // C.MAXCOPYBUF + 8)]
    held = sum(len(p) for q in d.parked.values() for _, _, p in q)
    print(f"{d.nparked} deliveries parked holding {held >> 20} MiB; "
          f"{results.count(E.EDVSAGAIN)} refused")
    assert held <= rproxy.MAX_PARKED_BYTES
    assert results.count(E.EDVSAGAIN) >= 8 and results[-1] == E.EDVSAGAIN


def test_a_full_put2lcl_queue_holds_the_receiver_back_and_drops_only_after_the_bound(
        monkeypatch):
    """Frames for local processes are not dropped while the put2lcl thread drains its queue:
    the thread that queues waits for room (so the link behind it slows down); only a queue that
    stays full for PUT2LCL_WAIT drops the frame, counted, and then drops without waiting until
    a frame fits again."""
    from dsp_proxy import rproxy
    monkeypatch.setattr(rproxy, "PUT2LCL_QUEUE_MAX", 4)
    p = rproxy.Put2lclThread(ctx=None, gate=None)
    h = make_header(c_cmd=C.CMD_SEND_MSG)
    for _ in range(4):
        assert p.put(h)
    drained = []

    def drain_slowly():
        for _ in range(6):
            time.sleep(0.05)
            drained.append(p.queue.get())

    t = threading.Thread(target=drain_slowly)
    t.start()
    try:
        assert all(p.put(h) for _ in range(2))     # each waited for a slot, none dropped
        assert p.refused == 0
    finally:
        t.join(5)
    assert len(drained) == 6 and p.queue.qsize() == 0
    for _ in range(4):
        assert p.put(h)
    t0 = time.monotonic()
    assert not p.put(h)                            # nobody drains: dropped after the bound
    waited = time.monotonic() - t0
    assert rproxy.PUT2LCL_WAIT * 0.9 <= waited < rproxy.PUT2LCL_WAIT + 5
    assert p.refused == 1
    t0 = time.monotonic()
    assert not p.put(h)                            # still full: dropped without a second wait
    assert time.monotonic() - t0 < rproxy.PUT2LCL_WAIT * 0.5
    assert p.refused == 2
    p.queue.get()
    assert p.put(h)                                # room again: queued, the episode is over
    assert not p._full
