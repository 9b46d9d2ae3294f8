"""Regression tests of the hostile-input findings (frames and connections), each against the real
daemon: a frame or a connection may cost at most that frame or that one link, never a thread,
a binding this node owns, or the daemon."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import lz4.frame
import pytest

from cluster_helpers import cluster_from, wait_bound, wait_for
from dsp_proxy import main as dsp_main
from dsp_proxy import topology
from dsp_proxy.cluster import module_argv
from dsp_proxy.misc import resolve
from dvk_cffi import Message
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.errors import DvkError
from dvk_cffi.wire import HEADER_SIZE, Header, hello_header, make_header, pack_batch
from fuzz.harness import Probes

CONFIG = """
lb node0 { nodeid 0; period 1; fd_interval 250; fd_fall 4; fd_rise 1; };
server node1 { nodeid 1; rname {net}.1; };
server node2 { nodeid 2; rname {net}.2; };
client node3 { nodeid 3; rname {net}.3; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""
LB, EXT_EP = 0, 10
#: fd_interval x fd_fall of CONFIG, and the slack the tests allow on top of it.
SILENCE = 1.0
SLACK = 5.0


def addr(cl, n: int) -> str:
    return resolve(cl.cfg.nodes_by_id[n].rname)


def spec_of(cl, target: int, peer: int):
    """Node `target`'s link spec for `peer` (where it listens for it, where it connects)."""
    return next(s for s in topology.peer_specs(cl.cfg, target) if s.nodeid == peer)


def log_of(cl, n: int) -> str:
    with open(cl.log_path(f"dsp{n}"), errors="replace") as f:
        return f.read()


class FakePeer:
    """Poses as node `peer` towards node `target` from the peer's own address, in both
    directions (the real peer's DSP must be down): accepts the target's SPROXY connection,
    opens the one the target's RPROXY reads, and keeps the link alive with HELLOs."""

    def __init__(self, cl, target: int, peer: int) -> None:
        self.cl, self.target, self.peer = cl, target, peer
        spec = spec_of(cl, target, peer)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((addr(cl, peer), spec.sport))
        self.listener.listen(4)
        self.listener.settimeout(15)
        self.back, _ = self.listener.accept()
        self.back.setblocking(False)
        self.out = socket.socket()
        self.out.bind((addr(cl, peer), 0))
        self.out.connect((addr(cl, target), spec.rport))
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._keepalive, daemon=True)
        self.thread.start()

    def _keepalive(self) -> None:
        hello = bytes(hello_header(self.peer, self.target, 4242).buf)
        while not self.stop.wait(0.1):
            try:
                with self.lock:
                    self.out.sendall(hello)
                while chunk := self.back.recv(1 << 16):
                    self.received(chunk)
            except BlockingIOError:
                continue
            except OSError:
                return

    def received(self, chunk: bytes) -> None:
        """What the target sent (dropped here)."""

    def send(self, data: bytes) -> None:
        with self.lock:
            self.out.sendall(data)

    def link_up(self) -> bool:
        return self.cl.link_state()[(self.target, self.peer)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for s in (self.out, self.back, self.listener):
            s.close()


def request(snode: int, dnode: int, src: int, dst: int, flags: int = 0,
            cmd: int = C.CMD_SNDREC_MSG, length: int = 0) -> bytes:
    h = make_header(c_cmd=cmd, c_dcid=0, c_src=src, c_dst=dst, c_snode=snode, c_dnode=dnode,
                    c_pid=4242, c_flags=flags, c_len=length)
    h.c_msg.m_source, h.c_msg.m_type, h.c_msg.m1_i1 = src, 0x0A, 1
    return bytes(h.buf)


@pytest.fixture
def probes_of():
    made = []

    def make(cl, tmp_path, nodes):
        p = Probes(cl, nodes, tmp_path)
        made.append(p)
        p.start()
        took, last = p.all_links(20)
        assert took is not None, f"links carry no requests before the test: {last}"
        return p
    yield make
    for p in made:
        p.close()


def links_carry(probes: Probes, pairs, timeout: float) -> float:
    """Seconds until every (a, b) in `pairs` carried a request (AssertionError after
    `timeout`)."""
    t0 = time.monotonic()
    pending = list(pairs)
    last = {}
    while pending and time.monotonic() - t0 < timeout:
        probes.restart_stuck_servers()
        probes.fix_bindings()
        for pair in list(pending):
            last[pair] = probes.probe(*pair, timeout_ms=1500)
            if last[pair] == "ok":
                pending.remove(pair)
        if pending:
            time.sleep(0.1)
    assert not pending, f"no request over {pending} within {timeout} s: {last}"
    return time.monotonic() - t0


# --------------------------------------------------------------------------- finding 1
def test_connection_bursts_from_the_peer_address_never_wedge_the_link(tmp_path, probes_of):
    """3-5 connections from the peer's own address within 0.25 s, ten times: after each burst
    the link carries traffic both ways again within a few seconds."""
    with cluster_from(CONFIG, tmp_path) as cl:
        probes = probes_of(cl, tmp_path, [1, 2])
        spec = spec_of(cl, 1, 2)
        times = []
        delivered = []      # connections of each burst that sent their HELLO
        for burst in range(10):
            socks = []
            delivered.append(0)
            for _ in range(3 + burst % 3):
                s = socket.socket()
                s.bind((addr(cl, 2), 0))
                s.settimeout(2)
                try:
                    s.connect((addr(cl, 1), spec.rport))
                    s.sendall(bytes(hello_header(2, 1, 4242).buf))
                    delivered[-1] += 1
                except OSError:
                    pass
                socks.append(s)
                time.sleep(0.25 / 5)
            for s in socks:
                s.close()
            times.append(links_carry(probes, [(1, 2), (2, 1)], 15))
        print(f"connections that sent their HELLO, per burst: {delivered}")
        assert min(delivered) >= 3, f"bursts not delivered: {delivered}"
        print(f"recovery after each burst: {', '.join(f'{t:.2f}' for t in times)} s")
        assert max(times) < 15


@pytest.mark.parametrize("sends", [b"", b"\0" * (HEADER_SIZE // 2)], ids=["nothing", "half"])
def test_silent_connections_from_the_peer_address_do_not_hold_the_link(tmp_path, probes_of,
                                                                      sends):
    """While the peer's DSP is away and for 3 s after it started again, a connection from its
    address every 50 ms that sends nothing (or half a header) and stays open: one of them is
    the link's incoming connection when our sender connects.  The peer's own connection takes
    over once it announced itself, and the link carries traffic both ways within seconds
    while every silent one is still open.  The peer's connection used to be held aside behind
    the silent one for the C peer's silence limit (95 s), every request both ways timing out
    meanwhile."""
    with cluster_from(CONFIG, tmp_path) as cl:
        probes = probes_of(cl, tmp_path, [1, 2])
        spec = spec_of(cl, 1, 2)
        cl.kill_dsp(2, signal.SIGKILL)
        wait_for(lambda: cl.status(1)["links"]["2"]["state"] == "down", 10, "link down")
        socks = []
        try:
            started = None
            while started is None or time.monotonic() - started < 3:
                s = socket.socket()
                socks.append(s)
                s.bind((addr(cl, 2), 0))
                s.settimeout(2)
                s.connect((addr(cl, 1), spec.rport))
                s.sendall(sends)
                if started is None:
                    cl.start_dsp(2)
                    started = time.monotonic()
                time.sleep(0.05)
            took = links_carry(probes, [(1, 2), (2, 1)], 15)
            print(f"links carry {took:.2f} s after {len(socks)} silent connections (taken over "
                  f"from one: {'the new one takes over' in log_of(cl, 1)})")
        finally:
            for s in socks:
                s.close()


def test_a_loop_of_connections_from_the_peer_address_never_takes_the_link_down(tmp_path,
                                                                               probes_of):
    """Thirty connections from the peer's own address, one after another (closed at once,
    left open saying nothing, or left open after half a header): the working link to a DSP
    of this project never goes down and carries requests both ways after each.  Every one
    of them used to end the link, so a loop of five a second stopped it for as long as it
    ran."""
    with cluster_from(CONFIG, tmp_path) as cl:
        probes = probes_of(cl, tmp_path, [1, 2])
        spec = spec_of(cl, 1, 2)
        wait_for(lambda: cl.status(1)["links"]["2"]["announced"], 10, "node 2 announced")
        downs = cl.status(1)["links"]["2"]["downs"], cl.status(2)["links"]["1"]["downs"]
        left_open = []
        try:
            for i in range(30):
                s = socket.socket()
                s.bind((addr(cl, 2), 0))
                s.settimeout(2)
                s.connect((addr(cl, 1), spec.rport))
                if i % 3 == 0:
                    s.close()
                    continue
                if i % 3 == 2:
                    s.sendall(b"\0" * (HEADER_SIZE // 2))
                left_open.append(s)
                for pair in ((1, 2), (2, 1)):
                    assert probes.probe(*pair, timeout_ms=3000) == "ok", (i, pair)
            time.sleep(1)      # a tick: held connections are looked at
            assert (cl.status(1)["links"]["2"]["downs"],
                    cl.status(2)["links"]["1"]["downs"]) == downs
        finally:
            for s in left_open:
                s.close()
        links_carry(probes, [(1, 2), (2, 1)], 10)


class RecordingPeer(FakePeer):
    """A FakePeer that keeps what the target sends it (as headers, HELLOs left out)."""

    def __init__(self, cl, target: int, peer: int) -> None:
        self.got = bytearray()
        super().__init__(cl, target, peer)

    def received(self, chunk: bytes) -> None:
        self.got += chunk

    def frames(self) -> list[Header]:
        """The frames received so far (every one of them is header-only here)."""
        got = bytes(self.got)
        heads = [Header(bytearray(got[i:i + HEADER_SIZE]))
                 for i in range(0, len(got) - len(got) % HEADER_SIZE, HEADER_SIZE)]
        return [h for h in heads if h.c_cmd != C.CMD_NONE]


@contextlib.contextmanager
def recording_peer(cl, target: int = 1, peer: int = 2):
    """Node `peer`'s DSP killed and a RecordingPeer in its place towards node `target`, once
    the other nodes' links are up again and the fake one is up too; closed at the end."""
    cl.kill_dsp(peer, signal.SIGKILL)
    others = [n for n in cl.dsps if n != peer]
    cl.wait_links_up(15, pairs=[(a, b) for a in others for b in others if a != b])
    fake = RecordingPeer(cl, target, peer)
    try:
        wait_for(fake.link_up, 10, "the fake peer's link up")
        yield fake
    finally:
        fake.close()


def test_a_copy_request_batched_without_its_data_is_answered_and_the_link_kept(tmp_path):
    """The C sender batches COPYIN_RQST too and sends a batch as headers only, so the
    request's data never comes: that command is answered with an error ACK (its requester
    does not wait for good), the rest of the batch is delivered, and the link stays up (with
    a C peer a closed link never comes back)."""
    with cluster_from(CONFIG, tmp_path) as cl, recording_peer(cl) as fake:
        lost = make_header(c_cmd=C.CMD_COPYIN_RQST, c_dcid=0, c_src=60, c_dst=61,
                           c_snode=2, c_dnode=1, c_len=4096)
        for head_cmd in (C.CMD_SNDREC_MSG, C.CMD_COPYIN_RQST):    # inside, then at the head
            head = make_header(c_cmd=head_cmd, c_dcid=0, c_src=62, c_dst=63, c_snode=2,
                               c_dnode=1, c_len=HEADER_SIZE, c_batch_nr=1,
                               c_flags=C.FLAG_BATCH)
            fake.send(bytes(head.buf) + pack_batch([lost]))
        acks = lambda: [h for h in fake.frames()          # noqa: E731
                        if h.c_cmd == C.CMD_COPYRMT_ACK and h.c_rcode == E.EDVSINVAL]
        wait_for(lambda: len(acks()) == 3, 10, "three error ACKs of the copy requests")
        assert {(h.c_dst, h.c_dnode) for h in acks()} == {(60, 2), (62, 2)}
        # the batch's message was delivered: its error (nobody is bound to 63) came back
        wait_for(lambda: any(h.c_cmd == C.CMD_SNDREC_ACK and h.c_dst == 62
                             for h in fake.frames()), 10, "the message's answer")
        time.sleep(2 * SILENCE)
        assert fake.link_up()
        assert "in a batch came without its data" in log_of(cl, 1)


# --------------------------------------------------------------------------- finding 2
def test_batch_sub_header_with_payload_closes_only_that_link(tmp_path, probes_of):
    """A batch whose sub-header says c_len != 0: that link closes with a logged reason, the
    other links stay, the link comes back with the real peer, and failure detection of that
    peer still works afterwards."""
    with cluster_from(CONFIG, tmp_path) as cl:
        probes = probes_of(cl, tmp_path, [1, 2, 3])
        cl.kill_dsp(2, signal.SIGKILL)
        cl.wait_links_up(15, pairs=[(1, 3), (3, 1)])
        fake = FakePeer(cl, 1, 2)
        try:
            wait_for(fake.link_up, 10, "the fake peer's link up")
            subs = [request(2, 1, 60, 61), request(2, 1, 60, 61, length=HEADER_SIZE)]
            head = make_header(c_cmd=C.CMD_SNDREC_MSG, c_dcid=0, c_src=60, c_dst=61,
                               c_snode=2, c_dnode=1, c_len=2 * HEADER_SIZE, c_batch_nr=2,
                               c_flags=C.FLAG_BATCH)
            before = log_of(cl, 1)
            fake.send(bytes(head.buf) + pack_batch(subs))
            wait_for(lambda: not fake.link_up(), SILENCE + SLACK, "the link closed")
            new = log_of(cl, 1)[len(before):]
            reasons = [ln for ln in new.splitlines() if "bad frame" in ln
                       and re.search(r"batch|c_len|sub-header", ln)]
            assert reasons, f"no logged reason for the bad batch:\n{new}"
        finally:
            fake.close()
        links_carry(probes, [(1, 3), (3, 1)], 10)
        cl.start_dsp(2)
        links_carry(probes, [(1, 2), (2, 1), (2, 3), (3, 2)], 20)
        # failure detection of node 2 still works on node 1
        cl.dsps[2].send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: not cl.link_state()[(1, 2)], SILENCE + SLACK,
                     "node 1 noticing the frozen node 2")
            print(f"frozen peer noticed after {time.monotonic() - t0:.2f} s")
        finally:
            cl.dsps[2].send_signal(signal.SIGCONT)
        links_carry(probes, [(1, 2), (2, 1)], 20)


# --------------------------------------------------------------------------- finding 3
def test_check_hdr_frame_cannot_steal_the_service_endpoint(tmp_path, probes_of):
    """A CHECK_HDR frame with c_src = the service's ext_ep, to an endpoint nobody bound, must
    leave the client node's ext_ep -> LB binding alone; then 20/20 requests through the LB."""
    with cluster_from(CONFIG, tmp_path) as cl:
        servers = [cl.popen(n, module_argv("dvs_apps.latency", "server", 0, EXT_EP),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for n in (1, 2)]
        try:
            def binding():
                info = cl.dvk(3).getprocinfo(0, EXT_EP)
                return info.p_rts_flags, info.p_nodeid
            flags, node = binding()
            assert flags & C.REMOTE and node == LB, (hex(flags), node)
            cl.kill_dsp(1, signal.SIGKILL)
            fake = FakePeer(cl, 3, 1)
            cl.dvk(3).bind(0, 25)
            try:
                wait_for(fake.link_up, 10, "the fake peer's link up")
                for dst in (27, 28, 200):
                    fake.send(request(1, 3, EXT_EP, dst, flags=C.FLAG_CHECK_HDR))
                # a valid frame after them: once it arrived, they were read
                fake.send(request(1, 3, 40, 25, flags=C.FLAG_CHECK_HDR))
                m = _receive(cl, 3, 25, 3000)
                assert m is not None and m.m_source == 40, f"the valid frame after: {m}"
                flags, node = binding()
                assert flags & C.REMOTE and node == LB, \
                    f"ext_ep {EXT_EP} on node 3 now flags {flags:#x} node {node}"
            finally:
                fake.close()
                cl.dvk(3).unbind(0, 25)
            cl.start_dsp(1)
            cl.wait_links_up(20)
            res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 50, EXT_EP, 20, 0, 0),
                         timeout=60)
            loops = re.findall(r"Time total elapsed in loop", res.stdout)
            assert res.returncode == 0 and len(loops) == 20, res.stdout + res.stderr
        finally:
            for p in servers:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- LZ4 size
def lz4_claiming(raw: bytes, content_size: int) -> bytes:
    """A valid LZ4 frame of `raw` whose descriptor claims `content_size` bytes (with the
    header checksum made to match, so only the claim is false)."""
    packed = lz4.frame.compress(raw, store_size=True)
    for hc in range(256):
        forged = packed[:6] + content_size.to_bytes(8, "little") + bytes([hc]) + packed[15:]
        try:
            lz4.frame.get_frame_info(forged)
            return forged
        except RuntimeError:
            continue
    raise AssertionError("no header checksum fits")


def test_lz4_payloads_claiming_huge_sizes_close_only_the_link(tmp_path, probes_of):
    """COPYIN_DATA frames whose LZ4 payload claims 2**62 bytes (the decompressor would have
    allocated them at once): each closes the link with a logged reason, no thread dies, and
    after more of them than a dying pair is restarted for, the real peer's link carries
    traffic again."""
    with cluster_from(CONFIG, tmp_path) as cl:
        probes = probes_of(cl, tmp_path, [1, 2, 3])
        cl.kill_dsp(2, signal.SIGKILL)
        cl.wait_links_up(15, pairs=[(1, 3), (3, 1)])
        raw = b"a" * 1000
        for claim in [1 << 62] * (dsp_main.MAX_RESTARTS + 1):
            payload = lz4_claiming(raw, claim)
            h = make_header(c_cmd=C.CMD_COPYIN_DATA, c_dcid=0, c_src=60, c_dst=61, c_snode=2,
                            c_dnode=1, c_pid=4242, c_len=len(payload), c_flags=C.FLAG_LZ4,
                            v_bytes=len(raw))
            fake = FakePeer(cl, 1, 2)
            try:
                wait_for(fake.link_up, 15, "the fake peer's link up")
                before = log_of(cl, 1)
                fake.send(bytes(h.buf) + payload)
                wait_for(lambda f=fake: not f.link_up(), SILENCE + SLACK, "the link closed")
                new = log_of(cl, 1)[len(before):]
            finally:
                fake.close()
            assert "died" not in new, f"a thread died of the LZ4 frame:\n{new}"
            assert re.search(r"bad frame.*LZ4", new), f"no logged reason:\n{new}"
        links_carry(probes, [(1, 3), (3, 1)], 10)
        cl.start_dsp(2)
        links_carry(probes, [(1, 2), (2, 1)], 20)


# --------------------------------------------------------------------------- service down
def test_one_request_to_an_unbound_endpoint_of_the_range_takes_no_service_down(tmp_path):
    """A local process binds endpoint 11 of the service's range (ext_ep 10) to the LB node and
    sends one request there: no server binds 11, so it fails (an error code), and clients of
    the service are still served.  That one request used to mark the service down on every
    server it was re-dispatched to, so every client got EDVSAGAIN until the servers' next
    load reports, and one such request per report period kept the service from everybody."""
    with cluster_from(CONFIG, tmp_path) as cl:
        servers = [cl.popen(n, module_argv("dvs_apps.latency", "server", 0, EXT_EP),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for n in (1, 2)]
        dvk = cl.dvk(3)
        try:
            for n in (1, 2):
                wait_bound(cl, n, 0, EXT_EP)
            wait_for(lambda: all(s.get("live") for s in cl.status(3)["group"]["servers"]
                                 .values()), 15, "both servers live")
            dvk.bind(0, 40)
            dvk.rmtbind(0, "other", EXT_EP + 1, LB)
            m = Message()
            m.m_type = 1
            with pytest.raises(DvkError) as err:
                dvk.sendrec(EXT_EP + 1, m, 10000)
            assert err.value.name != "EDVSTIMEDOUT", err.value
            res = cl.run(3, module_argv("dvs_apps.latency", "client", 0, 50, EXT_EP, 5, 0, 0),
                         timeout=60)
            loops = re.findall(r"Time total elapsed in loop", res.stdout)
            assert res.returncode == 0 and len(loops) == 5, res.stdout + res.stderr
        finally:
            for ep in (40, EXT_EP + 1):
                try:
                    dvk.unbind(0, ep)
                except DvkError:
                    pass
            for p in servers:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- ext_ep claimed
def test_check_hdr_frame_cannot_claim_a_servers_free_service_endpoint(tmp_path):
    """While a server's service program is down (crashed, restarting), a peer sends one
    CHECK_HDR frame whose c_src is the service's ext_ep: the free slot must not become a
    REMOTE endpoint of that peer, or the program cannot bind it again when it restarts and
    the service is gone from that server for as long as the binding lasts (remote bindings
    outlive the peer's link)."""
    with cluster_from(CONFIG, tmp_path) as cl:
        cl.kill_dsp(3, signal.SIGKILL)
        fake = FakePeer(cl, 1, 3)
        dvk = cl.dvk(1)
        dvk.bind(0, 25)
        server = None
        try:
            wait_for(fake.link_up, 10, "the fake peer's link up")
            fake.send(request(3, 1, EXT_EP, 25, flags=C.FLAG_CHECK_HDR))
            # the same slot in another generation (translated endpoints carry one)
            fake.send(request(3, 1, C._ENDPOINT(1, EXT_EP), 25, flags=C.FLAG_CHECK_HDR))
            fake.send(request(3, 1, 40, 25, flags=C.FLAG_CHECK_HDR))  # read once this came
            sources = []
            while 40 not in sources and len(sources) < 3:
                m = _receive(cl, 1, 25, 3000)
                assert m is not None, f"the valid frame after never came: {sources}"
                sources.append(m.m_source)
            info = dvk.getprocinfo(0, EXT_EP)
            assert info.p_rts_flags & C.SLOT_FREE, \
                f"ext_ep {EXT_EP} on server 1: flags {info.p_rts_flags:#x} node {info.p_nodeid}"
            server = cl.popen(1, module_argv("dvs_apps.latency", "server", 0, EXT_EP),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_bound(cl, 1, 0, EXT_EP)
        finally:
            fake.close()
            if server is not None:
                server.kill()
                server.wait()
            dvk.unbind(0, 25)


# --------------------------------------------------------------------------- finding 5
def _receive(cl, node: int, ep: int, timeout_ms: int):
    """Bind `ep` on `node` in this process and receive once: the message or None."""
    dvk = cl.dvk(node)
    m = Message()
    try:
        dvk.receive(C.ANY, m, timeout_ms)
        return m
    except DvkError as err:
        assert err.name == "EDVSTIMEDOUT", err
        return None


@pytest.mark.parametrize("autobind", ["NO", "YES"])
def test_out_of_range_endpoints_and_foreign_lb_node_are_refused(tmp_path, autobind):
    """c_src outside the DC's endpoint range is never delivered; c_snode = the LB node from a
    peer that does not relay for it is refused (and binds nothing).  A valid frame before and
    after shows the fake peer's frames are read."""
    cfg = CONFIG.replace("server node2 { nodeid 2; rname {net}.2; }",
                         f"server node2 {{ nodeid 2; rname {{net}}.2; autobind {autobind}; }}")
    with cluster_from(cfg, tmp_path) as cl:
        dvk = cl.dvk(2)
        dvk.bind(0, 25)
        fake = None
        try:
            cl.kill_dsp(1, signal.SIGKILL)
            fake = FakePeer(cl, 2, 1)
            wait_for(fake.link_up, 10, "the fake peer's link up")

            def control(src: int) -> None:
                fake.send(request(1, 2, src, 25, flags=C.FLAG_CHECK_HDR))
                m = _receive(cl, 2, 25, 3000)
                assert m is not None and m.m_source == src, f"a valid frame from {src}@1: {m}"
            control(40)
            delivered = []
            for src in (C.NR_PROCS, C.NR_PROCS + 1, 5000, -C.NR_TASKS - 1, 2**31 - 1):
                for flags in (0, C.FLAG_CHECK_HDR):
                    fake.send(request(1, 2, src, 25, flags=flags))
                    m = _receive(cl, 2, 25, 700)
                    if m is not None:
                        delivered.append((src, flags, m.m_source))
                    if not fake.link_up():  # refusing by closing the link is allowed too
                        fake.close()
                        fake = FakePeer(cl, 2, 1)
                        wait_for(fake.link_up, 10, "the fake peer's link up again")
            # the LB node as source, from node 1 (no relay in this config)
            lb_delivered = []
            for flags in (0, C.FLAG_CHECK_HDR):
                fake.send(request(LB, 2, 26, 25, flags=flags))
                m = _receive(cl, 2, 25, 700)
                if m is not None:
                    lb_delivered.append((flags, m.m_source))
                if not fake.link_up():
                    fake.close()
                    fake = FakePeer(cl, 2, 1)
                    wait_for(fake.link_up, 10, "the fake peer's link up again")
            control(41)
            info = dvk.getprocinfo(0, 26)
            assert not delivered, f"out-of-range c_src delivered: {delivered}"
            assert not lb_delivered, f"c_snode = LB node from node 1 delivered: {lb_delivered}"
            assert info.p_rts_flags & C.SLOT_FREE or info.p_nodeid != LB, \
                f"endpoint 26 bound to the LB node on node 2: {info.p_rts_flags:#x}"
        finally:
            if fake is not None:
                fake.close()
            try:
                dvk.unbind(0, 25)
            except DvkError:
                pass


# --------------------------------------------------------------------------- finding 9
STRANGERS = 3000


def _stranger_burst(target: tuple[str, int], sources: list[str], total: int,
                    stop: threading.Event, counts: dict) -> None:
    lock = threading.Lock()

    def one(src: str, n: int) -> None:
        for _ in range(n):
            if stop.is_set():
                return
            s = socket.socket()
            s.settimeout(3)
            try:
                s.bind((src, 0))
                s.connect(target)
                key = "connected"
            except OSError:
                key = "failed"
            finally:
                s.close()
            with lock:
                counts[key] = counts.get(key, 0) + 1
    per = total // 8
    threads = [threading.Thread(target=one, args=(sources[i % len(sources)], per), daemon=True)
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_stranger_burst_is_rate_logged_and_the_peer_still_connects(tmp_path):
    """3,000 connections from strangers: at most one log line a minute per source address,
    and the real peer's link comes up during the burst within a bound."""
    with cluster_from(CONFIG, tmp_path) as cl:
        net = cl.net
        sources = [f"{net}.77", f"{net}.78"]
        spec = spec_of(cl, 1, 2)
        counts: dict = {}
        stop = threading.Event()
        burst = threading.Thread(target=_stranger_burst,
                                 args=((addr(cl, 1), spec.rport), sources, STRANGERS, stop,
                                       counts), daemon=True)
        t0 = time.monotonic()
        burst.start()
        try:
            time.sleep(0.5)
            cl.kill_dsp(2, signal.SIGKILL)
            cl.start_dsp(2)
            t_restart = time.monotonic()
            cl.wait_links_up(30, pairs=[(1, 2), (2, 1)])
            came_up = time.monotonic() - t_restart
        finally:
            burst.join(150)
            stop.set()
        took = time.monotonic() - t0
        text = log_of(cl, 1)
        per_source = {s: [ln for ln in text.splitlines() if "refused" in ln and s in ln]
                      for s in sources}
        print(f"burst: {counts} in {took:.1f} s; peer link up {came_up:.2f} s after its "
              f"restart; refusal lines per source: "
              f"{ {s: len(v) for s, v in per_source.items()} }")
        for s, lines in per_source.items():
            assert 1 <= len(lines) <= 2, f"{len(lines)} log lines for {s}: {lines[:3]}"
        assert came_up < 30


def test_listen_backlog_is_at_least_128(tmp_path):
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read the listen backlog")
    with cluster_from(CONFIG, tmp_path) as cl:
        spec = spec_of(cl, 1, 2)
        out = subprocess.run(["ss", "-ltnH", f"src {addr(cl, 1)}:{spec.rport}"],
                             capture_output=True, text=True, timeout=10).stdout
        fields = out.split()
        assert fields and fields[0] == "LISTEN", out
        assert int(fields[2]) >= 128, f"backlog {fields[2]}: {out}"
