"""Frame fuzzer: hostile frames from a configured peer's own address against a running cluster.

    python -m fuzz.frame_fuzz [--frames N] [--seconds S] [--seed X] [--workdir DIR]

A 3-node cluster (two servers and a client of a virtual LB node, every node with `autobind`
and `batch`) runs as real processes on this run's own loopback addresses.  For every ordered
pair (target T, peer P) a worker impersonates P's SPROXY: it binds its socket to P's address
and connects to T's RPROXY port for P, then sends a handful of frames and closes.  A link
whose connection works holds any newcomer aside (docs/design.md, "Links"), so the fuzzing runs
in one phase per peer P: P's DSP is stopped, a fake P accepts every target's connection to P
(and drops what comes), the workers for P's links connect over and over, and P's DSP is
started again before the next phase.

Frames are valid frames of every kind (HELLOs, load reports, messages, ACKs, COPY data with and
without LZ4, batches) mutated at random: bit flips, header fields set to boundary values
(c_cmd, c_len, c_batch_nr, c_flags with BATCH/LZ4/CHECK_HDR, endpoints, nodes and DCs just
inside and outside their ranges, c_snode = the LB node), batch sub-headers with c_len != 0 or
their own flags, c_len that disagrees with the payload, LZ4 payloads that do not decompress,
plus random bytes and frames cut short by the end of the connection.

Afterwards the run checks what a hostile frame may never cost: every DSP and node kernel is
alive, every link (the fuzzed ones included, once the real peers reconnected) carries a request
within a bound, the client node's service binding (ext_ep -> LB node) is intact, and each
DSP's RSS and thread count stay within bounds.  It prints its figures; exit status 0 when every
check held.
"""

from __future__ import annotations

import argparse
import random
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lz4.frame

from dsp_proxy import topology
from dsp_proxy.cluster import Cluster
from dsp_proxy.config import ConfigError
from dsp_proxy.misc import resolve
from dvk_cffi import consts as C
from dvk_cffi.errors import DvkError
from dvk_cffi.wire import HEADER_FIELDS, HEADER_SIZE, make_header, pack_batch

from .harness import (
    CHECK_CLIENT_BASE,
    CHECK_SERVER_BASE,
    PROBE_CLIENT_BASE,
    PROBE_SERVER_BASE,
    Probes,
    dsp_figures,
    local_cluster,
)

CONFIG = """
lb node0 { nodeid 0; period 2; fd_interval 250; fd_fall 4; fd_rise 1; };
server node1 { nodeid 1; rname {net}.1; autobind YES; batch YES; compress YES; };
server node2 { nodeid 2; rname {net}.2; autobind YES; batch YES; };
client node3 { nodeid 3; rname {net}.3; autobind YES; batch YES; };
service latency { dcid 0; ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""
LB_NODE, CLIENT_NODE, EXT_EP = 0, 3, 10
#: Endpoints nothing binds on any node: below the probe servers of nodes 1..3, between them
#: and the check servers, above the check servers, and a user endpoint.
UNBOUND_EPS = [PROBE_SERVER_BASE, CHECK_SERVER_BASE, CHECK_SERVER_BASE + 4, 200]

#: How long after the fuzzing every link must carry a request again: longer than the latency
#: server's own 30 s send timeout, since a fuzzed request whose `m_source` names a local
#: endpoint that is bound but never receives holds a check server that long.
RECOVER_BOUND = 40.0
#: RSS growth and thread count change a DSP may show after the run.
RSS_GROWTH_KIB = 64 * 1024
THREADS_SLACK = 8

I32_EDGES = [0, 1, -1, 2**31 - 1, -2**31, 0x7FFF, 0x8000, 0xFFFF, 0x10000]
FIELD_EDGES: dict[str, list[int]] = {
    "c_cmd": [-1, C.CMD_NONE, C.CMD_LAST_CMD, 16, C.MASK_ACKNOWLEDGE, C.MASK_ACKNOWLEDGE | 15,
              C.MASK_ACKNOWLEDGE | 16, C.CMD_COPYIN_DATA, C.CMD_COPYOUT_DATA, C.CMD_HELLO,
              C.CMD_SHUTDOWN, C.CMD_PROCBIND, 2**31 - 1, -2**31],
    "c_len": [-1, 0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, C.MAXCOPYBUF,
              C.MAXCOPYBUF + 1, 2**31 - 1, -2**31],
    "c_batch_nr": [-1, 0, 1, 2, C.MAXCOPYBUF // HEADER_SIZE, C.MAXCOPYBUF // HEADER_SIZE + 1,
                   2**31 - 1],
    "c_flags": [0, C.FLAG_BATCH, C.FLAG_LZ4, C.FLAG_CHECK_HDR, C.FLAG_BATCH | C.FLAG_LZ4,
                C.FLAG_BATCH | C.FLAG_CHECK_HDR, C.FLAG_LZ4 | C.FLAG_CHECK_HDR, 7, 8,
                0xFFFFFFFF],
    "c_src": [-C.NR_TASKS - 1, -C.NR_TASKS, -1, 0, EXT_EP, C.NR_SERVERS - 1, C.NR_PROCS - 1,
              C.NR_PROCS, C.ANY, C.NONE, C.SELF, PROBE_CLIENT_BASE + 1, 2**31 - 1, -2**31],
    "c_dst": [-C.NR_TASKS - 1, -C.NR_TASKS, -1, 0, EXT_EP, PROBE_SERVER_BASE + 1,
              PROBE_SERVER_BASE + 2, PROBE_SERVER_BASE + 3, C.NR_PROCS - 1, C.NR_PROCS, C.ANY,
              C.NONE, C.SELF, 2**31 - 1],
    "c_snode": [-1, LB_NODE, 1, 2, 3, C.NR_NODES - 1, C.NR_NODES, 2**31 - 1],
    "c_dnode": [-1, LB_NODE, 1, 2, 3, C.NR_NODES - 1, C.NR_NODES, 2**31 - 1],
    "c_dcid": [-1, 0, 1, C.NR_DCS - 1, C.NR_DCS, 2**31 - 1],
    "c_rcode": [0, -1, -300, -399, 2**31 - 1, -2**31],
    "c_pid": [0, -1, 1, 2**31 - 1],
    "v_bytes": [-1, 0, 1, C.MAXCOPYBUF, C.MAXCOPYBUF + 1, 2**31 - 1],
    "v_src": [-1, 0, EXT_EP, C.NR_PROCS, C.ANY],
    "v_dst": [-1, 0, EXT_EP, C.NR_PROCS, C.ANY],
    "v_rqtr": [-1, 0, EXT_EP, C.NR_PROCS, C.ANY],
}


@dataclass
class FuzzStats:
    """What the workers did (summed over all of them)."""

    frames: int = 0
    connections: int = 0
    refused: int = 0          # connect() failed (the listener was not there or full)
    closed_by_target: int = 0  # the target closed our connection before we did
    kinds: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, other: FuzzStats) -> None:
        with self.lock:
            self.frames += other.frames
            self.connections += other.connections
            self.refused += other.refused
            self.closed_by_target += other.closed_by_target
            for k, v in other.kinds.items():
                self.kinds[k] = self.kinds.get(k, 0) + v


class FrameFactory:
    """Valid frames from peer `snode` to `dnode`, and their mutations."""

    def __init__(self, rng: random.Random, snode: int, dnode: int) -> None:
        self.rng = rng
        self.snode, self.dnode = snode, dnode

    # ------------------------------------------------------------------ valid frames
    def _hdr(self, cmd: int, **kw):
        r = self.rng
        fields = dict(c_cmd=cmd, c_dcid=0, c_src=r.choice([50, 51, PROBE_CLIENT_BASE + self.snode,
                                                            PROBE_SERVER_BASE + self.snode]),
                      c_dst=r.choice([PROBE_SERVER_BASE + self.dnode, EXT_EP, 60,
                                      PROBE_CLIENT_BASE + self.dnode]),
                      c_snode=self.snode, c_dnode=self.dnode, c_pid=r.randrange(1, 1 << 20))
        fields.update(kw)
        h = make_header(**fields)
        m = h.c_msg
        m.m_source, m.m_type, m.m1_i1 = h.c_src, r.choice([0x0A, 0x0B, 0]), r.randrange(1000)
        return h

    def hello(self) -> bytes:
        h = make_header(c_cmd=C.CMD_NONE, c_dcid=-1, c_src=C.NONE, c_dst=C.NONE,
                        c_snode=self.snode, c_dnode=self.dnode, c_pid=4242)
        if self.rng.random() < 0.5:
            m = h.c_msg
            m.m_source, m.m_type = self.snode, C.MT_LOAD_LEVEL
            m.m1_i1, m.m1_i2, m.m1_i3 = self.rng.randrange(101), self.rng.choice(
                [C.LVL_IDLE, C.LVL_BUSY, C.LVL_SATURATED, C.LVL_NOTINIT, 7]), 2
        return bytes(h.buf)

    def message(self) -> bytes:
        cmd = self.rng.choice([C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG,
                               C.CMD_NTFY_MSG, C.CMD_SEND_ACK, C.CMD_SNDREC_ACK,
                               C.CMD_REPLY_ACK, C.CMD_NTFY_ACK, C.CMD_COPYOUT_RQST,
                               C.CMD_COPYLCL_RQST, C.CMD_COPYRMT_RQST, C.CMD_COPYIN_RQST,
                               C.CMD_COPYIN_ACK, C.CMD_COPYLCL_ACK, C.CMD_COPYRMT_ACK])
        flags = C.FLAG_CHECK_HDR if self.rng.random() < 0.3 else 0
        h = self._hdr(cmd, c_flags=flags)
        if cmd & C.MASK_ACKNOWLEDGE and self.rng.random() < 0.5:
            h.c_rcode = self.rng.choice([-301, -302, -320, -1])
        if cmd in (C.CMD_COPYOUT_RQST, C.CMD_COPYLCL_RQST, C.CMD_COPYRMT_RQST,
                   C.CMD_COPYIN_RQST):
            h.v_src, h.v_dst, h.v_rqtr = h.c_src, h.c_dst, h.c_src
            h.v_bytes = self.rng.choice([0, 1, 4096, C.MAXCOPYBUF])
        return bytes(h.buf)

    def data(self) -> bytes:
        n = self.rng.choice([1, 100, 4096, C.MAXCOPYBUF])
        cmd = self.rng.choice([C.CMD_COPYIN_DATA, C.CMD_COPYOUT_DATA])
        payload = bytes(n) if self.rng.random() < 0.5 else self.rng.randbytes(n)
        h = self._hdr(cmd, c_len=n, v_bytes=n)
        h.v_src, h.v_dst, h.v_rqtr = h.c_src, h.c_dst, h.c_src
        if self.rng.random() < 0.4:
            packed = lz4.frame.compress(payload)
            h.c_len, h.c_flags = len(packed), C.FLAG_LZ4
            payload = packed
        return bytes(h.buf) + payload

    def batch(self) -> bytes:
        k = self.rng.choice([1, 2, 5, 30])
        subs = [self.message()[:HEADER_SIZE] for _ in range(k)]
        h = self._hdr(C.CMD_SNDREC_MSG, c_len=k * HEADER_SIZE, c_batch_nr=k,
                      c_flags=C.FLAG_BATCH)
        return bytes(h.buf) + pack_batch(subs)

    def valid(self) -> tuple[str, bytes]:
        kind = self.rng.choices(["hello", "message", "data", "batch"], [2, 5, 2, 2])[0]
        return kind, getattr(self, kind)()

    # ------------------------------------------------------------------ mutations
    def frame(self) -> tuple[str, bytes]:
        """One frame to send: valid (20 %), mutated (70 %) or random bytes (10 %)."""
        r = self.rng.random()
        if r < 0.1:
            return "random", self.rng.randbytes(self.rng.randrange(1, 600))
        kind, frame = self.valid()
        if r < 0.3:
            return f"valid-{kind}", frame
        how = self.rng.choices(["bitflip", "field", "snode-lb", "batch-sub", "length",
                                "lz4-junk", "check-hdr-steal"], [4, 8, 1, 2, 2, 1, 1])[0]
        return f"{how}-{kind}", getattr(self, "_" + how.replace("-", "_"))(bytearray(frame))

    def _bitflip(self, f: bytearray) -> bytes:
        end = HEADER_SIZE if self.rng.random() < 0.8 else len(f)
        for _ in range(self.rng.randrange(1, 9)):
            i = self.rng.randrange(end)
            f[i] ^= 1 << self.rng.randrange(8)
        return bytes(f)

    def _field(self, f: bytearray) -> bytes:
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            name = self.rng.choice(list(FIELD_EDGES))
            off, fmt = HEADER_FIELDS[name]
            value = self.rng.choice(FIELD_EDGES[name] + I32_EDGES)
            struct.pack_into("<" + fmt, f, off,
                             value & 0xFFFFFFFF if fmt == "I" else _i32(value))
        return bytes(f)

    def _snode_lb(self, f: bytearray) -> bytes:
        struct.pack_into("<i", f, 16, LB_NODE)
        if self.rng.random() < 0.5:
            struct.pack_into("<i", f, 8, self.rng.choice([EXT_EP, 50, 120]))
        return bytes(f)

    def _batch_sub(self, f: bytearray) -> bytes:
        f = bytearray(self.batch())
        k = struct.unpack_from("<i", f, 36)[0]
        i = self.rng.randrange(k)
        off = HEADER_SIZE * (1 + i)
        which = self.rng.choice(["c_len", "c_flags", "c_batch_nr", "c_cmd", "c_snode"])
        o, _fmt = HEADER_FIELDS[which]
        value = {"c_len": self.rng.choice([1, HEADER_SIZE, C.MAXCOPYBUF, -1, 2**31 - 1]),
                 "c_flags": self.rng.choice([C.FLAG_BATCH, C.FLAG_LZ4, 0xFFFFFFFF]),
                 "c_batch_nr": self.rng.choice([1, -1, 1000]),
                 "c_cmd": self.rng.choice([C.CMD_NONE, 999, -1, C.CMD_COPYIN_DATA]),
                 "c_snode": self.rng.choice([LB_NODE, C.NR_NODES, -1])}[which]
        struct.pack_into("<I" if which == "c_flags" else "<i", f, o + off,
                         value & 0xFFFFFFFF if which == "c_flags" else _i32(value))
        return bytes(f)

    def _length(self, f: bytearray) -> bytes:
        """c_len disagrees with the payload that follows (the stream is out of step)."""
        real = len(f) - HEADER_SIZE
        lie = self.rng.choice([real + 1, max(0, real - 1), real + HEADER_SIZE, 7, 0,
                               HEADER_SIZE * 3])
        struct.pack_into("<i", f, 28, lie)
        return bytes(f)

    def _lz4_junk(self, f: bytearray) -> bytes:
        h = bytearray(self.data()[:HEADER_SIZE])
        n = self.rng.choice([1, 19, 500])
        junk = self.rng.randbytes(n) if self.rng.random() < 0.5 else \
            lz4.frame.compress(bytes(C.MAXCOPYBUF * 2))[:n]
        struct.pack_into("<i", h, 28, n)
        struct.pack_into("<I", h, 40, C.FLAG_LZ4 | struct.unpack_from("<I", h, 40)[0])
        return bytes(h) + junk

    def _check_hdr_steal(self, f: bytearray) -> bytes:
        """CHECK_HDR with c_src = the service's ext_ep, to an unbound endpoint (finding 3)."""
        h = self._hdr(C.CMD_SNDREC_MSG, c_flags=C.FLAG_CHECK_HDR, c_src=EXT_EP,
                      c_dst=self.rng.choice(UNBOUND_EPS))
        return bytes(h.buf)


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# ------------------------------------------------------------------------------ the workers
@dataclass
class Target:
    """T's RPROXY port for peer P, reached from P's address."""

    target: int
    peer: int
    src_addr: str
    dst: tuple[str, int]


def targets(cluster: Cluster) -> list[Target]:
    out = []
    for t in cluster.nodes:
        host = resolve(cluster.cfg.nodes_by_id[t].rname)
        for spec in topology.peer_specs(cluster.cfg, t):
            if spec.nodeid in cluster.nodes:
                out.append(Target(t, spec.nodeid, resolve(spec.host), (host, spec.rport)))
    return out


def worker(tg: Target, rng: random.Random, budget: list[int], budget_lock: threading.Lock,
           deadline: float, stop: threading.Event, total: FuzzStats,
           linger: float = 0.25) -> None:
    """Connections from tg.peer's address to tg.target until the shared frame budget or the
    deadline is used up."""
    st = FuzzStats()
    fac = FrameFactory(rng, tg.peer, tg.target)
    while not stop.is_set() and time.monotonic() < deadline:
        k = rng.choice([1, 2, 4, 8, 16, 32])
        with budget_lock:
            k = min(k, budget[0])
            budget[0] -= k
        if k <= 0:
            break
        frames = [fac.frame() for _ in range(k)]
        if rng.random() < 0.1:  # cut the last frame short: the connection ends inside it
            kind, last = frames[-1]
            frames[-1] = ("truncated-" + kind, last[:rng.randrange(1, max(2, len(last)))])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(2.0)
        try:
            s.bind((tg.src_addr, 0))
            s.connect(tg.dst)
        except OSError:
            st.refused += 1
            s.close()
            stop.wait(0.05)
            continue
        st.connections += 1
        try:
            for kind, data in frames:
                s.sendall(data)
                st.frames += 1
                st.kinds[kind.split("-")[0]] = st.kinds.get(kind.split("-")[0], 0) + 1
            s.shutdown(socket.SHUT_WR)
            s.settimeout(linger)
            # the target never writes on this direction: EOF means it closed the link
            if s.recv(1) == b"":
                st.closed_by_target += 1
        except TimeoutError:
            pass
        except OSError:
            st.closed_by_target += 1
        finally:
            s.close()
    total.add(st)


class FakePeer:
    """Peer P's listeners while P's DSP is stopped: accepts each target's connection to P on
    P's address and drops whatever it sends (the target's link then counts as connected out,
    so a worker's connection makes it up and its frames are read)."""

    def __init__(self, cluster: Cluster, peer: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        host = resolve(cluster.cfg.nodes_by_id[peer].rname)
        for t in cluster.nodes:
            for spec in topology.peer_specs(cluster.cfg, t):
                if spec.nodeid == peer:
                    ls = socket.socket()
                    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    ls.bind((host, spec.sport))
                    ls.listen(16)
                    ls.setblocking(False)
                    self.sel.register(ls, selectors.EVENT_READ, "listener")
        self.thread = threading.Thread(target=self._run, name=f"fake{peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.1):
                sock = key.fileobj
                try:
                    if key.data == "listener":
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        self.sel.register(conn, selectors.EVENT_READ, "conn")
                    elif not sock.recv(1 << 16):
                        raise ConnectionResetError
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self.sel.unregister(sock)
                    sock.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def fuzz(cluster: Cluster, frames: int, seconds: float, seed: int
         ) -> tuple[FuzzStats, float, dict[int, tuple[int, tuple[int, int, int]]]]:
    """Run the workers, one phase per peer (its DSP stopped, a `FakePeer` in its place, one
    worker per target of its links); returns the figures, the time spent fuzzing and, for
    each stopped DSP, its link-down count and `dsp_figures` just before it stopped (what it
    went through as a target in the phases before; its successor starts from 0)."""
    tgs = targets(cluster)
    peers = sorted({tg.peer for tg in tgs})
    budget, lock = [frames], threading.Lock()
    total = FuzzStats()
    fuzzing = 0.0
    stopped = {}
    for peer in peers:
        stopped[peer] = (link_downs(cluster).get(peer, 0),
                         dsp_figures(cluster, samples=1).get(peer, (0, 0, 0)))
        cluster.kill_dsp(peer, signal.SIGTERM)
        fake = FakePeer(cluster, peer)
        stop = threading.Event()
        t0 = time.monotonic()
        deadline = t0 + seconds / len(peers)
        with lock:
            budget[0] = frames // len(peers)
        threads = [threading.Thread(target=worker, args=(tg, random.Random(seed * 1000 + i),
                                                         budget, lock, deadline, stop, total),
                                    name=f"fuzz{tg.peer}->{tg.target}", daemon=True)
                   for i, tg in enumerate(tgs) if tg.peer == peer]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join(max(0.1, deadline - time.monotonic() + 10))
        finally:
            stop.set()
            fuzzing += time.monotonic() - t0
            fake.close()
            cluster.start_dsp(peer)
    return total, fuzzing, stopped


# ------------------------------------------------------------------------------ the checks
@dataclass
class Report:
    stats: FuzzStats
    elapsed: float
    recover: float | None
    recover_bound: float
    probes: dict
    dead: list[str]
    before: dict
    after: dict
    links_closed: dict[int, int]
    service_binding: str
    server_restarts: int
    binding_repairs: int
    failures: list[str]

    def lines(self) -> list[str]:
        s = self.stats
        out = [f"frames sent          {s.frames}  ({s.frames / max(self.elapsed, 1e-9):.0f}/s "
               f"over {self.elapsed:.1f} s)",
               f"connections          {s.connections}  (refused {s.refused}, closed by the "
               f"target {s.closed_by_target})",
               "frame kinds          " + ", ".join(f"{k} {v}" for k, v in sorted(s.kinds.items())),
               "links closed         " + ", ".join(f"node {n}: {c}" for n, c in
                                                   sorted(self.links_closed.items())),
               "time to recover      " + (f"{self.recover:.2f} s" if self.recover is not None
                                           else f"NOT within {self.recover_bound:.0f} s"),
               f"probe servers restarted {self.server_restarts}, probe bindings re-made "
               f"{self.binding_repairs}",
               f"service binding      {self.service_binding}"]
        for n in sorted(self.before):
            rb, tb, _ = self.before[n]
            ra, ta_lo, ta_hi = self.after.get(n, (0, 0, 0))
            out.append(f"DSP node {n}           RSS {rb // 1024} -> {ra // 1024} MiB, "
                       f"threads {tb} -> {ta_lo}..{ta_hi}")
        bad = {k: v for k, v in self.probes.items() if v != "ok"}
        out.append("probes               " + ("all links ok" if not bad else
                                               f"failing: {bad}"))
        out.extend(f"FAIL: {f}" for f in self.failures)
        return out


def link_downs(cluster: Cluster) -> dict[int, int]:
    """Link-down count per node from the DSPs' status files."""
    out = {}
    for n in cluster.nodes:
        st = cluster.status(n)
        out[n] = sum(v.get("downs", 0) for v in (st.get("links") or {}).values())
    return out


def service_binding(cluster: Cluster) -> str:
    try:
        info = cluster.dvk(CLIENT_NODE).getprocinfo(0, EXT_EP)
    except DvkError as err:
        return f"error {err.name}"
    if info.p_rts_flags & C.REMOTE and info.p_nodeid == LB_NODE:
        return f"endpoint {EXT_EP} on node {CLIENT_NODE} -> LB node {LB_NODE} (intact)"
    return (f"endpoint {EXT_EP} on node {CLIENT_NODE} CHANGED: flags {info.p_rts_flags:#x} "
            f"node {info.p_nodeid}")


def run(cluster: Cluster, out_dir: Path, frames: int, seconds: float, seed: int,
        recover_bound: float = RECOVER_BOUND) -> Report:
    """Fuzz a started cluster of CONFIG and check it afterwards (every link must carry a
    request within `recover_bound` seconds of the last frame)."""
    probes = Probes(cluster, cluster.nodes, out_dir)        # what the fuzzed frames hit
    check = Probes(cluster, cluster.nodes, out_dir, CHECK_SERVER_BASE, CHECK_CLIENT_BASE)
    # a thread binds one endpoint per node: the check probes live on a thread of their own
    checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="check-probes")
    try:
        probes.start()
        checker.submit(check.start).result()
        for p in (probes, check):
            took, first = (p.all_links(RECOVER_BOUND) if p is probes else
                           checker.submit(p.all_links, RECOVER_BOUND).result())
            if took is None:
                raise RuntimeError(f"links do not carry requests before fuzzing: {first}")
        before = dsp_figures(cluster)
        downs0 = link_downs(cluster)
        stats, elapsed, stopped = fuzz(cluster, frames, seconds, seed)
        t0 = time.monotonic()
        failures = []
        try:
            cluster.wait_links_up(recover_bound)
        except (TimeoutError, RuntimeError) as exc:
            failures.append(f"links after the fuzzing: {exc}")
        left = max(1.0, recover_bound - (time.monotonic() - t0))
        _, last = checker.submit(check.all_links, left).result()
        recover = time.monotonic() - t0 if all(v == "ok" for v in last.values()) else None
        if recover is None:
            failures.append(f"links that carried no request within {recover_bound:.0f} s: "
                            f"{ {k: v for k, v in last.items() if v != 'ok'} }")
        dead = [f"dsp{n}" for n, p in cluster.dsps.items() if p.poll() is not None]
        dead += [f"kernel{n}" for n, p in cluster.kernels.items() if p.poll() is not None]
        if dead:
            failures.append(f"processes died: {dead}")
        after = dsp_figures(cluster)
        for n, (_downs, (rs, ts_lo, ts_hi)) in stopped.items():
            if n in after and rs:   # and what it showed before it stopped for its phase
                ra, ta_lo, ta_hi = after[n]
                after[n] = (max(ra, rs), min(ta_lo, ts_lo), max(ta_hi, ts_hi))
        for n, (rb, tb_lo, tb_hi) in before.items():
            if n not in after:
                continue
            ra, ta_lo, ta_hi = after[n]
            if ra > rb + RSS_GROWTH_KIB:
                failures.append(f"DSP {n} RSS grew {rb // 1024} -> {ra // 1024} MiB")
            if ta_hi > tb_hi + THREADS_SLACK:
                failures.append(f"DSP {n} threads {tb_hi} -> {ta_hi}")
            if ta_lo < tb_lo:
                failures.append(f"DSP {n} lost threads: {tb_lo} -> {ta_lo}")
        binding = service_binding(cluster)
        if "intact" not in binding:
            failures.append(f"service binding: {binding}")
        downs1 = link_downs(cluster)
        return Report(stats, elapsed, recover, recover_bound, last, dead, before, after,
                      {n: downs1.get(n, 0) + stopped.get(n, (0,))[0] - downs0.get(n, 0)
                       for n in downs1}, binding,
                      probes.restarts + check.restarts, probes.repairs + check.repairs,
                      failures)
    finally:
        checker.submit(check.close).result()
        checker.shutdown()
        probes.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.frame_fuzz", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", default=None, help="config and logs (default: a temp dir)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"frame fuzzer: {args.frames} frames, at most {args.seconds:.0f} s, seed {seed}")
    try:
        with local_cluster(CONFIG, args.workdir) as cl:
            workdir = Path(cl.log_dir).parent
            print(f"cluster up: nodes {cl.nodes} on {cl.net}.x, logs in {cl.log_dir}")
            report = run(cl, Path(cl.log_dir), args.frames, args.seconds, seed)
    except (RuntimeError, TimeoutError, DvkError, OSError, ConfigError) as exc:
        print(f"frame fuzzer: cannot run: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    if report.failures:
        print(f"logs kept in {workdir}")
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
