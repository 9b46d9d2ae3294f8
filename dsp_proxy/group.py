"""The virtual load-balancer node: services, sessions, server choice, header rewriting.

Clients address a service at (LB node, ext_ep).  The DSP that receives the request pins the
client's session to one server and rewrites headers both ways (ARCHITECTURE §5):

- local-client sessions: the client runs on this node; its requests come out of the LB pair
  (`from_local`) and go to the server with `c_dnode`/`c_dst` rewritten and CHECK_HDR set; the
  server replies to the client's real node, where `reverse()` rewrites them to come from
  (LB node, ext_ep) and hands them to the put2lcl thread (D1).
- relayed sessions (D13): a client node whose lb block `cltname` names an LB host H reaches the
  LB node through H.  H forwards with `c_snode = H` and the client endpoint translated into the
  `lb_eps` range, so equal endpoints on two client nodes do not collide on a server.

Load: every node measures its CPU every `period` (`LoadMeter`) and reports it on every link
(D11); a server is usable when both link directions are up, its first report arrived and it is
not SATURATED.  Choice: lowest level, then fewest active sessions, then lowest CPU.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field

import psutil

from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.wire import Header, Message

from .elastic import MT_SVC_START, MT_SVC_STOP, control_message
from .rproxy import error_ack

log = logging.getLogger("dsp.group")

#: m_type of the load report carried in a HELLO body (D11): m1_i1 cpu %, m1_i2 level,
#: m1_i3 period (s), m_source the reporting node.
MT_LOAD_REPORT = C.MT_LOAD_LEVEL
#: How long a session waits for the server's DSP to start its program (5 s bind + slack).
START_PATIENCE = 8.0
REQUESTS = frozenset({C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_NTFY_MSG})
MESSAGE_CMDS = frozenset({C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG, C.CMD_NTFY_MSG})
#: Error ACKs from a server's kernel that mean the server endpoint is gone (D8).
SERVER_GONE = frozenset({E.EDVSDSTDIED, E.EDVSSRCDIED, E.EDVSDEADSRCDST, E.EDVSNOTBIND})
LEVEL_NAMES = {C.LVL_NOTINIT: "NOTINIT", C.LVL_IDLE: "IDLE", C.LVL_BUSY: "BUSY",
               C.LVL_SATURATED: "SATURATED"}
#: Commands whose vcopy sub-header names endpoints (rewritten with c_src/c_dst).
VCOPY_CMDS = frozenset({C.CMD_COPYIN_DATA, C.CMD_COPYOUT_RQST, C.CMD_COPYLCL_RQST,
                        C.CMD_COPYRMT_RQST, C.CMD_COPYIN_RQST, C.CMD_COPYIN_ACK,
                        C.CMD_COPYOUT_DATA, C.CMD_COPYLCL_ACK, C.CMD_COPYRMT_ACK})
ACK_CMDS = frozenset({C.CMD_SEND_ACK, C.CMD_SNDREC_ACK})
#: Header offsets used by the buffer-level fast path (i386 cmd_t, dvk_abi.md §2.3).
_SRC, _DST, _SNODE, _DNODE, _FLAGS, _M_SOURCE = 8, 12, 16, 20, 40, 60
_V_SRC, _V_DST, _V_RQTR = 96, 100, 104
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_V3 = struct.Struct("<3i")
#: Entries of the (dcid, endpoint) -> service cache before it is cleared (bounded memory).
SERVICE_CACHE_MAX = 4096
_NO_SERVICE = object()


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
    messages: int = 0
    bytes: int = 0
    to_server: dict = field(default_factory=dict)   # endpoint the client addressed -> server's
    to_client: dict = field(default_factory=dict)   # server endpoint -> what the client sees
    starting: int = 0        # request id while a prog service is being started for it
    started_at: float = 0.0
    parked: list = field(default_factory=list)      # frames waiting for the program's bind
    prog_ep: int = -1        # endpoint of the program started for this session

    def key(self) -> tuple:
        return (self.dcid, self.clt_node, self.clt_ep, self.service.ext_ep)

    def reverse_keys(self) -> list[tuple]:
        return [(self.dcid, self.lbsvr_ep, self.svr_node, ep) for ep in self.to_client]

    @property
    def auto_run(self) -> bool:
        """A `prog` service: the LB starts one program per session (lb_policies §4.5)."""
        return bool(self.service.prog) and self.service.bind != "external"


@dataclass
class ServerState:
    """What this DSP knows about one server node."""

    nodeid: int
    name: str
    cpu: int = 0
    level: int = C.LVL_NOTINIT
    reported: float = 0.0
    sessions: int = 0
    messages: int = 0
    bytes: int = 0
    errors: int = 0
    activity: int = 0        # commands its DSP moved in its last report period
    rise_base: int = -1      # link frame count at its first report after the link came up
    failed: bool = False     # went DOWN since the DSP started: it must rise again


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
        """Measure now; returns (cpu %, level)."""
        if self.pids is None:
            cpu = int(psutil.cpu_percent(None))
        else:
            cpu = self._process_cpu()
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


class Group:
    """The LB node as seen from one DSP: services, sessions, known servers and their load."""

    def __init__(self, dsp) -> None:
        self.dsp = dsp
        self.cfg = dsp.cfg
        self.lb = dsp.cfg.lb
        self.lb_id = self.lb.nodeid
        self.local = dsp.local
        self.lock = threading.Lock()
        self.sessions: dict[tuple, Session] = {}
        self.by_reverse: dict[tuple, Session] = {}
        self.per_dc: dict[int, int] = {}
        self.servers = {n.nodeid: ServerState(n.nodeid, n.name) for n in self.cfg.servers
                        if n.nodeid != self.local}
        self.max_sessions = self.lb.max_sessions
        self.session_timeout = self.lb.session_timeout
        self.relay_host = dsp.relay_host
        # translated client endpoints (relayed mode): one pool per DC, because an endpoint
        # names a process of one DC only (the same number in two DCs is two processes)
        self.lb_eps_range = self.lb.lb_eps
        self.free_lb_eps: dict[int, list[int]] = {}
        self._svc_cache: dict[tuple[int, int], object] = {}
        self._svc_cfg = None
        self.meter = LoadMeter(self.lb.lowwater, self.lb.highwater, dsp.node_pids)
        self._outbox: list[tuple[Header, bool]] = []
        self._controls: list[tuple[int, bytes]] = []
        self.starting: dict[int, Session] = {}
        self._req_id = 0
        self.counters = {"sessions_started": 0, "sessions_ended": 0, "errors": 0,
                         "no_server": 0, "no_service": 0, "table_full": 0}
        self._last_check = time.monotonic()

    # ------------------------------------------------------------------ services and servers
    def service_for(self, dcid: int, ep: int):
        """The service a client addressing (dcid, ep) at the LB node means (cached per
        (dcid, ep); the cache is dropped when a reload replaces the config)."""
        cache = self._svc_cache
        if self._svc_cfg is not self.cfg or len(cache) > SERVICE_CACHE_MAX:
            cache.clear()
            self._svc_cfg = self.cfg
        svc = cache.get((dcid, ep))
        if svc is None:
            svc = cache[(dcid, ep)] = self._find_service(dcid, ep) or _NO_SERVICE
        return None if svc is _NO_SERVICE else svc

    def lb_eps_pool(self, dcid: int) -> list[int]:
        """The free translated endpoints of DC `dcid` (lock held)."""
        pool = self.free_lb_eps.get(dcid)
        if pool is None:
            eps = self.lb_eps_range
            pool = self.free_lb_eps[dcid] = list(range(eps[0], eps[1] + 1)) if eps else []
        return pool

    def _find_service(self, dcid: int, ep: int):
        for svc in self.cfg.services:
            if svc.dcid not in (-1, dcid):
                continue
            if ep == svc.ext_ep or svc.min_ep <= ep <= svc.max_ep:
                return svc
        return None

    def usable_servers(self, client_node: int) -> list[ServerState]:
        """Servers with the link up both ways, a load report received, not SATURATED; never the
        client's own node (the kernel refuses that, D1)."""
        return [s for s in self.servers.values()
                if s.nodeid != client_node and s.level != C.LVL_SATURATED and self.is_live(s)]

    def is_live(self, s: ServerState) -> bool:
        """D11: a server is running when both link directions are up and its first load
        report arrived; one that went DOWN must also be heard `fd_rise` times again (UP after
        fd_rise good ones), as HAProxy's rise.  At start-up servers are UP at once."""
        link = self.dsp.links.get(s.nodeid)
        if link is None or not link.up or not s.reported or s.level == C.LVL_NOTINIT:
            return False
        return not s.failed or link.received.frames - s.rise_base >= self.lb.fd_rise - 1

    def levels(self) -> dict[int, int]:
        return {n: s.level for n, s in self.servers.items() if self.is_live(s)}

    def quiet(self, nodeid: int) -> bool:
        """No session of this DSP on the server and no traffic reported by it."""
        s = self.servers.get(nodeid)
        return s is not None and s.sessions == 0 and s.activity == 0

    def choose_server(self, client_node: int) -> ServerState | None:
        candidates = self.usable_servers(client_node)
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.level, s.sessions, s.cpu, s.nodeid))

    # ------------------------------------------------------------------ client -> server
    def from_local(self, h: Header, payload: bytes) -> None:
        """A command a local process addressed to the LB node (the get2rmt thread)."""
        self._forward(h, payload, relayed=False)

    def from_network(self, h: Header, payload, link) -> None:
        """A command for the LB node that arrived on a link: a relayed client (D13)."""
        if self.relay_host != self.local:
            self._reply_error(h, E.EDVSBADNODEID, relayed=True)
            return
        self._forward(h, bytes(payload[:h.c_len]), relayed=True)

    def fast_path(self, hbuf, f: tuple, payload) -> bool:
        """RPROXY's per-frame path on the raw header (`f` = its ROUTE_STRUCT fields, no
        Header object): a server's traffic in a session, or a relayed client's command in an
        established session.  False when the frame needs the full path (nothing was done)."""
        dnode = f[5]
        if dnode == self.local:
            return self._reverse_buf(hbuf, f, payload)
        if dnode == self.lb_id and self.relay_host == self.local:
            return self._forward_fast(hbuf, f, payload, True)
        return False

    def _forward_fast(self, hbuf, f: tuple, payload, relayed: bool) -> bool:
        """A command in an established session whose endpoint is mapped and whose server's
        link is up: rewrite a copy of the header with struct and queue it on the link, without
        the session lock (dict reads are atomic; the slow path below creates, restarts and
        parks sessions under the lock).  False, with nothing done, in every other case."""
        cmd, dcid, src, dst, snode, _dnode, _rcode, length, pid = f[:9]
        svc = self.service_for(dcid, dst)
        if svc is None:
            return False
        sess = self.sessions.get((dcid, snode, src, svc.ext_ep))
        if sess is None or sess.starting:
            return False
        if cmd in REQUESTS and pid != sess.clt_pid and pid > 0 and sess.clt_pid > 0:
            return False
        target = sess.to_server.get(dst)
        if target is None:
            return False
        link = self.dsp.links.get(sess.svr_node)
        if link is None or not link.up:
            return False
        sess.last_used = time.monotonic()
        if cmd == C.CMD_SNDREC_MSG or cmd == C.CMD_SEND_MSG:
            sess.pending = cmd
        out = bytearray(hbuf)
        _I32.pack_into(out, _DNODE, sess.svr_node)
        _U32.pack_into(out, _FLAGS, f[10] | C.FLAG_CHECK_HDR)
        _swap_buf(out, cmd, dst, target, True)
        if sess.relayed:
            _I32.pack_into(out, _SNODE, self.local)
            _swap_buf(out, cmd, src, sess.lbsvr_ep, False)
        data = bytes(payload[:length]) if length else None
        if not link.submit(out, data, copy=False):
            self._reply_error(Header(bytearray(hbuf)), E.EDVSNOTCONN, relayed)
            return True
        n = 120 + length
        sess.messages += 1
        sess.bytes += n
        srv = self.servers.get(sess.svr_node)
        if srv is not None:
            srv.messages += 1
            srv.bytes += n
        return True

    def _forward(self, h: Header, payload: bytes, relayed: bool) -> None:
        if self._forward_fast(h.buf, h.route(), payload, relayed):
            return
        cmd = h.c_cmd
        svc = self.service_for(h.c_dcid, h.c_dst)
        if svc is None:
            self.counters["no_service"] += 1
            self._reply_error(h, E.EDVSDSTDIED, relayed)
            return
        key = (h.c_dcid, h.c_snode, h.c_src, svc.ext_ep)
        with self.lock:
            sess = self.sessions.get(key)
            if sess is not None and cmd in REQUESTS and h.c_pid != sess.clt_pid \
                    and h.c_pid > 0 and sess.clt_pid > 0:
                log.info("session of client %d@%d: new PID %d (was %d), new session",
                         sess.clt_ep, sess.clt_node, h.c_pid, sess.clt_pid)
                self._end(sess, None)
                sess = None
            if sess is None:
                if cmd not in REQUESTS:
                    log.debug("no session for %r: dropped", h)
                    return
                sess, err = self._new_session(h, svc, relayed)
                if sess is None:
                    self.counters["errors"] += 1
        if sess is None:
            self._reply_error(h, err, relayed)
            return
        sess.last_used = time.monotonic()
        if cmd in (C.CMD_SNDREC_MSG, C.CMD_SEND_MSG):
            sess.pending = cmd
        if sess.starting:
            with self.lock:
                sess.parked.append((h.copy(), payload))
                first = len(sess.parked) == 1 and not sess.started_at
                if first:
                    sess.started_at = time.monotonic()
            if first:
                self._ask_start(sess)
            return
        self._send_forward(sess, h, payload, relayed)

    def _send_forward(self, sess: Session, h: Header, payload: bytes, relayed: bool) -> None:
        out = self._rewrite_forward(h, sess)
        if not self.dsp.send_to_node(sess.svr_node, out, payload):
            self._reply_error(h, E.EDVSNOTCONN, relayed)
            return
        srv = self.servers.get(sess.svr_node)
        sess.messages += 1
        sess.bytes += 120 + h.c_len
        if srv is not None:
            srv.messages += 1
            srv.bytes += 120 + h.c_len

    def _new_session(self, h: Header, svc, relayed: bool) -> tuple[Session | None, int]:
        """Pick a server and create the session (lock held)."""
        if self.per_dc.get(h.c_dcid, 0) >= self.max_sessions:
            self.counters["table_full"] += 1
            return None, E.EDVSNOSPC
        srv = self.choose_server(h.c_snode if not relayed else -1)
        if srv is None:
            log.info("no usable server for client %d@%d: %s", h.c_src, h.c_snode,
                     ", ".join(f"node {s.nodeid} {LEVEL_NAMES[s.level]}"
                               f"{'' if self.is_live(s) else ' (down)'}"
                               for s in self.servers.values()) or "none configured")
            self.counters["no_server"] += 1
            self.dsp.on_no_server()
            return None, E.EDVSAGAIN
        lbsvr_ep = h.c_src
        if relayed:
            pool = self.lb_eps_pool(h.c_dcid)
            if not pool:
                self.counters["table_full"] += 1
                return None, E.EDVSNOSPC
            lbsvr_ep = pool.pop(0)
        sess = Session(dcid=h.c_dcid, clt_node=h.c_snode, clt_ep=h.c_src, clt_pid=h.c_pid,
                       lbclt_ep=h.c_dst, lbsvr_ep=lbsvr_ep, svr_node=srv.nodeid,
                       service=svc, relayed=relayed)
        self.sessions[sess.key()] = sess
        if sess.auto_run:
            self._req_id += 1
            sess.starting = self._req_id
            self.starting[sess.starting] = sess
        else:
            self._map(sess, h.c_dst, h.c_dst)
        self.per_dc[h.c_dcid] = self.per_dc.get(h.c_dcid, 0) + 1
        srv.sessions += 1
        self.counters["sessions_started"] += 1
        log.info("session: client %d@%d -> service %s (ep %d) on server node %d%s",
                 sess.clt_ep, sess.clt_node, svc.name, sess.lbclt_ep, sess.svr_node,
                 f" as ep {lbsvr_ep}" if relayed else "")
        return sess, 0

    def _map(self, sess: Session, client_side: int, server_side: int) -> None:
        """Route `client_side` (an endpoint the client addresses at the LB) to `server_side`
        on the session's server, and replies from it back (lock held)."""
        sess.to_server[client_side] = server_side
        sess.to_client[server_side] = client_side
        self.by_reverse[(sess.dcid, sess.lbsvr_ep, sess.svr_node, server_side)] = sess

    def _rewrite_forward(self, h: Header, sess: Session) -> Header:
        out = h.copy()
        out.c_dnode = sess.svr_node
        out.c_flags |= C.FLAG_CHECK_HDR
        target = sess.to_server.get(h.c_dst)
        if target is None:  # another endpoint of the service's range, addressed as it is
            with self.lock:
                self._map(sess, h.c_dst, h.c_dst)
            target = h.c_dst
        _swap_eps(out, h.c_dst, target, dst_field=True)
        if sess.relayed:
            out.c_snode = self.local
            _swap_eps(out, h.c_src, sess.lbsvr_ep, dst_field=False)
        return out

    # ------------------------------------------------------------------ server -> client
    def reverse(self, h: Header, payload, link) -> bool:
        """A frame for this node: if it is a server's traffic in a session, rewrite it to come
        from the LB node and deliver it to the client (True); else False."""
        return self._reverse_buf(h.buf, h.route(), payload)

    def _reverse_buf(self, hbuf, f: tuple, payload) -> bool:
        """`reverse` on the raw header (`f` = its ROUTE_STRUCT fields); a copy is rewritten."""
        cmd, dcid, src, dst, snode, _dnode, rcode, length, pid = f[:9]
        sess = self.by_reverse.get((dcid, dst, snode, src))
        if sess is None:
            return False
        sess.last_used = time.monotonic()
        if pid > 0 and sess.svr_pid != pid and cmd in MESSAGE_CMDS:
            sess.svr_pid = pid
        if cmd == C.CMD_SEND_MSG and sess.pending == C.CMD_SNDREC_MSG:
            sess.pending = 0
        elif cmd in ACK_CMDS:
            sess.pending = 0
        out = bytearray(hbuf)
        _I32.pack_into(out, _SNODE, self.lb_id)
        _U32.pack_into(out, _FLAGS, f[10] & ~C.FLAG_CHECK_HDR)
        _swap_buf(out, cmd, src, sess.to_client.get(src, src), False)
        data = bytes(payload[:length]) if length else b""
        if sess.relayed:
            _I32.pack_into(out, _DNODE, sess.clt_node)
            _swap_buf(out, cmd, sess.lbsvr_ep, sess.clt_ep, True)
            link = self.dsp.links.get(sess.clt_node)
            if link is not None and link.up:
                link.submit(out, data or None, copy=False)
            else:
                self.dsp.send_to_node(sess.clt_node, Header(out), data)
        else:
            self.dsp.put2lcl.put(Header(out), data)
        if cmd & C.MASK_ACKNOWLEDGE and rcode in SERVER_GONE:
            with self.lock:  # the server endpoint died or unbound: the session is over
                self._end(sess, None)
        return True

    # ------------------------------------------------------------------ errors and endings
    def _reply_error(self, h: Header, rcode: int, relayed: bool) -> None:
        """Every error a client causes comes back to it as an ACK with the code (§5)."""
        ack = error_ack(h, rcode)
        if ack is None:
            return
        ack.c_snode = self.lb_id
        log.debug("error %s to client %d@%d", E.error_name(rcode), h.c_src, h.c_snode)
        if relayed:
            self.dsp.send_to_node(h.c_snode, ack)
        else:
            self.dsp.put2lcl.put(ack)

    def _end(self, sess: Session, rcode: int | None) -> None:
        """Remove a session (lock held); a client still waiting gets `rcode`."""
        if self.sessions.get(sess.key()) is sess:
            del self.sessions[sess.key()]
        for key in sess.reverse_keys():
            if self.by_reverse.get(key) is sess:
                del self.by_reverse[key]
        self.starting.pop(sess.starting, None)
        if sess.prog_ep >= 0:  # the program started for this session stops with it
            stop = control_message(MT_SVC_STOP, m1_i1=sess.dcid, m1_i2=sess.prog_ep,
                                   m1_p1=sess.service.ext_ep, m_source=self.local)
            self._controls.append((sess.svr_node, stop))
            sess.prog_ep = -1
        self.per_dc[sess.dcid] = max(0, self.per_dc.get(sess.dcid, 1) - 1)
        srv = self.servers.get(sess.svr_node)
        if srv is not None:
            srv.sessions = max(0, srv.sessions - 1)
        if sess.relayed:
            self.lb_eps_pool(sess.dcid).append(sess.lbsvr_ep)
        self.counters["sessions_ended"] += 1
        if rcode is not None and sess.pending:
            req = Header()
            req.c_cmd, req.c_dcid = sess.pending, sess.dcid
            req.c_src, req.c_dst = sess.clt_ep, sess.lbclt_ep
            req.c_snode, req.c_dnode = sess.clt_node, self.lb_id
            ack = error_ack(req, rcode)
            ack.c_snode = self.lb_id
            self._outbox.append((ack, sess.relayed))
            sess.pending = 0
        log.info("session ended: client %d@%d, server node %d%s", sess.clt_ep, sess.clt_node,
                 sess.svr_node, f" ({E.error_name(rcode)})" if rcode is not None else "")

    def _flush(self) -> None:
        """Send the error replies queued while the session lock was held (never send under
        the lock: a failing link calls back into the group)."""
        with self.lock:
            out, self._outbox = self._outbox, []
            controls, self._controls = self._controls, []
        for ack, relayed in out:
            if relayed:
                self.dsp.send_to_node(ack.c_dnode, ack)
            else:
                self.dsp.put2lcl.put(ack)
        for node, body in controls:
            self.dsp.send_control(node, body)

    def reload(self, cfg) -> None:
        """SIGHUP: services, thresholds, timers and the set of servers change live."""
        lb = cfg.lb
        servers = {n.nodeid: n for n in cfg.servers if n.nodeid != self.local}
        gone = [nid for nid in self.servers if nid not in servers]
        for nid in gone:
            self.server_down(nid)
        with self.lock:
            self.cfg, self.lb = cfg, lb
            self.max_sessions = lb.max_sessions
            self.session_timeout = lb.session_timeout
            self.meter.set_thresholds(lb.lowwater, lb.highwater)
            for nid in gone:
                self.servers.pop(nid, None)
            for nid, node in servers.items():
                if nid not in self.servers:
                    self.servers[nid] = ServerState(nid, node.name)
                else:
                    self.servers[nid].name = node.name

    def server_down(self, nodeid: int) -> None:
        """A server failed: its sessions end and their waiting clients get EDVSNOTCONN."""
        with self.lock:
            srv = self.servers.get(nodeid)
            if srv is not None:
                srv.level, srv.reported, srv.rise_base = C.LVL_NOTINIT, 0.0, -1
                srv.failed = True
            for sess in [s for s in self.sessions.values() if s.svr_node == nodeid]:
                self._end(sess, E.EDVSNOTCONN)
        self._flush()

    def tick(self) -> None:
        """Every second: expire idle sessions and those whose client unbound."""
        now = time.monotonic()
        with self.lock:
            for sess in list(self.sessions.values()):
                if now - sess.last_used > self.session_timeout:
                    self._end(sess, E.EDVSTIMEDOUT)
                elif sess.starting and sess.started_at and \
                        now - sess.started_at > START_PATIENCE:
                    log.warning("service %s: no program started on node %d", sess.service.name,
                                sess.svr_node)
                    self._end(sess, E.EDVSAGAIN)
        self._flush()
        if now - self._last_check >= min(self.lb.period, 5):
            self._last_check = now
            self._check_clients()

    def _check_clients(self) -> None:
        """D8: a session whose local client endpoint was unbound (or rebound by another
        process) ends."""
        for sess in list(self.sessions.values()):
            if sess.relayed or sess.clt_node != self.local:
                continue
            try:
                info = self.dsp.dvk.getprocinfo(sess.dcid, sess.clt_ep)
                gone = bool(info.p_rts_flags & C.SLOT_FREE) or (
                    sess.clt_pid > 0 and info.p_lpid != sess.clt_pid)
            except E.DvkError as err:
                gone = err.code in (E.EDVSNOTBIND, E.EDVSDSTDIED)
            if gone:
                with self.lock:
                    self._end(sess, None)
                self._flush()

    # ------------------------------------------------------------------ load
    def sample_load(self) -> None:
        cpu, level = self.meter.sample()
        log.debug("load: cpu %d%% level %s", cpu, LEVEL_NAMES[level])

    def load_report(self) -> bytes:
        m = Message()
        m.m_source = self.local
        m.m_type = MT_LOAD_REPORT
        m.m1_i1, m.m1_i2, m.m1_i3 = self.meter.cpu, self.meter.level, self.lb.period
        m.m1_p1 = self.dsp.activity()
        return bytes(m)

    def on_control(self, link, h: Header) -> None:
        m = h.c_msg
        if m.m_type == MT_LOAD_REPORT and m.m_source == link.peer:
            srv = self.servers.get(link.peer)
            if srv is None:
                return
            cpu, level = m.m1_i1, m.m1_i2
            if level not in LEVEL_NAMES or level == C.LVL_NOTINIT:
                return
            if level != srv.level:
                log.info("server node %d load level %s -> %s (cpu %d%%)", srv.nodeid,
                         LEVEL_NAMES[srv.level], LEVEL_NAMES[level], cpu)
            if not srv.reported:
                srv.rise_base = link.received.frames
            srv.cpu, srv.level, srv.reported = cpu, level, time.monotonic()
            srv.activity = m.m1_p1
        elif m.m_type == MT_SVC_START | C.MT_ACKNOWLEDGE:
            self._started(link.peer, m.m1_p2, m.m1_i1)

    def _ask_start(self, sess: Session) -> None:
        """Ask the server's DSP to start the service's program for this session (D12)."""
        clt_node = self.local if sess.relayed else sess.clt_node
        body = control_message(MT_SVC_START, m1_i1=sess.dcid, m1_i2=sess.lbsvr_ep,
                               m1_i3=clt_node, m1_p1=sess.service.ext_ep,
                               m1_p2=sess.starting, m_source=self.local)
        if not self.dsp.send_control(sess.svr_node, body):
            self._started(sess.svr_node, sess.starting, E.EDVSNOTCONN)

    def _started(self, node: int, req: int, result: int) -> None:
        """The server's answer: forward the parked frames to the program, or fail them."""
        with self.lock:
            sess = self.starting.pop(req, None)
            if sess is None or sess.svr_node != node:
                return
            sess.starting = 0
            if result < 0:
                log.warning("service %s: node %d could not start a program: %s",
                            sess.service.name, node, E.error_name(result))
                self._end(sess, E.EDVSAGAIN)
                parked = []
            else:
                sess.prog_ep = result
                self._map(sess, sess.lbclt_ep, result)
                parked, sess.parked = sess.parked, []
        self._flush()
        for h, payload in parked:
            self._send_forward(sess, h, payload, sess.relayed)

    def snapshot(self) -> dict:
        """Figures for the statistics and the demo summary."""
        with self.lock:
            return {
                "sessions": [
                    {"dcid": s.dcid, "client": f"{s.clt_ep}@{s.clt_node}",
                     "service": s.service.name,
                     "server": f"{s.to_server.get(s.lbclt_ep, '?')}@{s.svr_node}",
                     "relayed": s.relayed, "messages": s.messages, "bytes": s.bytes}
                    for s in self.sessions.values()],
                "servers": {n: {"name": s.name, "cpu": s.cpu, "level": LEVEL_NAMES[s.level],
                                "live": self.is_live(s), "sessions": s.sessions,
                                "activity": s.activity,
                                "messages": s.messages, "bytes": s.bytes}
                            for n, s in self.servers.items()},
                "load": {"cpu": self.meter.cpu, "level": LEVEL_NAMES[self.meter.level]},
                "sessions_per_dc": {dc: n for dc, n in self.per_dc.items() if n},
                **self.counters,
            }


def _swap_eps(h: Header, old: int, new: int, dst_field: bool) -> None:
    """Rewrite one endpoint everywhere the header names it: c_dst or c_src, m_source of
    messages, and the vcopy sub-header (§2.4 table of lb_policies.md)."""
    _swap_buf(h.buf, h.c_cmd, old, new, dst_field)


def _swap_buf(buf, cmd: int, old: int, new: int, dst_field: bool) -> None:
    """`_swap_eps` on a raw 120-byte header of command `cmd`."""
    if old == new:
        return
    if dst_field:
        if _I32.unpack_from(buf, _DST)[0] == old:
            _I32.pack_into(buf, _DST, new)
    else:
        if _I32.unpack_from(buf, _SRC)[0] == old:
            _I32.pack_into(buf, _SRC, new)
        if cmd in MESSAGE_CMDS and _I32.unpack_from(buf, _M_SOURCE)[0] == old:
            _I32.pack_into(buf, _M_SOURCE, new)
    if cmd in VCOPY_CMDS:
        v = _V3.unpack_from(buf, _V_SRC)
        if old in v:
            _V3.pack_into(buf, _V_SRC, *(new if x == old else x for x in v))
