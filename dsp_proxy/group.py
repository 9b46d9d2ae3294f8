"""The router and the virtual load-balancer node: decisions only (docs/design.md, "Router").

Nothing here touches a socket, a link or the DVK.  The threads hand the router a frame (a raw
120-byte header, its routing fields and its payload), a tick, a control message or "link to node
N went down", and the router returns ACTIONS that the calling thread carries out
(dsp_proxy/executor.py), outside any router lock:

- `(SEND, node, header, payload, request, relayed)`: queue the frame on the link to `node`; when
  the link refuses it, `Router.send_failed(request, relayed, code)` gives the error reply for the
  client (`request` is the client's original header, None when nobody waits for the frame);
- `(LOCAL, header, payload)`: hand the frame to the put2lcl thread (session traffic rewritten to
  come from the LB node, and error replies for local clients);
- `(DELIVER, header, payload, autobind)`: plain traffic for this node: the receiving thread
  delivers it itself (put2lcl with the binding repairs);
- `(CONTROL, node, body)`: send a control message (a HELLO with a body) to `node`;
- `(NO_SERVER,)`: a session found no usable server (the autoscaler's trigger).

A method returns None, one action tuple (the hot paths: no list per frame) or a list of them.

The LB (`Group`): clients address a service at (LB node, ext_ep); the DSP that receives the
request pins the client's session to one server and rewrites headers both ways.  Local-client
sessions: the client runs on this node, its requests come out of the LB pair and go to the server
with `c_dnode`/`c_dst` rewritten and CHECK_HDR set; the server replies to the client's node, where
they are rewritten to come from (LB node, ext_ep).  Relayed sessions: a client node reaches the LB
node through the LB host, which forwards with `c_snode` = itself and the client endpoint
translated into the `lb_eps` range.  All session and server state changes under `Group.lock`,
held for short sections that allocate nothing but the rewritten header.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import (
    HEADER_SIZE,
    R_CMD,
    R_DNODE,
    R_DST,
    R_FLAGS,
    R_LEN,
    R_SNODE,
    R_SRC,
    ROUTE_STRUCT,
    Header,
    Message,
    error_ack,
    set_route,
    set_run_dnode,
    set_run_flags,
    set_run_snode,
    swap_endpoint,
    swap_endpoint_run,
    vcopy_endpoints,
)

log = logging.getLogger("dsp.group")

# Action kinds (the first element of an action tuple).
SEND, LOCAL, DELIVER, CONTROL, NO_SERVER = range(5)

#: m_type of the load report carried in a HELLO body: m1_i1 cpu %, m1_i2 level, m1_i3 period
#: (s), m1_p1 commands moved in the last period, m1_p2 bitmap of the configured services bound
#: on the reporting node (bit i = the i-th service of the config), m_source the reporting node.
MT_LOAD_REPORT = C.MT_LOAD_LEVEL
#: Control frames (their m_type tags): start / stop a service program for a session, and "a
#: session found no server" sent to the autoscaling DSP.  Replies OR in MT_ACKNOWLEDGE.
MT_SVC_START = 0x10
MT_SVC_STOP = 0x11
MT_NEED_SERVER = 0x12
#: How long a session waits for the server's DSP to start its program (5 s bind + slack).
START_PATIENCE = 8.0
#: At most this many frames, of at most PARKED_BYTES bytes with their headers, wait for a
#: session's program to start (a client has one request in flight); a request beyond them
#: gets EDVSAGAIN, anything else is dropped, so a peer flooding a starting session costs
#: bounded memory.
PARKED_MAX = 16
PARKED_BYTES = 256 << 10
#: Bytes parked for all starting sessions together, beyond each one's first frame (sessions
#: are many: max_sessions in every DC a service covers, 157 x 32 x PARKED_BYTES is 1.2 GiB).
PARKED_TOTAL = 16 << 20
#: Starts whose session ended before the answer, kept to stop a program started anyway.
ABANDONED_MAX = 1024
#: Error ACKs from a server's kernel that mean the server endpoint is gone: the session ends.
SERVER_GONE = frozenset({E.EDVSDSTDIED, E.EDVSSRCDIED, E.EDVSDEADSRCDST, E.EDVSNOTBIND})
#: Error ACKs to a session's first request that mark the service unavailable on that server
#: (the program is not there) and re-dispatch the request once to another server.
SERVICE_DOWN = frozenset({E.EDVSDSTDIED, E.EDVSNOTBIND, E.EDVSNOTREADY})
LEVEL_NAMES = {C.LVL_NOTINIT: "NOTINIT", C.LVL_IDLE: "IDLE", C.LVL_BUSY: "BUSY",
               C.LVL_SATURATED: "SATURATED"}
#: Generations of a translated endpoint (relayed mode) before they start again at 0: the
#: largest for which every endpoint of the DC range still fits a signed 32-bit field.
LB_EP_GENERATIONS = (2**31 - 1) // C._ENDPOINT_GEN_SIZE - 1
#: Entries of the (dcid, endpoint) -> service cache before it is cleared (bounded memory).
SERVICE_CACHE_MAX = 4096
_NO_SERVICE = object()


def control_message(m_type: int, **fields: int) -> bytes:
    """The body of a control frame (a message with the given fields)."""
    m = Message()
    m.m_type = m_type
    for name, value in fields.items():
        setattr(m, name, value & 0xFFFFFFFF if name.startswith("m1_p") else value)
    return bytes(m)


class PeerView(Protocol):
    """What the router may know of the links: nothing but these three queries."""

    def up(self, node: int) -> bool: ...

    def frames(self, node: int) -> int: ...

    def c_peer(self, node: int) -> bool:
        """The link is up and its peer is a C DSP (`Link.c_peer`)."""
        ...


@dataclass
class Session:
    """One client pinned to one server (the C `sess_entry`, with its fields used for real)."""

    dcid: int
    clt_node: int
    clt_ep: int
    clt_pid: int
    lbclt_ep: int            # endpoint the client addressed (the service's ext_ep or in range)
    lbsvr_ep: int            # the client as the server sees it (= clt_ep, or translated)
    svr_node: int
    service: object
    relayed: bool
    svr_pid: int = -1
    pending: int = 0         # the client's unanswered request (SNDREC/SEND), for error replies
    last_used: float = field(default_factory=time.monotonic)
    commands: int = 0        # commands forwarded in the session, both ways
    bytes: int = 0
    to_server: dict = field(default_factory=dict)   # endpoint the client addressed -> server's
    to_client: dict = field(default_factory=dict)   # server endpoint -> what the client sees
    starting: int = 0        # request id while a prog service is being started for it
    started_at: float = 0.0
    parked: list = field(default_factory=list)      # frames waiting for the program's bind
    parked_bytes: int = 0    # their bytes, headers included (bounded: PARKED_BYTES)
    prog_ep: int = -1        # endpoint of the program started for this session
    first: tuple | None = None   # the first request (header, payload) until it is answered
    redispatched: bool = False
    fast_sid: int = -1       # its id in the compiled relay while it carries the session

    def key(self) -> tuple:
        return (self.dcid, self.clt_node, self.clt_ep, self.service.ext_ep)

    def reverse_keys(self) -> list[tuple]:
        return [(self.dcid, self.lbsvr_ep, self.svr_node, ep) for ep in self.to_client]

    @property
    def auto_run(self) -> bool:
        """A `prog` service: the LB starts one program per session."""
        return bool(self.service.prog) and self.service.bind != "external"

    def reaches(self, ep: int) -> bool:
        """Whether the client may name `ep` (an endpoint at the LB node) in this session: an
        endpoint of its service's range; for a `prog` service its own program only (the
        endpoint its first request named): the other endpoints of the range are the programs
        of other clients' sessions on the same server."""
        if ep == self.lbclt_ep:
            return True
        return not self.auto_run and self.service.contains(ep)

    def may_send(self, cmd: int, src: int, dst: int, hbuf, off: int = 0) -> bool:
        """Whether the client's command (`src` -> `dst`, its header at `off` of `hbuf`) stays
        in this session: it addresses an endpoint the session reaches, and a copy command's
        endpoints (v_src, v_dst, v_rqtr) are each the client or such an endpoint.  The
        server's kernel copies between the endpoints a copy names and trusts v_rqtr as the
        requester: anything else in them would reach another client's program or any process
        of the server, or borrow a privileged requester."""
        if not self.reaches(dst):
            return False
        return cmd not in C.VCOPY_CMDS or all(
            v == src or self.reaches(v) for v in vcopy_endpoints(hbuf, off))


@dataclass
class ServerState:
    """What this DSP knows about one server node."""

    nodeid: int
    name: str
    cpu: int = 0
    level: int = C.LVL_NOTINIT
    reported: float = 0.0
    sessions: int = 0
    commands: int = 0        # commands this DSP forwarded to it
    bytes: int = 0
    errors: int = 0
    activity: int = 0        # commands its DSP moved in its last report period
    rise_base: int = -1      # link frame count at its first report after the link came up
    failed: bool = False     # went DOWN since the DSP started: it must rise again
    services_down: set = field(default_factory=set)  # names of services not bound there


class LoadMeter:
    """CPU use of this node every `period`, with IDLE/BUSY/SATURATED hysteresis.

    Under the emulator many nodes share one machine, so a node's CPU is the CPU time of the
    processes attached to its node kernel, as a percentage of one core (capped at 100): an
    emulated node is a one-CPU machine.  On a real DVK node it is the machine's CPU (psutil).
    """

    def __init__(self, low: int, high: int, pids=None) -> None:
        self.set_thresholds(low, high)
        self.pids = pids            # callable -> set of pids, or None for the whole machine
        self.level = C.LVL_IDLE
        self.cpu = 0
        self._last: tuple[float, dict[int, float]] | None = None
        if pids is None:
            psutil.cpu_percent(None)

    def set_thresholds(self, low: int, high: int) -> None:
        """lowwater/highwater, and the hysteresis margin: a fifth of the span between them."""
        self.low, self.high = low, high
        self.margin = max(1, (high - low) // 5)

    def sample(self) -> tuple[int, int]:
        """Measure now; returns (cpu %, level).  A measurement that fails (no descriptor left
        to read /proc: EMFILE) keeps the last figures: the periodic work after it must run."""
        try:
            if self.pids is None:
                cpu = int(psutil.cpu_percent(None))
            else:
                cpu = self._process_cpu()
        except OSError as exc:
            log.warning("cannot measure this node's load (%s): its last figures are kept", exc)
            return self.cpu, self.level
        self.cpu = cpu
        self.level = self.classify(cpu, self.level)
        return cpu, self.level

    def classify(self, cpu: int, previous: int) -> int:
        if cpu >= self.high:
            return C.LVL_SATURATED
        if previous == C.LVL_SATURATED and cpu >= self.high - self.margin:
            return C.LVL_SATURATED
        if cpu < self.low:
            if previous in (C.LVL_BUSY, C.LVL_SATURATED) and cpu >= self.low - self.margin:
                return C.LVL_BUSY
            return C.LVL_IDLE
        if previous == C.LVL_IDLE and cpu < self.low + self.margin:
            return C.LVL_IDLE
        return C.LVL_BUSY

    def _process_cpu(self) -> int:
        now = time.monotonic()
        times: dict[int, float] = {}
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                times[pid] = t.user + t.system
            except psutil.Error:
                continue
        last = self._last
        self._last = (now, times)
        if last is None or now <= last[0]:
            return 0
        used = sum(t - last[1].get(pid, t) for pid, t in times.items())
        return max(0, min(100, int(100 * used / (now - last[0]))))


def _add(acts, act):
    """Collect `act` (None, a tuple or a list) into the list `acts`."""
    if act is None:
        return
    if type(act) is list:
        acts.extend(act)
    else:
        acts.append(act)


class Router:
    """The routing rule for every frame from the network and every command local processes
    address to the LB node (docs/design.md, "Router")."""

    def __init__(self, local: int, lb_node: int, group: Group | None) -> None:
        self.local = local
        self.lb_node = lb_node
        self.group = group

    def from_network(self, hbuf, f: tuple, payload, peer: int, autobind: bool):
        """A frame that arrived on the link to `peer` (`f` = its ROUTE_STRUCT fields)."""
        dnode = f[R_DNODE]
        group = self.group
        if dnode == self.local:
            if group is not None:
                act = group.reverse(hbuf, f, payload)
                if act is not None:
                    return act
            return (DELIVER, hbuf, payload, autobind)
        if dnode == self.lb_node and group is not None:
            return group.from_network(hbuf, f, payload, peer)
        return self.reply_error(hbuf, E.EDVSBADNODEID, peer)

    def from_network_run(self, block, f: tuple, n: int, peer: int, autobind: bool):
        """A run of `n` payload-less frames from the link to `peer` whose routing fields are
        all `f` (`block`: their n x 120 header bytes).  The relayed client traffic the LB host
        forwards is routed with one session lookup and one rewrite of the whole run; anything
        else frame by frame.  Returns a list of actions."""
        group = self.group
        if f[R_DNODE] == self.lb_node != self.local and group is not None:
            acts = group.from_network_run(block, f, n, peer)
            if acts is not None:
                return acts
        acts = []
        for off in range(0, n * HEADER_SIZE, HEADER_SIZE):
            _add(acts, self.from_network(block[off:off + HEADER_SIZE], f, b"", peer, autobind))
        return acts

    def from_local(self, hbuf, payload):
        """A command a local process addressed to the LB node (the get2rmt thread)."""
        if self.group is not None:
            return self.group.from_local(hbuf, payload)
        ack = error_ack(Header(bytearray(hbuf)), E.EDVSDSTDIED)
        return None if ack is None else (LOCAL, ack.buf, b"")

    def reply_error(self, hbuf, rcode: int, peer: int):
        """The error reply to a frame from the link to `peer` that cannot be routed."""
        ack = error_ack(Header(bytearray(hbuf)), rcode)
        return None if ack is None else (SEND, peer, ack.buf, None, None, False)

    def send_failed(self, request, relayed: bool, code: int):
        """A SEND action's frame was refused by its link (down or full): the error reply for
        the client whose `request` it was."""
        if request is None or self.group is None:
            return None
        return self.group.request_failed(request, relayed, code)


class Group:
    """The LB node as seen from one DSP: services, sessions, known servers and their load."""

    def __init__(self, cfg, local: int, peers: PeerView, relay_host: int | None,
                 node_pids: Callable[[], set[int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.lb = cfg.lb
        self.lb_id = self.lb.nodeid
        self.local = local
        self.peers = peers
        self.clock = clock
        self.lock = threading.Lock()
        self.sessions: dict[tuple, Session] = {}
        self.by_reverse: dict[tuple, Session] = {}
        self.per_dc: dict[int, int] = {}
        self.servers = {n.nodeid: ServerState(n.nodeid, n.name) for n in cfg.servers
                        if n.nodeid != local}
        self.max_sessions = self.lb.max_sessions
        self.session_timeout = self.lb.session_timeout
        self.relay_host = relay_host
        # translated client endpoints (relayed mode): one pool per DC, because an endpoint
        # names a process of one DC only (the same number in two DCs is two processes)
        self.lb_eps_range = self.lb.lb_eps
        self.free_lb_eps: dict[int, list[int]] = {}
        #: (dcid, slot) -> the generation the slot's next session gets (`_new_session`)
        self.lb_eps_gen: dict[tuple[int, int], int] = {}
        self._svc_cache: dict[tuple[int, int], object] = {}
        self.meter = LoadMeter(self.lb.lowwater, self.lb.highwater, node_pids)
        self.local_services = 0      # bitmap of the configured services bound on this node
        self.starting: dict[int, Session] = {}
        #: request id -> (server node, dcid, ext_ep) of starts whose session ended first
        self.abandoned: dict[int, tuple[int, int, int]] = {}
        self._req_id = 0
        self.counters = {"sessions_started": 0, "sessions_ended": 0, "errors": 0,
                         "no_server": 0, "no_service": 0, "table_full": 0,
                         "sessions_taken_back": 0, "redispatched": 0, "refused": 0}
        self._last_check = clock()
        #: The compiled code's table (dsp_proxy/fastpath.py): the relay's on the LB host,
        #: the node's own elsewhere; None without it.
        self.fast = None
        #: Local clients' sessions are handed to it too: set where the receivers put a
        #: server's session traffic themselves (the compiled deliverer) and the get2rmt
        #: thread writes the commands (`fastpath.LbPump`).
        self.fast_local = False
        #: Server node -> how many reverse keys name it; `on_reverse(node, any)` is told when
        #: a node gets its first or loses its last (the compiled deliverer leaves the frames
        #: of such a node to `reverse`).
        self.reverse_from: dict[int, int] = {}
        self.on_reverse: Callable[[int, bool], None] | None = None

    # ------------------------------------------------------------------ services and servers
    def service_for(self, dcid: int, ep: int):
        """The service a client addressing (dcid, ep) at the LB node means (cached per
        (dcid, ep); the cache is replaced when a reload replaces the config)."""
        cache = self._svc_cache
        svc = cache.get((dcid, ep))
        if svc is None:
            if len(cache) > SERVICE_CACHE_MAX:
                cache.clear()
            svc = cache[(dcid, ep)] = self.cfg.find_service(dcid, ep) or _NO_SERVICE
        return None if svc is _NO_SERVICE else svc

    def lb_eps_pool(self, dcid: int) -> list[int]:
        """The free translated endpoints of DC `dcid`, as process numbers (slots) of the
        `lb_eps` range (lock held); a session gets one with the slot's next generation."""
        pool = self.free_lb_eps.get(dcid)
        if pool is None:
            eps = self.lb_eps_range
            pool = self.free_lb_eps[dcid] = list(range(eps[0], eps[1] + 1)) if eps else []
        return pool

    def usable_servers(self, client_node: int, svc=None, exclude: int = -1) -> list[ServerState]:
        """Servers with the link up both ways, a load report received (a C server: none),
        not SATURATED, and the service not known to be missing there; never the client's own
        node (its kernel would refuse a server on the client's node); for a `prog` service
        never a C server (the program is started by the server's DSP through a control
        frame, which a C DSP neither gets nor knows)."""
        name = svc.name if svc is not None else None
        prog = svc is not None and bool(svc.prog) and svc.bind != "external"
        return [s for s in self.servers.values()
                if s.nodeid != client_node and s.nodeid != exclude
                and s.level != C.LVL_SATURATED and name not in s.services_down
                and self.is_live(s) and not (prog and self.is_c_server(s))]

    def is_live(self, s: ServerState) -> bool:
        """A server is running when both link directions are up and its first load report
        arrived; one that went DOWN must also be heard `fd_rise` times again.  At start-up
        servers are UP at once.  A C DSP never reports its load (the C daemon is built
        without GET_METRICS): it runs while its link is up (`PeerView.c_peer`), at a load
        nobody knows."""
        if not self.peers.up(s.nodeid):
            return False
        if not s.reported or s.level == C.LVL_NOTINIT:
            return self.peers.c_peer(s.nodeid)
        return not s.failed or self.peers.frames(s.nodeid) - s.rise_base >= self.lb.fd_rise - 1

    def is_c_server(self, s: ServerState) -> bool:
        """A running server whose DSP is a C DSP (never reports, never decides)."""
        return s.level == C.LVL_NOTINIT and self.is_live(s)

    def levels(self) -> dict[int, int]:
        return {n: s.level for n, s in self.servers.items() if self.is_live(s)}

    def quiet(self, nodeid: int) -> bool:
        """No session of this DSP on the server and no traffic reported by it."""
        s = self.servers.get(nodeid)
        return s is not None and s.sessions == 0 and s.activity == 0

    def choose_server(self, client_node: int, svc=None, exclude: int = -1) -> ServerState | None:
        candidates = self.usable_servers(client_node, svc, exclude)
        return self._best(candidates) if candidates else None

    @staticmethod
    def _best(candidates: list[ServerState]) -> ServerState:
        """The server a new session goes to: the lowest load level, then the fewest
        sessions, the lowest CPU, the lowest id.  A C server's unknown load counts as IDLE:
        the session count decides."""
        return min(candidates, key=lambda s: (max(s.level, C.LVL_IDLE), s.sessions, s.cpu,
                                              s.nodeid))

    # ------------------------------------------------------------------ client -> server
    def from_local(self, hbuf, payload):
        """A command a local process addressed to the LB node (the get2rmt thread)."""
        return self._forward(hbuf, ROUTE_STRUCT.unpack_from(hbuf), payload, relayed=False)

    def from_network(self, hbuf, f: tuple, payload, peer: int):
        """A command for the LB node that arrived on a link: a relayed client's.  Only the LB
        host relays, and only for the clients that reach it (the link's peer)."""
        if self.relay_host != self.local or f[R_SNODE] != peer:
            return self.error_reply(Header(bytearray(hbuf)), E.EDVSBADNODEID, True)
        return self._forward(hbuf, f, payload, relayed=True)

    def from_network_run(self, block, f: tuple, n: int, peer: int):
        """A run of `n` equal-routed payload-less commands of a relayed client
        (`Router.from_network_run`): one lookup and one rewrite for all of them when the
        client's session exists and runs; None when they must go one by one."""
        cmd, dcid, src, dst, snode, _dnode, _rcode, _length, pid, _nr, _flags = f
        if self.relay_host != self.local or snode != peer:
            return None
        svc = self.service_for(dcid, dst)
        if svc is None:
            return None
        with self.lock:
            sess = self.sessions.get((dcid, snode, src, svc.ext_ep))
            if sess is None or sess.starting or (cmd in C.REQUEST_CMDS and pid != sess.clt_pid
                                                 and pid > 0 and sess.clt_pid > 0) or not all(
                    sess.may_send(cmd, src, dst, block, off)
                    for off in range(0, n * HEADER_SIZE if cmd in C.VCOPY_CMDS else 1,
                                     HEADER_SIZE)):
                return None
            self._fast_take(sess)
            sess.last_used = self.clock()
            if cmd == C.CMD_SNDREC_MSG or cmd == C.CMD_SEND_MSG:
                sess.pending = cmd
            act = self._send_forward_run(sess, block, f, n)
            self._fast_give(sess)
            return [act]

    def _send_forward_run(self, sess: Session, block, f: tuple, n: int) -> tuple:
        """(lock held) `_send_forward` of a run of `n` payload-less commands with the same
        routing fields `f`: one copy of the run, every header rewritten with strided writes."""
        cmd, src, dst = f[R_CMD], f[R_SRC], f[R_DST]
        target = sess.to_server.get(dst)
        if target is None:
            self._map(sess, dst, dst)
            target = dst
        out = bytearray(block)
        set_run_dnode(out, n, sess.svr_node)
        set_run_flags(out, n, f[R_FLAGS] | C.FLAG_CHECK_HDR)
        swap_endpoint_run(out, n, cmd, dst, target, True)
        if sess.relayed:
            set_run_snode(out, n, self.local)
            swap_endpoint_run(out, n, cmd, src, sess.lbsvr_ep, False)
        self._count(sess, n, HEADER_SIZE * n)
        return (SEND, sess.svr_node, out, None, block if cmd in C.REQUEST_CMDS else None,
                sess.relayed)

    def _forward(self, hbuf, f: tuple, payload, relayed: bool):
        """Forward a client's command to its session's server (creating the session)."""
        cmd, dcid, src, dst, snode, _dnode, _rcode, length, pid, _nr, _flags = f
        svc = self.service_for(dcid, dst)
        if svc is None:
            self.counters["no_service"] += 1
            return self.error_reply(Header(bytearray(hbuf)), E.EDVSDSTDIED, relayed)
        key = (dcid, snode, src, svc.ext_ep)
        acts: list = []
        with self.lock:
            sess = self.sessions.get(key)
            if sess is not None:
                self._fast_take(sess)
            if sess is not None and cmd in C.REQUEST_CMDS and pid != sess.clt_pid \
                    and pid > 0 and sess.clt_pid > 0:
                log.info("session of client %d@%d: new PID %d (was %d), new session",
                         sess.clt_ep, sess.clt_node, pid, sess.clt_pid)
                self._end(sess, None, acts)
                sess = None
            if sess is None:
                if cmd not in C.REQUEST_CMDS:
                    log.debug("no session for command %#x of %d@%d: dropped", cmd, src, snode)
                    return acts or None
                sess, err = self._new_session(f, svc, relayed, acts)
                if sess is None:
                    self.counters["errors"] += 1
                    if err == E.EDVSAGAIN:
                        acts.append((NO_SERVER,))
                    _add(acts, self.error_reply(Header(bytearray(hbuf)), err, relayed))
                    return acts
                data = bytes(payload[:length]) if length else b""
                sess.first = (bytes(hbuf), data)
            if not sess.may_send(cmd, src, dst, hbuf):
                self.counters["refused"] += 1
                log.debug("session of client %d@%d: command %#x to %d names an endpoint "
                          "outside the session: refused", src, snode, cmd, dst)
                _add(acts, self.error_reply(Header(bytearray(hbuf)), E.EDVSDSTDIED, relayed))
                self._fast_give(sess)
                return acts or None
            sess.last_used = self.clock()
            if sess.starting and (len(sess.parked) >= PARKED_MAX
                                  or sess.parked_bytes + HEADER_SIZE + length > PARKED_BYTES
                                  or sess.parked and self._parked_total() + HEADER_SIZE
                                  + length > PARKED_TOTAL):
                self.counters["refused"] += 1
                log.debug("session of client %d@%d: %d frames wait for its program, "
                          "command %#x refused", src, snode, len(sess.parked), cmd)
                if cmd in C.REQUEST_CMDS:       # answered now: not the pending request
                    _add(acts, self.error_reply(Header(bytearray(hbuf)), E.EDVSAGAIN,
                                                relayed))
                return acts or None
            if cmd == C.CMD_SNDREC_MSG or cmd == C.CMD_SEND_MSG:
                sess.pending = cmd
            if sess.starting:
                sess.parked.append((bytes(hbuf), bytes(payload[:length]) if length else b""))
                sess.parked_bytes += HEADER_SIZE + length
                if len(sess.parked) == 1 and not sess.started_at:
                    sess.started_at = self.clock()
                    acts.append(self._ask_start(sess))
                return acts
            act = self._send_forward(sess, hbuf, f, payload, not relayed)
            self._fast_give(sess)
            if not acts:
                return act
            acts.append(act)
        return acts

    def _parked_total(self) -> int:
        """(lock held) Bytes parked for every starting session (only those park frames)."""
        return sum(s.parked_bytes for s in self.starting.values())

    def _send_forward(self, sess: Session, hbuf, f: tuple, payload, copy: bool = True):
        """(lock held) The SEND action of one client command in session `sess` (`f`: its
        ROUTE_STRUCT fields).  `copy` False: the payload is handed over as it is (a receiver's
        read buffer, which it leaves to the link until the frame is written)."""
        cmd, src, dst, length = f[R_CMD], f[R_SRC], f[R_DST], f[R_LEN]
        target = sess.to_server.get(dst)
        if target is None:  # another endpoint of the service's range, addressed as it is
            self._map(sess, dst, dst)
            target = dst
        out = bytearray(hbuf)
        relayed = sess.relayed
        set_route(out, self.local if relayed else f[R_SNODE], sess.svr_node,
                  f[R_FLAGS] | C.FLAG_CHECK_HDR)
        swap_endpoint(out, cmd, dst, target, True)
        if relayed:
            swap_endpoint(out, cmd, src, sess.lbsvr_ep, False)
        self._count(sess, 1, HEADER_SIZE + length)
        data = (bytes(payload[:length]) if copy else payload[:length]) if length else None
        return (SEND, sess.svr_node, out, data, hbuf if cmd in C.REQUEST_CMDS else None,
                sess.relayed)

    def _count(self, sess: Session, commands: int, nbytes: int) -> None:
        """(lock held) Client commands forwarded to the session's server: its figures and
        the server's."""
        sess.commands += commands
        sess.bytes += nbytes
        srv = self.servers.get(sess.svr_node)
        if srv is not None:
            srv.commands += commands
            srv.bytes += nbytes

    def _new_session(self, f: tuple, svc, relayed: bool, acts: list,
                     exclude: int = -1) -> tuple[Session | None, int]:
        """Pick a server and create the session (lock held); a session taken back from a
        client node over its share of a full table adds its actions to `acts`."""
        cmd, dcid, src, dst, snode, _dnode, _rcode, _length, pid, _nr, _flags = f
        room, taken = self._room(dcid, snode, relayed)
        if not room:
            self.counters["table_full"] += 1
            return None, E.EDVSNOSPC
        client = snode if not relayed else -1
        if svc.prog and svc.bind != "external":
            srv, evicted = self._program_room(dcid, snode, client, svc, exclude)
        else:
            srv, evicted = self.choose_server(client, svc, exclude), None
        if srv is None:
            log.info("no usable server for client %d@%d: %s", src, snode,
                     ", ".join(f"node {s.nodeid} {LEVEL_NAMES[s.level]}"
                               f"{'' if self.is_live(s) else ' (down)'}"
                               f"{' (service down)' if svc.name in s.services_down else ''}"
                               for s in self.servers.values()) or "none configured")
            self.counters["no_server"] += 1
            return None, E.EDVSAGAIN
        for victim, full in ((taken, f"the session table of DC {dcid}"),
                             (evicted, f"every program of service {svc.name} of DC {dcid}")):
            if victim is not None and self.sessions.get(victim.key()) is victim:
                log.warning("%s is taken: the session of client %d@%d, whose node holds more "
                            "than its share, ends for client %d@%d", full, victim.clt_ep,
                            victim.clt_node, src, snode)
                self.counters["sessions_taken_back"] += 1
                self._end(victim, E.EDVSNOSPC, acts)    # (a program stops with it)
        if relayed:
            # a slot given to a new session gets a new generation (DVS endpoints carry one
            # for this): what the server still sends to the slot's last session (a reply
            # to a request of a session that ended or was taken back) names an endpoint no
            # session has, instead of reaching this session's client as its reply
            slot = self.lb_eps_pool(dcid).pop(0)
            lbsvr_ep = C._ENDPOINT(self.lb_eps_gen.get((dcid, slot), 0), slot)
        else:
            lbsvr_ep = src
        sess = Session(dcid=dcid, clt_node=snode, clt_ep=src, clt_pid=pid, lbclt_ep=dst,
                       lbsvr_ep=lbsvr_ep, svr_node=srv.nodeid, service=svc, relayed=relayed,
                       last_used=self.clock())
        self.sessions[sess.key()] = sess
        if sess.auto_run:
            # the id travels in a 32-bit field: 1..2**32-1, never 0 (no start pending)
            self._req_id = self._req_id % 0xFFFFFFFF + 1
            sess.starting = self._req_id
            self.starting[sess.starting] = sess
        else:
            self._map(sess, dst, dst)
        self.per_dc[dcid] = self.per_dc.get(dcid, 0) + 1
        srv.sessions += 1
        self.counters["sessions_started"] += 1
        log.info("session: client %d@%d -> service %s (ep %d) on server node %d%s",
                 sess.clt_ep, sess.clt_node, svc.name, sess.lbclt_ep, sess.svr_node,
                 f" as ep {lbsvr_ep}" if relayed else "")
        return sess, 0

    def _room(self, dcid: int, client_node: int, relayed: bool) -> tuple[bool, Session | None]:
        """(lock held) Whether DC `dcid` has room for one more session of `client_node` (a
        slot of its table and, for a relayed client, a translated endpoint), and the session
        to take back for it when the table or the endpoints are full (`_share_victim`: one
        client node, a busy one or one naming endpoints it does not have, cannot keep the
        others out until its sessions time out).  A node at its share gets no room:
        EDVSNOSPC."""
        if relayed and not self.lb_eps_pool(dcid):
            eps = self.lb_eps_range
            size, only_relayed = (eps[1] - eps[0] + 1 if eps else 0), True
        elif self.per_dc.get(dcid, 0) >= self.max_sessions:
            size, only_relayed = self.max_sessions, False
        else:
            return True, None
        victim = self._share_victim([s for s in self.sessions.values() if s.dcid == dcid
                                     and (s.relayed or not only_relayed)], size, client_node)
        return victim is not None, victim

    def _program_room(self, dcid: int, client_node: int, client: int, svc,
                      exclude: int) -> tuple[ServerState | None, Session | None]:
        """(lock held) The server for a new session of `prog` service `svc` in DC `dcid`, and
        the session whose program must stop first.  A server runs at most one program per
        endpoint of the service's range, so its range is a table shared like the session
        table: servers whose range this DSP's sessions fill are skipped; when every usable
        server's is full, the programs of all of them are shared among the client nodes
        (`_share_victim`), and the session taken back frees its program on its server.
        Without this one client node's idle sessions kept a `prog` service from everybody
        else."""
        candidates = self.usable_servers(client, svc, exclude)
        if not candidates:
            return None, None
        size = svc.max_ep - svc.min_ep + 1
        on: dict[int, list[Session]] = {s.nodeid: [] for s in candidates}
        for sess in self.sessions.values():
            if sess.dcid == dcid and sess.service.name == svc.name and sess.svr_node in on:
                on[sess.svr_node].append(sess)
        free = [s for s in candidates if len(on[s.nodeid]) < size]
        if free:
            return self._best(free), None
        victim = self._share_victim([sess for held in on.values() for sess in held],
                                    size * len(candidates), client_node)
        if victim is None:
            return None, None
        return self.servers[victim.svr_node], victim

    def _share_victim(self, sessions: list[Session], size: int,
                      client_node: int) -> Session | None:
        """(lock held) A full table of `size` entries, held by `sessions`: the session that
        `client_node` takes back for a new one of its own, or None when it holds its share
        already.  Each client node holding some has a fair share, the size over the number
        of such nodes (the asking one included); a node under its share takes the least
        recently used session, idle ones first, of the node holding the most."""
        self._fast_sync()
        held: dict[int, list[Session]] = {}
        for sess in sessions:
            held.setdefault(sess.clt_node, []).append(sess)
        share = size // (len(held) + (client_node not in held))
        if not held or len(held.get(client_node, ())) >= share:
            return None
        hog = max(held, key=lambda n: len(held[n]))
        log.debug("client node %d holds %d of %d, over its share of %d", hog,
                  len(held[hog]), size, share)
        return min(held[hog], key=lambda s: (bool(s.pending or s.starting), s.last_used))

    def _map(self, sess: Session, client_side: int, server_side: int) -> None:
        """Route `client_side` (an endpoint the client addresses at the LB) to `server_side`
        on the session's server, and replies from it back (lock held)."""
        sess.to_server[client_side] = server_side
        sess.to_client[server_side] = client_side
        key = (sess.dcid, sess.lbsvr_ep, sess.svr_node, server_side)
        if key not in self.by_reverse:
            self._count_reverse(sess.svr_node, 1)
        self.by_reverse[key] = sess

    def _count_reverse(self, node: int, delta: int) -> None:
        """(lock held) One reverse key more or less for server `node`."""
        n = self.reverse_from.get(node, 0) + delta
        if n > 0:
            self.reverse_from[node] = n
        else:
            self.reverse_from.pop(node, None)
        if (n == 1 and delta > 0 or n <= 0) and self.on_reverse is not None:
            self.on_reverse(node, n > 0)

    # ------------------------------------------------------------------ server -> client
    def reverse(self, hbuf, f: tuple, payload):
        """A frame for this node: if it is a server's traffic in a session, the action that
        delivers it rewritten to come from the LB node; None when it is not."""
        cmd, dcid, src, dst, snode, _dnode, rcode, length, pid, _nr, flags = f
        with self.lock:
            sess = self.by_reverse.get((dcid, dst, snode, src))
            if sess is None:
                return None
            self._fast_take(sess)
            sess.last_used = self.clock()
            acts: list = []
            if cmd & C.MASK_ACKNOWLEDGE and rcode in SERVICE_DOWN and sess.first is not None \
                    and sess.lbclt_ep == sess.service.ext_ep:
                # only a first request to the service's own endpoint tells whether the
                # service runs there; another endpoint of its range may just be unbound
                redo = self._redispatch(sess, rcode, acts)
                if redo:
                    return acts
            if cmd in C.MSG_ACK_CMDS or cmd in C.MSG_CMDS:
                sess.first = None    # answered: the session is established
            if pid > 0 and sess.svr_pid != pid and cmd in C.MSG_CMDS:
                sess.svr_pid = pid
            if cmd in (C.CMD_SEND_MSG, C.CMD_REPLY_MSG) and sess.pending == C.CMD_SNDREC_MSG:
                sess.pending = 0    # the sendrec caller got its reply
            elif cmd in C.MSG_ACK_CMDS:
                sess.pending = 0
            out = bytearray(hbuf)
            relayed = sess.relayed
            set_route(out, self.lb_id, sess.clt_node if relayed else f[R_DNODE],
                      flags & ~C.FLAG_CHECK_HDR)
            swap_endpoint(out, cmd, src, sess.to_client.get(src, src), False)
            if relayed:           # the receiver hands its buffer over to the link
                swap_endpoint(out, cmd, sess.lbsvr_ep, sess.clt_ep, True)
                acts.append((SEND, sess.clt_node, out, payload[:length] if length else None,
                             None, True))
            else:                 # another thread delivers it: a copy
                acts.append((LOCAL, out, bytes(payload[:length]) if length else b""))
            if cmd & C.MASK_ACKNOWLEDGE and rcode in SERVER_GONE:
                self._end(sess, None, acts)   # the server endpoint died or unbound
            else:
                self._fast_give(sess)
        return acts[0] if len(acts) == 1 else acts

    def _redispatch(self, sess: Session, rcode: int, acts: list) -> bool:
        """(lock held) The server answered the session's first request with "no such
        service here": mark the service down on that server and, once per session, send the
        request to another server instead of failing it.  True when re-dispatched."""
        srv = self.servers.get(sess.svr_node)
        name = sess.service.name
        if srv is not None and name not in srv.services_down:
            srv.services_down.add(name)
            log.warning("service %s is not available on server node %d (%s): no new sessions "
                        "there until it is bound again", name, sess.svr_node,
                        E.error_name(rcode))
        if sess.redispatched or sess.auto_run:
            return False
        hbuf, data = sess.first
        f = ROUTE_STRUCT.unpack_from(hbuf)
        self._end(sess, None, acts)
        new, _err = self._new_session(f, sess.service, sess.relayed, acts,
                                      exclude=sess.svr_node)
        if new is None:
            _add(acts, self.error_reply(Header(bytearray(hbuf)), rcode, sess.relayed))
            return True
        new.redispatched = True
        new.first = (hbuf, data)
        new.pending = sess.pending
        self.counters["redispatched"] += 1
        log.info("session of client %d@%d re-dispatched to server node %d", new.clt_ep,
                 new.clt_node, new.svr_node)
        acts.append(self._send_forward(new, hbuf, f, data))
        return True

    # ------------------------------------------------------------------ the compiled relay
    def _fast_give(self, sess: Session) -> None:
        """(lock held) Hand an established session to the compiled code, which then carries
        its frames while they need no decision of the router: a relayed one to the LB host's
        relay, a local client's where `fast_local`."""
        if (self.fast is not None and sess.fast_sid < 0
                and (sess.relayed or self.fast_local) and sess.first is None
                and not sess.starting and self.sessions.get(sess.key()) is sess):
            sess.fast_sid = self.fast.give(sess)

    def _fast_take(self, sess: Session, keep: bool = False) -> None:
        """(lock held) Bring what the compiled relay did in the session into it (pending
        request, last use, counters); unless `keep`, the router carries the session again."""
        if sess.fast_sid < 0:
            return
        pending, uses, cmds, nbytes = self.fast.take(sess.fast_sid, not keep)
        if not keep:
            sess.fast_sid = -1
        sess.pending = pending
        if uses:
            sess.last_used = self.clock()
        if cmds:
            self._count(sess, cmds, nbytes)

    def _fast_sync(self) -> None:
        """(lock held) Every session's state from the compiled relay, which keeps them."""
        for sess in self.sessions.values():
            self._fast_take(sess, keep=True)

    def fast_refused(self, hbuf: bytes, code: int):
        """A frame the compiled relay rewrote for a server was refused by the link: the
        error reply the client would have had from the router's path (the frame is turned
        back into the client's request first)."""
        f = ROUTE_STRUCT.unpack_from(hbuf)
        cmd, dcid, src, dst, snode, dnode = f[:6]
        if cmd not in C.REQUEST_CMDS or snode != self.local:   # a client's, to a server
            return None
        with self.lock:
            sess = self.by_reverse.get((dcid, src, dnode, dst))
            if sess is None:
                return None
            out = bytearray(hbuf)
            set_route(out, sess.clt_node, self.lb_id, f[R_FLAGS] & ~C.FLAG_CHECK_HDR)
            swap_endpoint(out, cmd, dst, sess.to_client.get(dst, dst), True)
            swap_endpoint(out, cmd, sess.lbsvr_ep, sess.clt_ep, False)
            self._settle_pending(sess, cmd)
        return self.error_reply(Header(out), code, True)

    # ------------------------------------------------------------------ errors and endings
    def request_failed(self, request, relayed: bool, code: int):
        """A client's request (its header as the client sent it) that never reached the
        server: the error reply, and the request is no longer the session's pending one (a
        session that ends later owes that client nothing)."""
        h = Header(bytearray(request))
        svc = self.service_for(h.c_dcid, h.c_dst)
        if svc is not None:
            with self.lock:
                sess = self.sessions.get((h.c_dcid, h.c_snode, h.c_src, svc.ext_ep))
                if sess is not None:
                    self._settle_pending(sess, h.c_cmd)
        return self.error_reply(h, code, relayed)

    def _settle_pending(self, sess: Session, cmd: int) -> None:
        """(lock held) A request `cmd` of the session was answered by an error: when it is
        the pending one, nothing is pending any more (also in the compiled relay, which
        keeps the session's pending request while it carries the session)."""
        relayed = sess.fast_sid >= 0
        self._fast_take(sess)
        if sess.pending == cmd:
            sess.pending = 0
        if relayed:
            self._fast_give(sess)

    def error_reply(self, h: Header, rcode: int, relayed: bool):
        """Every error a client causes comes back to it as an ACK with the code."""
        ack = error_ack(h, rcode)
        if ack is None:
            return None
        ack.c_snode = self.lb_id
        log.debug("error %s to client %d@%d", E.error_name(rcode), h.c_src, h.c_snode)
        if relayed:
            return (SEND, h.c_snode, ack.buf, None, None, False)
        return (LOCAL, ack.buf, b"")

    def _end(self, sess: Session, rcode: int | None, acts: list) -> None:
        """Remove a session (lock held); a client still waiting gets `rcode`."""
        if self.sessions.get(sess.key()) is sess:
            del self.sessions[sess.key()]
        else:
            return
        self._fast_take(sess)
        for key in sess.reverse_keys():
            if self.by_reverse.get(key) is sess:
                del self.by_reverse[key]
                self._count_reverse(key[2], -1)
        if self.starting.pop(sess.starting, None) is sess:    # its answer may still come
            self.abandoned[sess.starting] = (sess.svr_node, sess.dcid, sess.service.ext_ep)
            if len(self.abandoned) > ABANDONED_MAX:
                del self.abandoned[next(iter(self.abandoned))]
        if sess.prog_ep >= 0:  # the program started for this session stops with it
            stop = control_message(MT_SVC_STOP, m1_i1=sess.dcid, m1_i2=sess.prog_ep,
                                   m1_p1=sess.service.ext_ep, m_source=self.local)
            acts.append((CONTROL, sess.svr_node, stop))
            sess.prog_ep = -1
        self.per_dc[sess.dcid] = max(0, self.per_dc.get(sess.dcid, 1) - 1)
        srv = self.servers.get(sess.svr_node)
        if srv is not None:
            srv.sessions = max(0, srv.sessions - 1)
        if sess.relayed:
            slot = C._ENDPOINT_P(sess.lbsvr_ep)
            gen = (sess.lbsvr_ep - slot) // C._ENDPOINT_GEN_SIZE
            self.lb_eps_gen[(sess.dcid, slot)] = (gen + 1) % LB_EP_GENERATIONS
            self.lb_eps_pool(sess.dcid).append(slot)
        self.counters["sessions_ended"] += 1
        if rcode is not None and sess.pending:
            req = Header()
            req.c_cmd, req.c_dcid = sess.pending, sess.dcid
            req.c_src, req.c_dst = sess.clt_ep, sess.lbclt_ep
            req.c_snode, req.c_dnode = sess.clt_node, self.lb_id
            _add(acts, self.error_reply(req, rcode, sess.relayed))
            sess.pending = 0
        log.info("session ended: client %d@%d, server node %d%s", sess.clt_ep, sess.clt_node,
                 sess.svr_node, f" ({E.error_name(rcode)})" if rcode is not None else "")

    def reload(self, cfg) -> list:
        """SIGHUP: services, thresholds, timers and the set of servers change live."""
        lb = cfg.lb
        servers = {n.nodeid: n for n in cfg.servers if n.nodeid != self.local}
        acts: list = []
        for nid in [nid for nid in self.servers if nid not in servers]:
            _add(acts, self.server_down(nid))
        with self.lock:
            for sess in self.sessions.values():   # the services may change: the router
                self._fast_take(sess)              # sees every frame until it hands over again
            self.cfg, self.lb = cfg, lb
            self._svc_cache = {}
            self.max_sessions = lb.max_sessions
            self.session_timeout = lb.session_timeout
            self.meter.set_thresholds(lb.lowwater, lb.highwater)
            for nid in [nid for nid in self.servers if nid not in servers]:
                self.servers.pop(nid, None)
            for nid, node in servers.items():
                if nid not in self.servers:
                    self.servers[nid] = ServerState(nid, node.name)
                else:
                    self.servers[nid].name = node.name
        return acts

    def server_down(self, nodeid: int) -> list:
        """A server failed: its sessions end and their waiting clients get EDVSNOTCONN."""
        acts: list = []
        with self.lock:
            srv = self.servers.get(nodeid)
            if srv is not None:
                srv.level, srv.reported, srv.rise_base = C.LVL_NOTINIT, 0.0, -1
                srv.failed = True
            for sess in [s for s in self.sessions.values() if s.svr_node == nodeid]:
                self._end(sess, E.EDVSNOTCONN, acts)
        return acts

    def client_gone(self, dcid: int, clt_ep: int) -> list:
        """The local client endpoint was unbound (or rebound by another process): its
        sessions end (the main loop polls the bindings of local clients)."""
        acts: list = []
        with self.lock:
            for sess in [s for s in self.sessions.values()
                         if s.dcid == dcid and s.clt_ep == clt_ep and not s.relayed
                         and s.clt_node == self.local]:
                self._end(sess, None, acts)
        return acts

    def local_clients(self) -> list[tuple[int, int, int]]:
        """(dcid, endpoint, pid) of the local clients with sessions, for the binding poll."""
        with self.lock:
            return [(s.dcid, s.clt_ep, s.clt_pid) for s in self.sessions.values()
                    if not s.relayed and s.clt_node == self.local]

    def tick(self) -> list:
        """Every tick of the main loop: expire idle sessions and programs that never
        started."""
        acts: list = []
        with self.lock:
            self._fast_sync()
            now = self.clock()
            for sess in list(self.sessions.values()):
                if now - sess.last_used > self.session_timeout:
                    self._end(sess, E.EDVSTIMEDOUT, acts)
                elif sess.starting and sess.started_at and \
                        now - sess.started_at > START_PATIENCE:
                    log.warning("service %s: no program started on node %d", sess.service.name,
                                sess.svr_node)
                    self._end(sess, E.EDVSAGAIN, acts)
        return acts

    # ------------------------------------------------------------------ load and control
    def sample_load(self) -> None:
        cpu, level = self.meter.sample()
        log.debug("load: cpu %d%% level %s", cpu, LEVEL_NAMES[level])

    def load_report(self, activity: int) -> bytes:
        """The body of this node's load report."""
        return control_message(MT_LOAD_REPORT, m_source=self.local, m1_i1=self.meter.cpu,
                               m1_i2=self.meter.level, m1_i3=self.lb.period,
                               m1_p1=max(0, activity), m1_p2=self.local_services)

    def services_bitmap(self, bound: Callable[[object], bool]) -> int:
        """Bitmap of the configured services for which `bound(service)` holds (prog services
        count as available: their programs are started on demand)."""
        bits = 0
        for i, svc in enumerate(self.cfg.services[:32]):
            if (svc.prog and svc.bind != "external") or bound(svc):
                bits |= 1 << i
        return bits

    def on_control(self, peer: int, m: Message):
        """A control message from an announced DSP peer."""
        if m.m_type == MT_LOAD_REPORT and m.m_source == peer:
            self._load_report(peer, m)
            return None
        if m.m_type == MT_SVC_START | C.MT_ACKNOWLEDGE:
            return self._started(peer, m.m1_p2, m.m1_i1)
        return None

    def _load_report(self, peer: int, m: Message) -> None:
        cpu, level = m.m1_i1, m.m1_i2
        if level not in LEVEL_NAMES or level == C.LVL_NOTINIT:
            return
        with self.lock:
            srv = self.servers.get(peer)
            if srv is None:
                return
            if level != srv.level:
                log.info("server node %d load level %s -> %s (cpu %d%%)", srv.nodeid,
                         LEVEL_NAMES[srv.level], LEVEL_NAMES[level], cpu)
            if not srv.reported:
                srv.rise_base = self.peers.frames(peer)
            srv.cpu, srv.level, srv.reported = cpu, level, self.clock()
            srv.activity = m.m1_p1
            bits = m.m1_p2
            for i, svc in enumerate(self.cfg.services[:32]):
                if bits & (1 << i) and svc.name in srv.services_down:
                    srv.services_down.discard(svc.name)
                    log.info("service %s is bound on server node %d again", svc.name, peer)

    def _ask_start(self, sess: Session) -> tuple:
        """Ask the server's DSP to start the service's program for this session."""
        clt_node = self.local if sess.relayed else sess.clt_node
        body = control_message(MT_SVC_START, m1_i1=sess.dcid, m1_i2=sess.lbsvr_ep,
                               m1_i3=clt_node, m1_p1=sess.service.ext_ep,
                               m1_p2=sess.starting, m_source=self.local)
        return (CONTROL, sess.svr_node, body)

    def _started(self, node: int, req: int, result: int) -> list:
        """The server's answer: forward the parked frames to the program, or fail them."""
        acts: list = []
        with self.lock:
            sess = self.starting.get(req)
            if sess is None or sess.svr_node != node:    # not a start this node was asked for
                gone = self.abandoned.get(req)
                if gone is not None and gone[0] == node:
                    del self.abandoned[req]
                    if result >= 0:         # a program for a session that ended: stop it
                        acts.append((CONTROL, node, control_message(
                            MT_SVC_STOP, m1_i1=gone[1], m1_i2=result, m1_p1=gone[2],
                            m_source=self.local)))
                return acts
            del self.starting[req]
            sess.starting = 0
            if result < 0:
                log.warning("service %s: node %d could not start a program: %s",
                            sess.service.name, node, E.error_name(result))
                self._end(sess, E.EDVSAGAIN, acts)
                return acts
            sess.prog_ep = result
            self._map(sess, sess.lbclt_ep, result)
            parked, sess.parked, sess.parked_bytes = sess.parked, [], 0
            for hbuf, data in parked:
                acts.append(self._send_forward(sess, hbuf, ROUTE_STRUCT.unpack_from(hbuf), data))
        return acts

    def start_failed(self, node: int, req: int) -> list:
        """The start request could not be sent to the server."""
        return self._started(node, req, E.EDVSNOTCONN)

    def snapshot(self) -> dict:
        """Figures for the statistics and the demo summary."""
        with self.lock:
            self._fast_sync()
            return {
                "sessions": [
                    {"dcid": s.dcid, "client": f"{s.clt_ep}@{s.clt_node}",
                     "service": s.service.name,
                     "server": f"{s.to_server.get(s.lbclt_ep, '?')}@{s.svr_node}",
                     "relayed": s.relayed, "commands": s.commands, "bytes": s.bytes}
                    for s in self.sessions.values()],
                "servers": {n: {"name": s.name, "cpu": s.cpu, "level": LEVEL_NAMES[s.level],
                                "live": self.is_live(s), "sessions": s.sessions,
                                "activity": s.activity,
                                "commands": s.commands, "bytes": s.bytes,
                                "services_down": sorted(s.services_down)}
                            for n, s in self.servers.items()},
                "load": {"cpu": self.meter.cpu, "level": LEVEL_NAMES[self.meter.level]},
                "sessions_per_dc": {dc: n for dc, n in self.per_dc.items() if n},
                "fast_sessions": sum(1 for s in self.sessions.values() if s.fast_sid >= 0),
                **self.counters,
            }
