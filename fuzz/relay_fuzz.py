"""Relay fuzzer: the LB host's compiled relay against the router it stands in for.

    python -m fuzz.relay_fuzz [--frames N] [--seconds S] [--seed X]

Two LB hosts get the same frames: one routes everything in Python, the other hands its
established sessions to the compiled relay (dsp_proxy/fastpath.py).  Every frame the relay
carries must leave it exactly as the router sends it (same node, same bytes), every frame it
leaves must get the router's own answer, and the sessions must agree after every frame
(pending request, counters, last use, the set of sessions).  The frames are the traffic of
three relayed clients and their servers: valid commands, other commands, endpoints, nodes,
PIDs, error codes, flags, batch fields, lengths and DCs, alone or several in one read buffer
(the relay walks them until one needs the router); sessions end (errors, timeouts, new PIDs)
and start again.  Prints frames compared, relayed, left to the router, refused by the header
check, sessions started and mismatches; exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass, field

from dsp_proxy import config as cfgmod
from dsp_proxy import fastpath, topology
from dsp_proxy.group import (
    MT_LOAD_REPORT,
    SEND,
    SERVER_GONE,
    SERVICE_DOWN,
    Group,
    Router,
    control_message,
)
from dsp_proxy.rproxy import FrameError, WireLimits, check_header
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import HEADER_SIZE, ROUTE_STRUCT, Header, Message, make_header

CONFIG = """
lb node0 { nodeid 0; cltname lbhost; lb_eps 100 120; max_sessions 150; period 30; };
server node1 { nodeid 1; rname 127.0.0.1; };
server node2 { nodeid 2; rname 127.0.0.2; };
client node3 { nodeid 3; rname 127.0.0.3; };
client lbhost { nodeid 5; rname 127.0.0.5; };
service latency { ext_ep 10; min_ep 10; max_ep 19; bind external; };
service spawned { ext_ep 30; min_ep 30; max_ep 39; bind local; prog "/bin/true"; };
"""
LB_HOST, CLIENT, SERVERS = 5, 3, (1, 2)
CLIENT_EPS = (50, 51, 52)


class Mismatch(AssertionError):
    """The relay and the router disagree."""


class Peers:
    """The router's view of the links: both servers up."""

    def up(self, node: int) -> bool:
        return node in SERVERS

    def frames(self, node: int) -> int:
        return 0

    def c_peer(self, node: int) -> bool:
        return False


def report(group: Group, node: int) -> None:
    """A load report of server `node`: idle, every service bound."""
    m = Message()
    m.load(control_message(MT_LOAD_REPORT, m_source=node, m1_i1=0, m1_i2=C.LVL_IDLE,
                           m1_i3=30, m1_p2=0xFFFFFFFF))
    group.on_control(node, m)


def lb_host(clock: list[float]) -> tuple[Router, Group]:
    cfg = cfgmod.parse_text(CONFIG)
    group = Group(cfg, LB_HOST, Peers(), topology.relay_host(cfg), node_pids=lambda: set(),
                  clock=lambda: clock[0])
    for node in SERVERS:
        report(group, node)
    return Router(LB_HOST, 0, group), group


class Reader:
    """The part of a receiver's read buffer the relay uses."""

    def __init__(self) -> None:
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def load(self, data: bytes) -> None:
        self.buf[:len(data)] = data
        self.start, self.end = 0, len(data)


class Sink:
    """A link that takes every span (what the relay wrote is what is compared)."""

    def __init__(self, node: int, spans: list) -> None:
        self.node, self.spans = node, spans

    def submit_span(self, span, nframes: int) -> int:
        self.spans.append((self.node, bytes(span), nframes))
        return 0


def plain(act) -> tuple:
    """An action with its buffers as bytes (comparable)."""
    if act[0] == SEND:
        return (SEND, act[1], bytes(act[2]), bytes(act[3]) if act[3] is not None else None)
    return tuple(bytes(x) if isinstance(x, (bytearray, memoryview)) else x for x in act)


class Twins:
    """The same LB host twice: A with the compiled relay, B with the router only."""

    def __init__(self) -> None:
        self.clock = [100.0]
        self.ra, self.ga = lb_host(self.clock)
        self.rb, self.gb = lb_host(self.clock)
        self.table = fastpath.FlowTable(LB_HOST, 0, C.NR_NODES, C.NR_DCS,
                                        SERVER_GONE | SERVICE_DOWN)
        ranges = {dc: (C.NR_TASKS, C.NR_PROCS) for dc in range(C.NR_DCS)}
        self.limits = WireLimits(C.NR_NODES, C.NR_DCS, dc_ranges=ranges)
        for node in range(C.NR_NODES):
            self.table.set_raw_ok(node, True)
        for dc, rng in ranges.items():
            self.table.set_dc(dc, rng)
        self.ga.fast = self.table
        self.spans: list = []
        self.links = {n: Sink(n, self.spans) for n in range(C.NR_NODES)}
        self.reader = Reader()
        self.relays: dict[int, fastpath.Relay] = {}
        self.relayed = self.python = self.refused = 0

    def _route(self, router: Router, frame: bytes, peer: int):
        f = ROUTE_STRUCT.unpack_from(frame)
        try:
            check_header(f, peer, self.limits)
        except FrameError:
            return "refused"
        acts = router.from_network(frame[:HEADER_SIZE], f, memoryview(frame[HEADER_SIZE:]),
                                   peer, False)
        acts = [] if acts is None else acts if isinstance(acts, list) else [acts]
        return [plain(a) for a in acts]

    def _relay(self, peer: int) -> fastpath.Relay:
        relay = self.relays.get(peer)
        if relay is None:
            relay = self.relays[peer] = fastpath.Relay(self.table, self.reader, peer,
                                                       self.links, _no_refusal)
        return relay

    def feed_run(self, frames: list[bytes], peer: int) -> int:
        """Whole frames from the link to `peer` in one read buffer, as a receiver gets them:
        the relay walks them until one needs the router, the router takes that one, the relay
        walks on.  What each walk wrote must be, frame by frame and in order, what the router
        alone sends for those frames.  Returns how many the relay carried."""
        relay = self._relay(peer)
        reader = self.reader
        reader.load(b"".join(frames))
        carried = i = 0
        while i < len(frames):
            self.spans.clear()
            start = reader.start
            relay()
            wrote = [(node, out) for node, span, _n in self.spans for out in _split(span)]
            k, pos, want = i, start, []
            while pos < reader.start:
                expected = self._route(self.rb, frames[k], peer)
                if expected == "refused" or len(expected) != 1 or expected[0][0] != SEND:
                    raise Mismatch(f"the relay carried what the router answers {expected}")
                _kind, to, hbuf, data = expected[0]
                want.append((to, hbuf + (data or b"")))
                pos += len(frames[k])
                k += 1
            if pos != reader.start or wrote != want:
                raise Mismatch(f"walk over frames {i}..{k - 1} of {len(frames)}: the relay "
                               f"wrote {[(n, _hdr(o)) for n, o in wrote]}\nthe router "
                               f"{[(n, _hdr(o)) for n, o in want]}")
            carried += k - i
            self.relayed += k - i
            i = k
            self.compare()
            if i < len(frames):          # the frame the walk stopped at: the router's
                expected = self._route(self.rb, frames[i], peer)
                got = self._route(self.ra, frames[i], peer)
                if got != expected:
                    raise Mismatch(f"router with the relay: {got}\nrouter alone: {expected}")
                self.python += 1
                self.refused += expected == "refused"
                reader.start += len(frames[i])
                i += 1
                self.compare()
        return carried

    def feed(self, frame: bytes, peer: int) -> bool:
        """One frame from the link to `peer` through both; True when the relay carried it.
        Mismatch when they disagree."""
        expected = self._route(self.rb, frame, peer)
        relay = self._relay(peer)
        self.reader.load(frame)
        self.spans.clear()
        relay()
        carried = self.reader.start == len(frame)
        if carried:
            self.relayed += 1
            if expected == "refused":
                raise Mismatch(f"the relay carried a frame the check refuses: {_hdr(frame)}")
            if len(self.spans) != 1 or len(expected) != 1:
                raise Mismatch(f"relay wrote {len(self.spans)} spans, router {expected}")
            (node, out, nframes), ((kind, to, hbuf, data),) = self.spans[0], expected
            if (kind, to, nframes) != (SEND, node, 1) or out != hbuf + (data or b""):
                raise Mismatch(f"relay to {node}: {_hdr(out)}\nrouter {kind} to {to}: "
                               f"{_hdr(hbuf)}")
        else:
            if self.reader.start != 0 or self.spans:
                raise Mismatch("the relay consumed part of a frame it left to the router")
            self.python += 1
            self.refused += expected == "refused"
            got = self._route(self.ra, frame, peer)
            if got != expected:
                raise Mismatch(f"router with the relay: {got}\nrouter alone: {expected}")
        self.compare()
        return carried

    def compare(self) -> None:
        """The sessions of A (with what the relay kept) and of B agree."""
        with self.ga.lock:
            self.ga._fast_sync()
        a, b = self.ga.sessions, self.gb.sessions
        if a.keys() != b.keys():
            raise Mismatch(f"sessions {sorted(a)} / {sorted(b)}")
        for key, sa in a.items():
            sb = b[key]
            fa = (sa.pending, sa.commands, sa.bytes, sa.svr_node, sa.lbsvr_ep, sa.svr_pid,
                  sa.to_server, sa.first is None, sa.last_used)
            fb = (sb.pending, sb.commands, sb.bytes, sb.svr_node, sb.lbsvr_ep, sb.svr_pid,
                  sb.to_server, sb.first is None, sb.last_used)
            if fa != fb:
                raise Mismatch(f"session {key}: {fa} / {fb}")
        for nid, srv in self.ga.servers.items():
            other = self.gb.servers[nid]
            if (srv.commands, srv.bytes, srv.sessions) != \
                    (other.commands, other.bytes, other.sessions):
                raise Mismatch(f"server {nid} figures differ")

    def advance(self, seconds: float) -> None:
        """Time passes: both expire the same sessions with the same replies."""
        self.clock[0] += seconds
        acts_a = [plain(a) for a in self.ga.tick()]
        acts_b = [plain(a) for a in self.gb.tick()]
        if acts_a != acts_b:
            raise Mismatch(f"tick: {acts_a} / {acts_b}")


def _no_refusal(hbuf: bytes, code: int) -> None:
    raise Mismatch("a sink refused nothing")


def _split(span: bytes) -> list[bytes]:
    """The frames of a span (header and c_len payload bytes each)."""
    out, off = [], 0
    while off < len(span):
        end = off + HEADER_SIZE + ROUTE_STRUCT.unpack_from(span, off)[7]
        out.append(span[off:end])
        off = end
    return out


def _hdr(buf: bytes) -> str:
    return repr(Header(bytearray(buf[:HEADER_SIZE])))


def frame(rng: random.Random, cmd: int, src: int, dst: int, snode: int, dnode: int, pid: int,
          rcode: int = 0, eps=(50, 10, 100)) -> bytes:
    """A frame with a payload where the command carries one, vcopy endpoints from `eps`."""
    length = rng.choice((1, 7, 300)) if cmd in C.DATA_CMDS else 0
    v = [rng.choice(eps) for _ in range(3)]
    h = make_header(c_cmd=cmd, c_dcid=0, c_src=src, c_dst=dst, c_snode=snode, c_dnode=dnode,
                    c_pid=pid, c_rcode=rcode, c_len=length, v_src=v[0], v_dst=v[1],
                    v_rqtr=v[2], v_bytes=length)
    h.c_msg.m_source = rng.choice((src, dst, 7))
    h.c_msg.m_type = 0x0A
    return bytes(h.buf) + bytes(rng.randrange(256) for _ in range(length))


def establish(t: Twins, src: int = 50, dst: int = 10, pid: int = 77) -> tuple[int, int]:
    """A client's first request and the server's reply: the session is established (and
    handed to the relay in A).  Returns (server node, the client as the server sees it)."""
    rng = random.Random(0)
    t.feed(frame(rng, C.CMD_SNDREC_MSG, src, dst, CLIENT, 0, pid), CLIENT)
    sess = t.gb.sessions[(0, CLIENT, src, 10)]
    t.feed(frame(rng, C.CMD_SEND_MSG, dst, sess.lbsvr_ep, sess.svr_node, LB_HOST, 900),
           sess.svr_node)
    if t.ga.sessions[(0, CLIENT, src, 10)].fast_sid < 0:
        raise Mismatch("an established session was not handed to the relay")
    return sess.svr_node, sess.lbsvr_ep


@dataclass
class Figures:
    frames: int = 0
    relayed: int = 0
    python: int = 0
    refused: int = 0
    sessions: int = 0
    seconds: float = 0.0
    mismatches: list = field(default_factory=list)

    def line(self) -> str:
        return (f"frames compared {self.frames} in {self.seconds:.1f} s: relayed {self.relayed}, "
                f"left to the router {self.python} (refused by the check {self.refused}); "
                f"sessions started {self.sessions}; mismatches {len(self.mismatches)}")


_CMDS = sorted(C.VALID_CMDS) + [0x55, C.MASK_ACKNOWLEDGE | 0x1F]
_FLAGS = (0, 0, 0, C.FLAG_CHECK_HDR, C.FLAG_BATCH, C.FLAG_LZ4, C.FLAG_DSP_PEER)
_CODES = (0, 0, 0, E.EDVSDSTDIED, E.EDVSNOTREADY, E.EDVSAGAIN, E.EDVSSRCDIED)


def mutated(t: Twins, rng: random.Random) -> tuple[bytes, int]:
    """One frame of a client or a server around the sessions, and the link it comes from."""
    src = rng.choice(CLIENT_EPS)
    cmd = rng.choice(_CMDS)
    if rng.random() < 0.5:       # the client's side
        out = frame(rng, cmd, src, rng.choice((10, 10, 11, 30)), CLIENT,
                    rng.choice((0, 0, 0, LB_HOST, 2)), rng.choice((77, 77, 0, -1, 78)),
                    rng.choice(_CODES), eps=(src, 10, 11, 100, 101))
        peer = CLIENT
    else:                        # a server's side
        sess = t.gb.sessions.get((0, CLIENT, src, 10))
        svr = sess.svr_node if sess is not None else rng.choice(SERVERS)
        lbsvr = sess.lbsvr_ep if sess is not None else 100
        out = frame(rng, cmd, rng.choice((10, 10, 11)), rng.choice((lbsvr, lbsvr, 101)), svr,
                    rng.choice((LB_HOST, LB_HOST, 0)), rng.choice((900, 900, 0, 901)),
                    rng.choice(_CODES), eps=(10, 11, lbsvr, 50))
        peer = svr
    buf = bytearray(out)
    h = Header(memoryview(buf)[:HEADER_SIZE])
    h.c_flags = rng.choice(_FLAGS)
    if rng.random() < 0.05:
        h.c_batch_nr = 1
    if rng.random() < 0.05:
        h.c_dcid = rng.choice((1, 31, 40, -1))
    return bytes(buf), peer


def run(frames: int, seed: int, seconds: float = 600.0) -> Figures:
    """Compare `frames` frames (or as many as `seconds` allow) on fresh twins."""
    rng = random.Random(seed)
    fig = Figures()
    t0 = time.monotonic()
    t = Twins()
    try:
        for src in CLIENT_EPS:
            establish(t, src=src)
        step = 0
        while fig.frames < frames and time.monotonic() - t0 <= seconds:
            step += 1
            if step % 500 == 0:
                t.advance(rng.choice((0.5, 5.0)))
            if rng.random() < 0.2:       # several frames of one link in one read
                peer = rng.choice((CLIENT,) + SERVERS)
                run = [f for f, p in (mutated(t, rng) for _ in range(8)) if p == peer]
                if run:
                    t.feed_run(run, peer)
                    fig.frames += len(run)
            else:
                frame_, peer = mutated(t, rng)
                if rng.random() < 0.03:  # a length that disagrees with the command or bound
                    head = bytearray(frame_[:HEADER_SIZE])
                    n = rng.choice((-1, 3, 120, C.MAXCOPYBUF + 1))
                    Header(head).c_len = n
                    frame_ = bytes(head) + (bytes(n) if 0 <= n <= 120 else b"")
                t.feed(frame_, peer)
                fig.frames += 1
            for src in CLIENT_EPS:       # a session that ended starts again
                if (0, CLIENT, src, 10) not in t.gb.sessions and rng.random() < 0.2:
                    for node in SERVERS:  # the service is bound again where it went down
                        for group in (t.ga, t.gb):
                            report(group, node)
                    establish(t, src=src)
    except Mismatch as exc:
        fig.mismatches.append(f"seed {seed}, frame {fig.frames}: {exc}")
    fig.relayed, fig.python, fig.refused = t.relayed, t.python, t.refused
    fig.sessions = t.gb.counters["sessions_started"]
    fig.seconds = time.monotonic() - t0
    t.table.free()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.relay_fuzz", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to compare")
    p.add_argument("--seconds", type=float, default=600.0, help="time bound (default 600)")
    p.add_argument("--seed", type=int, default=0, help="first random seed (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)   # the routers' session warnings are expected
    if fastpath.lib is None:
        print("the compiled relay is not built (make venv)", file=sys.stderr)
        return 1
    total = Figures()
    t0 = time.monotonic()
    seed = args.seed
    while total.frames < args.frames and time.monotonic() - t0 < args.seconds:
        fig = run(min(20_000, args.frames - total.frames), seed,
                  args.seconds - (time.monotonic() - t0))
        for name in ("frames", "relayed", "python", "refused", "sessions"):
            setattr(total, name, getattr(total, name) + getattr(fig, name))
        total.mismatches += fig.mismatches
        seed += 1
    total.seconds = time.monotonic() - t0
    print(total.line(), f"(seeds {args.seed}..{seed - 1})")
    for text in total.mismatches[:3]:
        print(text, file=sys.stderr)
    return 0 if not total.mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
