"""`dsp_proxy [options] CONFIG`: start-up order, threads, the main loop that supervises them.

Start-up mirrors the C daemon: open the DVK, read the DVS info (the node id comes from the DVK),
load and validate the config against it, then for every remote node create RPROXY and SPROXY
with the TID handshake, `proxies_bind` + `node_up` the pair, and the same for the virtual LB
node's pair (the get2rmt and put2lcl threads).  Then the DSP adds the nodes to the DCs its
services name and binds the services' endpoints on client nodes (docs/design.md).

After start-up the main thread runs one loop (docs/design.md, "Supervision"): signal handlers
only post an event; thread deaths, link downs and signals are events the loop dispatches to
`handle_<event>`, and every TICK it runs the periodic work.  A dead proxy thread is logged with
its traceback and its peer's pair is restarted with backoff (after repeated deaths it rests a
minute, FAILED_RETRY); a
lost DVK or a dead LB pair makes the daemon exit non-zero, so init or systemd restarts it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dvk_cffi import DvsInfo, open_dvk
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.api import Dvk
from dvk_cffi.emu.client import DvkUnavailable
from dvk_cffi.logs import UNLIMITED
from dvk_cffi.wire import Header, Message, hello_header

from . import __version__, addresses, cpu_latency, daemon, fastpath, topology
from . import config as cfgmod
from . import stats as statsmod
from .acceptor import Acceptor
from .elastic import Autoscaler, ServiceRunner
from .executor import Executor
from .group import (
    LEVEL_NAMES,
    MT_NEED_SERVER,
    MT_SVC_START,
    MT_SVC_STOP,
    SERVER_GONE,
    SERVICE_DOWN,
    Group,
    Router,
    control_message,
)
from .link import Link, OutMonitor, PeerSpec
from .linkstate import HALF_OPEN_LIMIT, Event
from .misc import (
    SYSLOG_SOCKET,
    StartGate,
    is_local_address,
    keepalive_timing,
    log_thread_deaths,
    name_os_thread,
    reopen_logs,
    report_suppressed_logs,
    resolve,
    set_log_node,
    setup_logging,
    tune_socket,
)
from .rproxy import Put2lclThread, RProxy, WireLimits
from .sproxy import LbSender, SProxy

log = logging.getLogger("dsp")
#: A reload's start and verdict, logged whatever --log-level says: `init.d/dvs reload` waits
#: for the verdict in the log (a successful reload under --log-level WARNING was reported as
#: "no verdict", exit status 1).  Its refusals are ERROR lines anyway.
reload_log = logging.getLogger("dsp.reload")
reload_log.setLevel(logging.INFO)

SHUTDOWN_GRACE = 1.5
#: A live node kernel answers the main thread's calls in milliseconds; one that leaves a call
#: unanswered this long (seconds) is stopped or wedged and counts as lost, so that a stop
#: signal is acted on within the init script's stop timeout even then.
KERNEL_ANSWER_LIMIT = 5.0
#: The main loop's periodic work runs this often (seconds).
TICK = 0.5
#: A peer whose threads died more than MAX_RESTARTS times in RESTART_WINDOW s is marked failed,
#: and its pair is started again with a fresh count after FAILED_RETRY s (a peer that can kill
#: the pair's threads costs its link a minute, not the link for good).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
FAILED_RETRY = 60.0
#: How often the endpoint ranges of the DCs are read again from the DVK (seconds).
DC_RECHECK = 5.0
#: First delay before a dead pair is restarted (doubled per recent death, at most 5 s).
RESTART_BACKOFF = 0.2
#: A restart of a pair (or of a daemon-wide thread) that itself failed is tried again after this
#: many seconds.
RESTART_RETRY = 5.0


@dataclass
class ProxyContext:
    """What a proxy thread may use (docs/design.md, "Threads"): one per peer, whose `stopping`
    is that peer's own (set when the daemon stops or the peer's pair is restarted)."""

    dvk: Dvk
    stopping: threading.Event
    local: int
    lb_node: int
    limits: WireLimits
    router: Router
    execute: Executor
    control: Callable[[int, Message], None]
    count_error: Callable[[int], None]
    hello: Callable[[int, bool], Header]
    source_addr: str
    tune_out: Callable[[socket.socket], None]   # socket options of an outgoing connection
    fd_interval_ms: int
    period: float
    fast: fastpath.FlowTable | None = None
    #: the links' side of the compiled code (the relay's table, or the senders' own)
    wires: fastpath.FlowTable | None = None
    #: True for (dcid, endpoint) when it is a configured service's ext_ep (the config in force)
    service_ep: Callable[[int, int], bool] = lambda dcid, ep: False
    #: the put2lcl thread's `put_done`, for the compiled deliverers that put the LB node's
    #: traffic themselves (None: they leave it to the router)
    lb_put: Callable[[Header, bytes, int], None] | None = None


@dataclass
class Pair:
    """The threads of one peer's proxy pair, and how often they died lately."""

    spec: PeerSpec
    stopping: threading.Event
    threads: list = field(default_factory=list)
    deaths: list = field(default_factory=list)     # monotonic times of thread deaths
    restart_at: float = 0.0
    failed: bool = False


class DvkLost(Exception):
    """The DVK (the node kernel) is gone: the daemon exits non-zero."""


class Dsp:
    """One running DSP: the links to every peer, the LB pair, the router, and the main loop
    that supervises them (signals, thread deaths, link downs, the periodic tick)."""

    def __init__(self, dvk: Dvk, cfg, local: int, dvs: DvsInfo,
                 allow_any_peer: bool = False) -> None:
        self.dvk = dvk
        self.cfg = cfg
        self.local = local
        self.dvs = dvs
        self.allow_any_peer = allow_any_peer
        self.stopping = threading.Event()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        lb = cfg.lb
        self.lb_nodeid = lb.nodeid if lb is not None else -1
        self.links: dict[int, Link] = {}
        self._set_timers(cfg)
        me = cfg.nodes_by_id.get(local)
        self.bind_addr = addresses.listen_address(me)
        self.monitor = OutMonitor()
        self.pairs: dict[int, Pair] = {}
        self.registered: list[int] = []           # proxy pairs registered with the kernel
        self.threads: list[threading.Thread] = []
        self.acceptor = Acceptor(self.bind_addr, self.stopping, allow_any_peer,
                                 tune=lambda sock: self.tune(sock, outgoing=False))
        self.relay_host = topology.relay_host(cfg)
        self.node_pids = _node_pids(dvk)
        self.limits = WireLimits(dvs.d_nr_nodes, dvs.d_nr_dcs, learn=self.learn_dc)
        self.group: Group | None = None
        self.fast: fastpath.FlowTable | None = None
        if cfg.role(local).lb_pair and not topology.is_relayed_client(cfg, local):
            self.group = Group(cfg, local, _LinkView(self.links),
                               self.relay_host, self.node_pids)
            if self.relay_host == local and fastpath.enabled():
                try:
                    self.fast = fastpath.FlowTable(local, self.lb_nodeid, dvs.d_nr_nodes,
                                                   dvs.d_nr_dcs, SERVER_GONE | SERVICE_DOWN)
                except ValueError as exc:
                    log.info("the compiled relay is not used: %s", exc)
                self.group.fast = self.fast
        #: The links' side of the compiled code: the relay's table on the LB host; on the
        #: other nodes a table of its own for the compiled sender and deliverer (emulated
        #: DVK only: `fastpath.Sender`, `fastpath.Receiver`).
        self.wires: fastpath.FlowTable | None = self.fast
        if fastpath.UNUSABLE and (self.relay_host == local or fastpath.Sender.backend_ok(dvk)):
            log.warning("the compiled relay is not used: %s; the Python path carries every "
                        "frame", fastpath.UNUSABLE)
        if self.wires is None and fastpath.enabled() and fastpath.Sender.backend_ok(dvk):
            try:
                self.wires = fastpath.FlowTable(local, self.lb_nodeid, dvs.d_nr_nodes,
                                                dvs.d_nr_dcs, SERVER_GONE | SERVICE_DOWN)
            except ValueError as exc:
                log.info("the compiled sender is not used: %s", exc)
        if self.group is not None and self.wires is not None:
            self.group.on_reverse = self.wires.set_reverse
            if self.fast is None:   # the receivers deliver in C: local clients' sessions too
                self.group.fast = self.wires
                self.group.fast_local = True
        self.router = Router(local, self.lb_nodeid, self.group)
        self.put2lcl: Put2lclThread | None = None
        self.execute = Executor(local, self.links, self.router, self._put_local,
                                self.on_no_server)
        self.services = ServiceRunner(self)
        self.autoscaler: Autoscaler | None = Autoscaler(self) if self.group else None
        self._need_sent = 0.0
        self._activity_marks: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self._errors_lock = threading.Lock()
        self.started = time.monotonic()     # uptime: immune to the clock being set
        self.reloads = {"ok": 0, "failed": 0, "last": None, "last_error": None}
        self.stats_address: str | None = None
        self.cpu_latency_us: int | None = None   # the CPU latency request held, if any
        self.exit_code = 0
        self.dvk_gone = False        # the DVK stopped answering: shutdown makes no calls to it
        self.config_path: str | None = None
        self._next_sample = 0.0
        self._next_client_check = time.monotonic() + min(self.period, 5)
        self._next_dc_check = 0.0
        self._deaths: dict[str, list[float]] = {}     # daemon-wide thread -> recent deaths
        self._restart_due: dict[str, float] = {}      # daemon-wide thread -> restart time

    def _set_timers(self, cfg) -> None:
        """Liveness and load timers (at start and on a reload)."""
        self.fd_interval_ms, fall, self.fd_rise = cfg.fd_interval, cfg.fd_fall, cfg.fd_rise
        # DOWN after fd_fall intervals with nothing received (HELLOs keep idle links
        # talking), so a frozen peer is noticed, not only a closed socket
        self.silence_timeout = self.fd_interval_ms * fall / 1000.0
        self.user_timeout_ms = int(self.silence_timeout * 1000)
        self.keepalive = keepalive_timing(self.fd_interval_ms, fall)
        self.period = (cfg.lb or cfgmod.LbConfig).period
        for link in self.links.values():
            link.fd_silence = self.silence_timeout

    def tune(self, sock: socket.socket, outgoing: bool) -> None:
        """The socket options of a link connection, from the liveness settings in force (so a
        connection made after a reload gets the new ones): TCP_USER_TIMEOUT on outgoing
        connections, keep-alive on both (docs/design.md, "Liveness")."""
        tune_socket(sock, self.user_timeout_ms if outgoing else None, self.keepalive)

    def post(self, event: tuple) -> None:
        """Hand an event to the main loop (safe from any thread and from signal handlers)."""
        self.events.put(event)

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        self.threads.append(self.supervised("outmon", self.monitor.run))
        for spec in topology.peer_specs(self.cfg, self.local):
            self._start_peer(spec)
        if self.group is not None:
            ctx = self._context(self.stopping)
            self.put2lcl = Put2lclThread(ctx, StartGate())
            sender = LbSender(ctx, StartGate())
            self.threads.extend(self._start_pair(self.cfg.lb.name, self.lb_nodeid,
                                                 ("put2lcl", self.put2lcl),
                                                 ("get2rmt", sender), peer=self.lb_nodeid))
            for status in (C.CONNECT_RPROXY, C.CONNECT_SPROXY):
                self.dvk.proxy_conn(self.lb_nodeid, status)
        self._join_dcs()
        self._bind_services()
        self.threads.append(self.supervised("acceptor", self.acceptor.run))

    def _context(self, stopping: threading.Event) -> ProxyContext:
        return ProxyContext(
            dvk=self.dvk, stopping=stopping, local=self.local, lb_node=self.lb_nodeid,
            limits=self.limits, router=self.router, execute=self.execute,
            control=self.on_control, count_error=self.count_error,
            hello=self.hello_for, source_addr=self.bind_addr,
            tune_out=lambda sock: self.tune(sock, outgoing=True),
            fd_interval_ms=self.fd_interval_ms,
            period=self.period, fast=self.fast, wires=self.wires,
            service_ep=self._is_service_ep,
            lb_put=self._lb_put_done if self.group is not None and self.group.fast_local
            else None)

    def _lb_put_done(self, h: Header, data: bytes, code: int) -> None:
        """A receiver's put2lcl of the LB node's traffic that did not plainly succeed: the
        put2lcl thread answers it (a frame that comes before that thread exists is counted
        as a put2lcl error)."""
        if self.put2lcl is not None:
            self.put2lcl.put_done(h, data, code)
        else:
            self.count_error(code)

    def _is_service_ep(self, dcid: int, ep: int) -> bool:
        """A configured service's ext_ep in DC `dcid`: only its program (or, on a client node,
        the binding to the LB node) may hold it, never a binding a peer's frame asks for."""
        return any(svc.ext_ep == ep and svc.in_dc(dcid) for svc in self.cfg.services)

    def _start_peer(self, spec: PeerSpec) -> Link:
        """The link to one peer and its RPROXY/SPROXY pair (at start-up, on a reload and when
        the supervisor restarts the pair)."""
        spec = replace(spec, addresses=self._peer_addresses(spec))
        wire = self.wires.wire(spec.nodeid) if self.wires is not None else None
        link = Link(spec, self.dvk, self.monitor, self.post, self.silence_timeout, wire)
        pair = self.pairs.get(spec.nodeid)
        stopping = threading.Event()
        if pair is None:
            pair = self.pairs[spec.nodeid] = Pair(spec, stopping)
        pair.spec, pair.stopping, pair.restart_at = spec, stopping, 0.0
        if self.stopping.is_set():
            stopping.set()
        self.links[spec.nodeid] = link
        if self.wires is not None:
            self.wires.set_raw_ok(spec.nodeid, not (spec.batch or spec.compress))
        ctx = self._context(stopping)
        rproxy = RProxy(ctx, link, StartGate())
        sproxy = SProxy(ctx, link, StartGate())
        self.acceptor.add(link)
        pair.threads = self._start_pair(spec.name, spec.nodeid, (rproxy.name, rproxy),
                                        (sproxy.name, sproxy), peer=spec.nodeid)
        return link

    def _peer_addresses(self, spec: PeerSpec) -> frozenset:
        """Where the peer's connections may come from: every address of its name, plus the
        extra addresses the config lists for it."""
        node = self.cfg.nodes_by_id.get(spec.nodeid)
        if node is None and spec.nodeid == self.lb_nodeid and self.relay_host is not None:
            node = self.cfg.nodes_by_id.get(self.relay_host)     # a relayed client's LB host
        return addresses.peer_addresses(node)

    def _start_pair(self, name: str, nodeid: int, receiver, sender,
                    peer: int) -> list[threading.Thread]:
        """The C start handshake: both threads report their TID, main registers the pair with
        the kernel, then lets them run."""
        started = []
        threads = []
        try:   # the second thread may not start (no thread to be had): the first is let go
            for tname, obj in (receiver, sender):
                threads.append(self.supervised(tname, obj.run, peer))
                started.append(obj)
            rtid = started[0].gate.wait_tid()
            stid = started[1].gate.wait_tid()
            self.dvk.proxies_bind(name, nodeid, stid, rtid, C.MAXCOPYBUF)
            self.dvk.node_up(name, nodeid, nodeid)
        except BaseException:
            for obj in started:
                obj.gate.abort()
            raise
        if nodeid not in self.registered:
            self.registered.append(nodeid)
        for obj in started:
            obj.gate.go()
        log.debug("proxy pair %d (%s) registered: sender %d, receiver %d", nodeid, name,
                  stid, rtid)
        return threads

    def supervised(self, name: str, target: Callable[[], None],
                   peer: int | None = None) -> threading.Thread:
        """Run `target` on a thread whose unexpected death is logged with its traceback and
        reported to the main loop."""
        def body() -> None:
            name_os_thread(name)
            try:
                target()
            except BaseException as exc:  # every death is reported
                if self.stopping.is_set():
                    log.debug("thread %s ended while stopping: %r", name, exc)
                    return
                log.error("thread %s died: %r", name, exc, exc_info=exc)
                self.post(("thread_died", name, peer, exc))
        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        return t

    def _target_dcs(self) -> list[int]:
        """The DCs the DSP joins the cluster's nodes to: those its services name, or every
        running DC when a service names any DC (dcid -1) or no service is configured."""
        dcids = {s.dcid for s in self.cfg.services}
        if not dcids or -1 in dcids:
            running = []
            for d in range(self.dvs.d_nr_dcs):
                try:
                    if self.dvk.getdcinfo(d).dc_flags == C.DC_RUNNING:
                        running.append(d)
                except E.DvkError:
                    continue
            return running
        return sorted(dcids)

    def _join_dcs(self) -> None:
        for dcid in self._target_dcs():
            for nodeid in list(self.registered):
                try:
                    self.dvk.add_node(dcid, nodeid)
                except E.DvkError as err:
                    if err.code != E.EDVSDCNODE:
                        log.warning("add_node(DC %d, node %d): %s", dcid, nodeid, err)

    def _service_dcs(self, svc) -> list[int]:
        return [svc.dcid] if svc.dcid >= 0 else self._target_dcs()

    def _client_service_slots(self) -> list[tuple]:
        """(service, DC) of every service ext_ep this DSP binds to the LB node: only on client
        nodes (no server of the service runs there); on other nodes an operator binds by hand."""
        me = self.cfg.nodes_by_id.get(self.local)
        if me is None or me.role != "client" or self.lb_nodeid < 0:
            return []
        return [(svc, dcid) for svc in self.cfg.services for dcid in self._service_dcs(svc)]

    def _bind_services(self) -> None:
        """Each service's ext_ep bound to the LB node (`_client_service_slots`)."""
        for svc, dcid in self._client_service_slots():
            try:
                info = self.dvk.getprocinfo(dcid, svc.ext_ep)
                if (info.p_rts_flags & C.REMOTE and info.p_nodeid == self.lb_nodeid):
                    continue
                self.dvk.rmtbind(dcid, svc.name[:15], svc.ext_ep, self.lb_nodeid)
                log.info("service %s: endpoint %d of DC %d bound to LB node %d", svc.name,
                         svc.ext_ep, dcid, self.lb_nodeid)
            except E.DvkError as err:
                log.warning("service %s: rmtbind of endpoint %d in DC %d: %s", svc.name,
                            svc.ext_ep, dcid, err)

    def _rebind_services(self) -> None:
        """A service's ext_ep that another program unbound (any program of the node may) is
        bound to the LB node again; else every request of the node's clients failed for
        good.  An ext_ep a local process holds is left alone."""
        for svc, dcid in self._client_service_slots():
            try:
                free = bool(self.dvk.getprocinfo(dcid, svc.ext_ep).p_rts_flags
                            & C.SLOT_FREE)
            except E.DvkError as err:
                free = err.code == E.EDVSNOTBIND
            if not free:
                continue
            try:
                self.dvk.rmtbind(dcid, svc.name[:15], svc.ext_ep, self.lb_nodeid)
                log.warning("service %s: endpoint %d of DC %d was unbound by another "
                            "program: bound again to LB node %d", svc.name, svc.ext_ep,
                            dcid, self.lb_nodeid)
            except E.DvkError as err:
                log.debug("service %s: rmtbind of endpoint %d in DC %d: %s", svc.name,
                          svc.ext_ep, dcid, err)

    # ------------------------------------------------------------------ what the threads use
    def learn_dc(self, dcid: int) -> tuple[int, int] | None:
        """The endpoint range of a DC, for the checks of received headers: the DC's own when
        it runs on this node, the DVS limits otherwise (put2lcl then refuses the frame)."""
        if not 0 <= dcid < self.dvs.d_nr_dcs:
            return None
        rng = (self.dvs.d_nr_tasks, self.dvs.d_nr_procs)
        try:
            info = self.dvk.getdcinfo(dcid)
            if info.dc_flags == C.DC_RUNNING:
                rng = (info.dc_nr_tasks, info.dc_nr_procs)
        except E.DvkError:
            pass
        self.limits.dc_ranges[dcid] = rng
        if self.wires is not None:
            self.wires.set_dc(dcid, rng)
        return rng

    def _put_local(self, h: Header, data) -> bool:
        return self.put2lcl is not None and self.put2lcl.put(h, bytes(data) if data else b"")

    def hello_for(self, peer: int, report: bool = False) -> Header:
        """A HELLO for `peer`; with `report`, carrying this node's load report."""
        h = hello_header(self.local, peer, threading.get_native_id())
        if report and self.group is not None:
            h.c_msg.load(self.group.load_report(self.activity(peer)))
        return h

    def on_no_server(self) -> None:
        """A session found no usable server: the autoscaler's trigger, wherever it runs."""
        if self.autoscaler is None:
            return
        decider = self.autoscaler.decider()
        if decider == self.local:
            self.autoscaler.no_server = True
        elif decider is not None and time.monotonic() - self._need_sent > 1.0:
            self._need_sent = time.monotonic()
            self.send_control(decider, control_message(MT_NEED_SERVER, m_source=self.local))

    def send_control(self, nodeid: int, body: bytes) -> bool:
        """A control frame (a HELLO with a message body) to a peer."""
        return self.execute.control(nodeid, body)

    def activity(self, peer: int) -> int:
        """Commands this DSP moved since its last load report to `peer`.  Each peer's report
        covers its own period: with one mark for all, the first report of a period took the
        whole figure and the others 0, and a server moving traffic looked quiet there."""
        self.fold_fast()
        total = sum(dc.commands for link in list(self.links.values())
                    for counters in (link.sent, link.received)
                    for dc in list(counters.by_dc.values()))  # DC traffic only: not HELLOs
        moved = total - self._activity_marks.get(peer, 0)
        self._activity_marks[peer] = total
        return max(0, moved)  # a reload that removed a link lowers the total

    def fold_fast(self) -> None:
        """Add what the compiled relay and senders counted as sent to the link counters
        (`Link.fold_relay`; what the relay counted as received each receiver adds itself:
        `Relay.fold_received`)."""
        if self.wires is None:
            return
        for link in list(self.links.values()):
            link.fold_relay()

    def on_control(self, peer: int, m: Message) -> None:
        """A control message from a peer that announced itself as a DSP of this project."""
        m_type = m.m_type
        if m_type in (MT_SVC_START, MT_SVC_STOP):
            self.services.handle(peer, m)
        elif m_type == MT_NEED_SERVER:
            if self.autoscaler is not None:
                self.autoscaler.no_server = True
        elif self.group is not None:
            self.execute(self.group.on_control(peer, m))

    def count_error(self, code: int) -> None:
        """(every receiver and the put2lcl thread) One more put2lcl error `code`."""
        with self._errors_lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    # ------------------------------------------------------------------ the main loop
    def run(self, status_file: str | None = None, config_path: str | None = None) -> int:
        """Dispatch events until stopped; returns the exit status (non-zero when the DVK or
        the LB pair was lost)."""
        self.config_path = config_path
        self.status_file = status_file
        self.dvk.limit_answers(KERNEL_ANSWER_LIMIT)
        next_tick = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_tick:
                try:
                    self.tick()
                except DvkLost as exc:
                    self._fatal(str(exc))
                    break
                except Exception:  # the loop outlives a bug in the tick
                    log.exception("main loop: the periodic work failed")
                next_tick = now + TICK
            try:
                event = self.events.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                continue
            try:
                getattr(self, "handle_" + event[0])(*event[1:])
            except DvkLost as exc:
                self._fatal(str(exc))
            except Exception:  # the loop outlives a bug in one handler
                log.exception("main loop: event %s failed", event[0])
        if status_file:
            try:
                self.write_status(status_file)
            except OSError:
                pass
        return self.exit_code

    def _fatal(self, why: str) -> None:
        log.critical("%s: the DSP exits (status 1) so that init or systemd restarts it", why)
        self.exit_code = 1
        self.stop()

    def handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("signal %s: stopping", signal.Signals(signum).name)
            self.stop()
        elif signum == signal.SIGHUP:
            reopen_logs()
            if self.config_path:
                self.reload(self.config_path)
        elif signum == signal.SIGUSR1:
            reopen_logs()

    def handle_link_down(self, peer: int, reason: str) -> None:
        if self.group is not None and peer in self.group.servers:
            self.execute(self.group.server_down(peer))
        self.services.peer_gone(peer)

    def handle_thread_died(self, name: str, peer: int | None, exc: BaseException) -> None:
        if _dvk_lost(exc):
            self.dvk_gone = True
            raise DvkLost(f"thread {name} lost the DVK ({exc})")
        if peer is None:
            if name in self._daemon_threads():
                now = time.monotonic()
                deaths = [t for t in self._deaths.get(name, []) if now - t < RESTART_WINDOW]
                self._deaths[name] = deaths = deaths + [now]
                # at once the first time; a thread that dies again and again (a fault that
                # stays) is restarted with a growing delay, never in a tight loop
                delay = min(RESTART_BACKOFF * 2 ** (len(deaths) - 2), 5.0) \
                    if len(deaths) > 1 else 0.0
                log.warning("restarting the %s thread%s", name,
                            f" in {delay:.1f} s ({len(deaths)} deaths in the last "
                            f"{RESTART_WINDOW:.0f} s)" if delay else "")
                self._restart_due[name] = now + delay
                self._restart_threads(now)
            return
        if peer == self.lb_nodeid:
            raise DvkLost(f"the LB pair's thread {name} died")
        self._restart_pair(peer)

    def _daemon_threads(self) -> dict[str, Callable[[], None]]:
        """The daemon-wide threads the supervisor restarts when they die."""
        return {"acceptor": self.acceptor.run, "outmon": self.monitor.run}

    def _restart_threads(self, now: float) -> None:
        """(main) Start again the daemon-wide threads whose restart is due."""
        for name, due in list(self._restart_due.items()):
            if now >= due and not self.stopping.is_set():
                try:
                    thread = self.supervised(name, self._daemon_threads()[name])
                except RuntimeError as exc:     # no thread to be had: tried again later
                    log.error("cannot restart the %s thread: %s; retry in %g s", name, exc,
                              RESTART_RETRY)
                    self._restart_due[name] = now + RESTART_RETRY
                    continue
                del self._restart_due[name]
                self.threads = [t for t in self.threads if t.is_alive()] + [thread]

    def handle_pair_lost(self, peer: int, link: Link, reason: str) -> None:
        """The kernel no longer has the proxy pair of `link` (another program unbound it): it
        is registered again, as when its threads die (each time counts as a death)."""
        if self.links.get(peer) is not link:
            return                          # an old link's news: its pair was started again
        log.warning("link to node %d: the kernel no longer has its proxy pair (%s)", peer,
                    reason)
        self._restart_pair(peer)

    def _restart_pair(self, peer: int) -> None:
        """Start a peer's pair again after a short delay that grows with its recent deaths;
        too many of them mark it failed for FAILED_RETRY."""
        pair = self.pairs.get(peer)
        if pair is None or pair.failed or pair.restart_at:
            return
        now = time.monotonic()
        pair.deaths = [t for t in pair.deaths if now - t < RESTART_WINDOW] + [now]
        if len(pair.deaths) > MAX_RESTARTS:
            pair.failed = True
            log.error("link to node %d: its threads died %d times in %.0f s: marked failed, "
                      "started again in %.0f s (or at a reload or restart of the DSP)", peer,
                      len(pair.deaths), RESTART_WINDOW, FAILED_RETRY)
            self._remove_peer(peer, keep_pair=True)
            pair.restart_at = now + FAILED_RETRY
            return
        delay = min(RESTART_BACKOFF * 2 ** (len(pair.deaths) - 1), 5.0)
        pair.restart_at = now + delay
        pair.stopping.set()
        link = self.links.get(peer)
        if link is not None:
            link.stop()
        log.warning("link to node %d: restarting its proxy pair in %.1f s", peer, delay)

    def tick(self) -> None:
        """Every TICK: liveness of the DVK, then each periodic step (`_tick_steps`) on its
        own: a step that fails is logged and the others still run, so one fault (a bug, a
        resource gone for a moment) cannot keep sessions from expiring or the autoscaler
        from deciding for as long as it lasts.  Only a lost DVK ends the tick (and the
        daemon)."""
        report_suppressed_logs()
        try:
            self.dvk.getdvsinfo()
        except (E.DvkError, OSError) as exc:
            if _dvk_lost(exc):
                self.dvk_gone = True
                raise DvkLost(f"the DVK does not answer ({exc})") from None
        now = time.monotonic()
        for step in self._tick_steps():
            try:
                step(now)
            except DvkLost:
                raise
            except Exception:
                log.exception("main loop: %s failed; the tick's other steps go on",
                              step.__name__.strip("_").replace("_", " "))

    def _tick_steps(self) -> list[Callable[[float], None]]:
        """The periodic steps, in order: thread and pair restarts, half-open links and
        connections held aside (`Link.check_candidate`), the status file, the DC ranges;
        with an LB: load, services, sessions, local clients, the autoscaler."""
        steps = [self._restart_threads, self._restart_pairs, self._check_links,
                 self._write_status_file, self._recheck_dcs]
        if self.group is not None:
            steps += [self._sample_load, self._tick_services, self._tick_sessions,
                      self._tick_clients, self._tick_autoscaler]
        return steps

    def _restart_pairs(self, now: float) -> None:
        for peer, pair in self.pairs.copy().items():
            if pair.restart_at and now >= pair.restart_at and not self.stopping.is_set():
                self._remove_peer(peer, keep_pair=True)
                try:
                    self._start_peer(pair.spec)
                    self._join_dcs()    # unbinding the old pair took the node out of the DCs
                    if pair.failed:
                        pair.failed, pair.deaths = False, []
                    log.info("link to node %d: proxy pair restarted", peer)
                except Exception as exc:  # any failure (EMFILE too) is retried, never the end
                    log.error("link to node %d: restart failed: %s; retry in %g s", peer,
                              exc, RESTART_RETRY)
                    pair.restart_at = now + RESTART_RETRY

    def _check_links(self, _now: float) -> None:
        for link in list(self.links.values()):
            if link.half_open_for() > HALF_OPEN_LIMIT:
                link.event(Event.TIMEOUT, None, f"half-open for more than {HALF_OPEN_LIMIT:.0f} s")
            link.check_candidate()

    def _write_status_file(self, _now: float) -> None:
        if self.status_file:
            try:
                self.write_status(self.status_file)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.status_file, exc)

    def _recheck_dcs(self, now: float) -> None:
        if now >= self._next_dc_check:
            if self.wires is not None:       # first: it learns again from the Python check
                self.wires.forget_dcs()
            self.limits.dc_ranges.clear()    # a DC may have started or stopped
            self._next_dc_check = now + DC_RECHECK

    def _sample_load(self, now: float) -> None:
        if now >= self._next_sample:
            self._next_sample = now + self.period
            before = self.group.meter.level
            self.group.sample_load()
            after = self.group.meter.level
            if after != before:
                log.info("this node's load level %s -> %s (cpu %d%%)",
                         LEVEL_NAMES.get(before, before), LEVEL_NAMES.get(after, after),
                         self.group.meter.cpu)

    def _tick_services(self, _now: float) -> None:
        self._check_services()

    def _tick_sessions(self, _now: float) -> None:
        self.execute(self.group.tick())

    def _tick_clients(self, now: float) -> None:
        if now >= self._next_client_check:
            self._next_client_check = now + min(self.period, 5)
            self._check_clients()
            self._rebind_services()

    def _tick_autoscaler(self, _now: float) -> None:
        self.autoscaler.tick()

    def _check_services(self) -> None:
        """Which configured services are bound here; a change is reported to every peer at
        once (the LB then sends new sessions to a service that came back)."""
        bits = self.group.services_bitmap(self._service_bound)
        if bits == self.group.local_services:
            return
        self.group.local_services = bits
        for peer, link in self.links.copy().items():
            if link.up:
                h = self.hello_for(peer, report=True)
                link.submit(h.buf, None, copy=False)

    def _service_bound(self, svc) -> bool:
        for dcid in self._service_dcs(svc):
            try:
                info = self.dvk.getprocinfo(dcid, svc.ext_ep)
            except E.DvkError:
                continue
            if not info.p_rts_flags & (C.SLOT_FREE | C.REMOTE):
                return True
        return False

    def _check_clients(self) -> None:
        """A session whose local client endpoint was unbound (or rebound by another process)
        ends."""
        for dcid, ep, pid in self.group.local_clients():
            try:
                info = self.dvk.getprocinfo(dcid, ep)
                gone = bool(info.p_rts_flags & C.SLOT_FREE) or (pid > 0 and info.p_lpid != pid)
            except E.DvkError as err:
                gone = err.code in (E.EDVSNOTBIND, E.EDVSDSTDIED)
            if gone:
                self.execute(self.group.client_gone(dcid, ep))

    # ------------------------------------------------------------------ running and stopping
    def snapshot(self) -> dict:
        """Everything an operator (or the demo) wants to see, as plain data."""
        self.fold_fast()
        links = {}
        for peer, link in sorted(self.links.copy().items()):
            links[peer] = {
                "name": link.spec.name, "up": link.up, "state": link.state.value,
                "downs": link.downs, "generation": link.generation,
                "announced": link.announced,
                "address": f"{link.spec.host}:{link.spec.sport}",
                "listen_port": link.spec.rport,
                "queued": len(link.outq), "refused_full": link.refused_full,
                "connections": _connections(link),
                "sent": link.sent.as_dict(),
                "received": link.received.as_dict(),
            }
        return {
            "node": self.local, "lb_node": self.lb_nodeid, "pid": os.getpid(),
            "version": __version__,
            "taken": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "uptime": round(time.monotonic() - self.started, 1), "links": links,
            "put2lcl_errors": {E.error_name(c): n for c, n in self.errors.copy().items()},
            "failed_pairs": sorted(p for p, pair in self.pairs.copy().items() if pair.failed),
            "refused_connections": self.acceptor.refusals.total,
            "dropped_frames": self.execute.dropped,
            "fast_relay": self.fast is not None,
            # the links' compiled code: SPROXY's get2rmt calls and writes (links without
            # batch or compress) and, off the LB host, RPROXY's reads and put2lcl calls
            "fast_links": self.wires is not None,
            "group": self.group.snapshot() if self.group is not None else None,
            "autoscaler": self.autoscaler.snapshot() if self.autoscaler is not None else None,
            "programs": self.services.snapshot(),
            "config": config_view(self.cfg),
            "reloads": dict(self.reloads),
            "stats": self.stats_address,
            "cpu_latency_us": self.cpu_latency_us,
        }

    def write_status(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f, indent=1, default=str)
        os.replace(tmp, path)

    def stop(self) -> None:
        self.stopping.set()
        for pair in list(self.pairs.values()):
            pair.stopping.set()
        self.post(("wake",))

    def handle_wake(self) -> None:
        """Nothing to do: the loop re-checks `stopping`."""

    def shutdown(self) -> None:
        """Graceful stop: links disconnected, proxies unbound (the kernel wakes their
        callers with EDVSNOTCONN)."""
        self.stop()
        self.services.stop_all()
        if self.autoscaler is not None:
            self.autoscaler.stop()
        for link in self.links.values():
            link.stop()
        self.monitor.stop()
        for pxid in [] if self.dvk_gone else self.registered:
            try:
                self.dvk.proxies_unbind(pxid)
            except (E.DvkError, OSError) as err:
                log.debug("proxies_unbind(%d): %s", pxid, err)
                if _dvk_lost(err):
                    break
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for t in self.threads + [t for p in self.pairs.values() for t in p.threads]:
            t.join(max(0.0, deadline - time.monotonic()))
        log.info("DSP of node %d stopped", self.local)

    # ------------------------------------------------------------------ live reload (SIGHUP)
    def reload(self, path: str) -> bool:
        """Re-read and validate the config; on success apply what can change live (services,
        thresholds, timers, peers added or removed) without touching the links that did not
        change; on any error keep the running config and log why."""
        reload_log.info("reloading %s", path, extra=UNLIMITED)
        try:
            new = cfgmod.load(path, self.dvs, local_node=self.local)
        except cfgmod.ConfigError as err:
            for line in str(err).splitlines():
                log.error("reload: %s", line, extra=UNLIMITED)
            return self._reload_failed(path, str(err).splitlines()[0] if str(err) else "")
        except OSError as exc:
            log.error("reload: %s: %s", path, exc.strerror, extra=UNLIMITED)
            return self._reload_failed(path, f"{path}: {exc.strerror}")
        why = restart_needed(self.cfg, new, self.local)
        if why:
            log.error("reload: %s needs a restart of dsp_proxy", why, extra=UNLIMITED)
            return self._reload_failed(path, f"{why} needs a restart")
        for w in new.warnings:
            log.warning("reload: %s", w, extra=UNLIMITED)
        try:
            return self._apply_reload(path, new)
        except DvkLost:
            raise
        except Exception as exc:  # a verdict for the operator (the init script waits for one)
            log.exception("reload: applying %s failed partway", path, extra=UNLIMITED)
            return self._reload_failed(path, f"applying it failed partway: {exc}",
                                       "failed partway: the configuration in force is partly "
                                       "the new one; restart dsp_proxy to be sure of it")

    def _apply_reload(self, path: str, new: cfgmod.Config) -> bool:
        """What a valid new config changes in the running daemon (`reload`)."""
        old_specs = {s.nodeid: s for s in topology.peer_specs(self.cfg, self.local)}
        new_specs = {s.nodeid: s for s in topology.peer_specs(new, self.local)}
        removed = [p for p, spec in old_specs.items() if new_specs.get(p) != spec]
        added = [spec for p, spec in new_specs.items() if old_specs.get(p) != spec]
        old_services = {s.name: s for s in self.cfg.services}
        gone_services = [s for n, s in old_services.items()
                         if n not in {x.name for x in new.services} or
                         s.ext_ep != new.service(n).ext_ep or s.dcid != new.service(n).dcid]
        for peer in removed:
            self._remove_peer(peer)
        self._unbind_services(gone_services)
        self.cfg = new
        self._set_timers(new)
        if self.group is not None:
            self.execute(self.group.reload(new))
        if self.autoscaler is not None:
            self.autoscaler.reload(new)
        for spec in added:
            try:
                self._start_peer(spec)
            except (E.DvkError, TimeoutError) as exc:
                log.error("reload: link to node %d (%s) could not start: %s", spec.nodeid,
                          spec.name, exc, extra=UNLIMITED)
                self._remove_peer(spec.nodeid)
            else:
                log.info("reload: link to node %d (%s) added", spec.nodeid, spec.name,
                         extra=UNLIMITED)
        self._join_dcs()
        self._bind_services()
        now = time.monotonic()
        for peer, pair in self.pairs.items():
            if pair.failed:     # the operator's reload is the retry the failure log promised
                pair.restart_at = now
                log.info("reload: link to node %d, marked failed, starts again", peer,
                         extra=UNLIMITED)
        self.reloads["ok"] += 1
        self.reloads["last"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.reloads["last_error"] = None
        reload_log.info("reload of %s done: %d links removed, %d added, %d unchanged", path,
                        len(removed), len(added), len(new_specs) - len(added), extra=UNLIMITED)
        return True

    def _reload_failed(self, path: str, why: str,
                       verdict: str = "failed: the running configuration is kept") -> bool:
        """Count a refused reload and log its verdict (the init script waits for it)."""
        self.reloads["failed"] += 1
        self.reloads["last_error"] = why
        log.error("reload of %s %s", path, verdict, extra=UNLIMITED)
        return False

    def _remove_peer(self, peer: int, keep_pair: bool = False) -> None:
        """A peer's link goes down, its threads end, its listener closes, its proxy pair is
        unbound (the kernel ends the node: REMOTE slots unbound, DCs left).  `keep_pair`: the
        supervisor restarts (or gave up on) the pair; a reload that removed the peer forgets
        it."""
        link = self.links.pop(peer, None)
        pair = self.pairs.get(peer) if keep_pair else self.pairs.pop(peer, None)
        if pair is not None:
            pair.stopping.set()
        if link is not None:
            link.stop()
            self.acceptor.remove(link)
        if self.group is not None and peer in self.group.servers:
            self.execute(self.group.server_down(peer))
        if peer in self.registered:
            self.registered.remove(peer)
            try:
                self.dvk.proxies_unbind(peer)
            except (E.DvkError, OSError) as err:
                log.debug("proxies_unbind(%d): %s", peer, err)
        threads = pair.threads if pair is not None else []
        deadline = time.monotonic() + SHUTDOWN_GRACE * 2
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("thread %s of node %d did not end", t.name, peer)
        log.info("%s: link to node %d removed", "supervisor" if keep_pair else "reload", peer)

    def _unbind_services(self, services) -> None:
        """Undo the client node's service bindings for services a reload removed (or moved):
        the service's ext_ep bound to the LB node is unbound."""
        me = self.cfg.nodes_by_id.get(self.local)
        if me is None or me.role != "client" or self.lb_nodeid < 0:
            return
        for svc in services:
            for dcid in self._service_dcs(svc):
                try:
                    info = self.dvk.getprocinfo(dcid, svc.ext_ep)
                    if info.p_rts_flags & C.REMOTE and info.p_nodeid == self.lb_nodeid:
                        self.dvk.unbind(dcid, svc.ext_ep)
                        log.info("service %s removed: endpoint %d of DC %d unbound",
                                 svc.name, svc.ext_ep, dcid)
                except E.DvkError as err:
                    log.debug("service %s: unbind of %d in DC %d: %s", svc.name,
                              svc.ext_ep, dcid, err)


def _connections(link: Link) -> dict:
    """The link's sockets as local -> remote address:port (which TCP connection is which)."""
    out = {}
    for name, sock in (("out", link.out_sock), ("in", link.in_sock)):
        try:
            a, b = sock.getsockname(), sock.getpeername()
            out[name] = f"{a[0]}:{a[1]} -> {b[0]}:{b[1]}"
        except (OSError, AttributeError):
            out[name] = None
    return out


class _LinkView:
    """The router's only view of the links: is a node's link up, how many frames came."""

    def __init__(self, links: dict[int, Link]) -> None:
        self.links = links

    def up(self, node: int) -> bool:
        link = self.links.get(node)
        return link is not None and link.up

    def frames(self, node: int) -> int:
        """Frames received from `node` (the compiled relay's share is added by the link's
        receiver itself)."""
        link = self.links.get(node)
        return link.received.frames if link is not None else 0

    def c_peer(self, node: int) -> bool:
        link = self.links.get(node)
        return link is not None and link.c_peer()


def _dvk_lost(exc: BaseException) -> bool:
    """An exception that means the DVK itself is gone."""
    if isinstance(exc, E.DvkError):
        return exc.code == E.EDVSSHUTDOWN
    return isinstance(exc, (ConnectionError, DvkUnavailable))


def restart_needed(old, new, local: int) -> str | None:
    """What in `new` a running DSP cannot take over live (None: everything can)."""
    if (old.lb is None) != (new.lb is None):
        return "adding or removing the lb block"
    if old.lb is not None:
        if (old.lb.nodeid, old.lb.name) != (new.lb.nodeid, new.lb.name):
            return "a change of the LB node's id or name"
        if old.lb.lb_eps != new.lb.lb_eps:
            return "a change of lb_eps"
    if topology.relay_host(old) != topology.relay_host(new):
        return "a change of the LB host (cltname)"
    me_old, me_new = old.nodes_by_id.get(local), new.nodes_by_id.get(local)
    if me_new is None:
        return f"removing this node ({local}) from the config"
    if me_old is not None and (me_old.role, me_old.rname, me_old.rname_explicit) != \
            (me_new.role, me_new.rname, me_new.rname_explicit):
        return "a change of this node's role or rname"
    return None


def config_view(cfg) -> dict:
    """The running config as the statistics show it (never a secret: no ssh_* values)."""
    lb = cfg.lb
    view: dict = {"path": cfg.path, "nodes": len(cfg.nodes),
                  "services": [{"name": s.name, "dcid": s.dcid, "ext_ep": s.ext_ep,
                                "min_ep": s.min_ep, "max_ep": s.max_ep, "bind": s.bind}
                               for s in cfg.services]}
    if lb is not None:
        view["lb"] = {k: getattr(lb, k) for k in (
            "name", "nodeid", "lowwater", "highwater", "period", "session_timeout",
            "max_sessions", "fd_interval", "fd_fall", "fd_rise", "min_servers",
            "max_servers")}
    return view


def _node_pids(dvk: Dvk):
    """The processes whose CPU is this node's load: under the emulator, those attached to the
    node kernel; on a real DVK node None (= the whole machine)."""
    if getattr(dvk, "backend", "") != "emu" and not getattr(dvk, "emulated", False):
        return None

    def pids() -> set[int]:
        try:
            text = dvk.proc_text("tasks")
        except (E.DvkError, OSError):
            return set()
        return {int(line.split()[0]) for line in text.splitlines()[1:] if line.strip()}
    return pids


def _find_local_node(cfg_path: str) -> int | None:
    """The config node whose rname is an address of this machine outside 127/8 (all of
    127/8 is local, so it names no node there); None unless exactly one node matches."""
    try:
        cfg = cfgmod.load(cfg_path)
    except cfgmod.ConfigError:
        return None
    found = []
    for node in cfg.nodes:
        try:
            addr = resolve(node.rname)
        except OSError:
            continue
        if not addr.startswith("127.") and is_local_address(addr):
            found.append(node.nodeid)
    return found[0] if len(found) == 1 else None


def open_node_dvk(mode: str, node: int | None, cfg_path: str,
                  cancelled: Callable[[], bool] | None = None) -> Dvk:
    """Open the DVK; with the emulator (emu, or emu-ioctl: the kernel backend over the
    emulator's ioctl device) find this node's kernel, or start one as a process of its own
    (InterruptedError, and the kernel stopped, when `cancelled()` turns true meanwhile)."""
    if mode == "kernel" or (mode == "auto" and os.path.exists(C.DVK_FILE_NAME)):
        return open_dvk("kernel", answer_limit=KERNEL_ANSWER_LIMIT)
    from dvk_cffi.emu import node as emunode
    from dvk_cffi.emu.client import DvkUnavailable
    from dvk_cffi.emu.server import socket_path
    backend = "emu-ioctl" if mode == "emu-ioctl" else "emu"
    if node is None and os.environ.get("DVK_NODE"):
        node = int(os.environ["DVK_NODE"])
    if node is None and not os.environ.get("DVK_SOCKET"):
        node = _find_local_node(cfg_path)
    try:
        dvk = open_dvk(backend, node=node, answer_limit=KERNEL_ANSWER_LIMIT)
    except DvkUnavailable:
        if node is None:
            raise
        log.info("no DVK node kernel for node %d: starting one (it stops with this daemon)",
                 node)
        proc = emunode.start_node(node, detach=True, cancelled=cancelled)
        daemon.stop_with_this_process(proc, f"the node kernel of node {node}")
        dvk = open_dvk(backend, path=socket_path(node), answer_limit=KERNEL_ANSWER_LIMIT)
    if backend == "emu-ioctl":
        log.info("DVK: the kernel backend, through the emulated node's ioctl device")
    return dvk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsp_proxy", description="Distributed Service Proxy",
                                epilog="dsp_proxy stats [[ADDR:]PORT] [--json] [--file PATH]: "
                                       "the figures of a running dsp_proxy (see its --help)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("config", help="configuration file")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print the cluster summary and exit")
    p.add_argument("--strict", action="store_true",
                   help="with --check: every warning is an error (exit status 1)")
    p.add_argument("--dvk", choices=("auto", "kernel", "emu", "emu-ioctl"), default="auto",
                   help="DVK backend (auto: the kernel when /dev/dvk exists; emu-ioctl: the "
                        "kernel backend driving an emulated node through its ioctl device)")
    p.add_argument("--node", type=int, default=None,
                   help="emulated node kernel to attach to (default DVK_NODE, else the "
                        "kernel of DVK_SOCKET, else the node whose rname is a local address "
                        "outside 127/8, else the only node kernel running)")
    p.add_argument("--log-level", type=daemon.log_level_option,
                   default=os.environ.get("DSP_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default $DSP_LOG_LEVEL or INFO)")
    log_to = p.add_mutually_exclusive_group()
    log_to.add_argument("--log-file", default=None,
                        help="log to this file (reopened on SIGUSR1 and SIGHUP, for "
                             "logrotate); default stderr")
    log_to.add_argument("--syslog", nargs="?", const=SYSLOG_SOCKET, default=None,
                        metavar="SOCKET",
                        help=f"log to the local syslog (facility daemon) at SOCKET "
                             f"(default {SYSLOG_SOCKET})")
    p.add_argument("--allow-any-peer", action="store_true",
                   help="accept a peer's connection from any address (NAT)")
    p.add_argument("--status-file", default=None,
                   help=f"write the daemon's figures as JSON to this file every {TICK:g} s")
    p.add_argument("--stats", default=None, metavar="[ADDR:]PORT", type=daemon.stats_option,
                   help="serve statistics over HTTP (/, /cluster, /stats.json, /metrics); ADDR "
                        "defaults to 127.0.0.1, port 0 picks a free one; off by default")
    p.add_argument("--pidfile", default=None,
                   help="write the daemon's pid to this file (removed at exit)")
    p.add_argument("--cpu-latency", default=None, metavar="USEC", type=cpu_latency.usec_option,
                   help="while running, ask Linux to keep every CPU out of idle states that "
                        "take longer than USEC microseconds to leave (/dev/cpu_dma_latency; "
                        "0 = idle CPUs poll): cheaper wake-ups for more power; off by default")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> int:
    """`--check`: validate, print the summary (stdout) or the issues (stderr); 0 = valid.

    Output is plain ASCII (anything else escaped), so it prints on any terminal encoding, and a
    reader that stops early (`| head`) ends the output quietly."""
    try:
        cfg = cfgmod.load(args.config, DvsInfo(), local_node=args.node,
                          strict=getattr(args, "strict", False))
        stream, text, status = sys.stdout, cfgmod.format_summary(cfg, args.node), 0
    except cfgmod.ConfigError as err:
        stream, text, status = sys.stderr, str(err), 1
    if stream is None:                  # no stream at all: the status still tells
        return status
    data = (text + "\n").encode("ascii", "backslashreplace")
    try:
        stream.flush()
        raw = getattr(stream, "buffer", None)
        if raw is None:
            stream.write(data.decode("ascii"))
        else:
            raw.write(data)
        stream.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)   # no second error when Python exits
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except OSError:                     # nowhere to write (closed, full): the status tells
        pass
    return status


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class EarlySignals:
    """Signals that come before the main loop runs are recorded, not acted on at once (the
    default actions killed the daemon mid-start and left the node kernel it had started):
    SIGTERM or SIGINT makes the start-up stop at its next step with exit status 0 (a node
    kernel the daemon started is stopped on the way out); SIGHUP and SIGUSR1 are handed to
    the main loop, which applies them once it runs."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, _frame) -> None:
        self.seen.append(signum)

    def stop_signal(self) -> int | None:
        """The first SIGTERM or SIGINT received, if any."""
        return next((s for s in self.seen if s in (signal.SIGTERM, signal.SIGINT)), None)

    def stopping(self) -> bool:
        """True (and logged) when the start-up must stop."""
        signum = self.stop_signal()
        if signum is None:
            return False
        log.info("signal %s during start-up: stopping", signal.Signals(signum).name)
        return True

    def hand_over(self, dsp: Dsp) -> None:
        """From now on signals are events of `dsp`'s main loop; the ones recorded so far
        are posted to it, in order."""
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, _frame: dsp.post(("signal", signum)))
        for signum in list(self.seen):
            log.info("signal %s during start-up: handled once the DSP runs",
                     signal.Signals(signum).name)
            dsp.post(("signal", signum))


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["stats"]:  # `dsp_proxy stats [ADDR:PORT]`: the figures of a running DSP
        return statsmod.client_main(argv[1:])
    args = parse_args(argv)
    if args.check:
        return check(args)
    early = EarlySignals()
    stats_addr = args.stats
    try:
        setup_logging(args.log_level, args.log_file, args.syslog)
    except OSError as exc:
        where = "--log-file" if args.log_file else "--syslog"
        print(f"dsp_proxy: {where} {exc.filename or args.log_file or args.syslog}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    log_thread_deaths()
    log.info("dsp_proxy %s (pid %d) starting with %s", __version__, os.getpid(),
             os.path.abspath(args.config))
    if args.pidfile and not pidfile_written(args.pidfile, probe=True):
        return 1    # found out now, not once the links are up
    try:
        dvk = open_node_dvk(args.dvk, args.node, args.config,
                            cancelled=lambda: early.stop_signal() is not None)
        local, dvs = dvk.getdvsinfo()
    except (OSError, E.DvkError, TimeoutError, RuntimeError) as exc:
        if early.stopping():
            return 0
        log.error("cannot open the DVK: %s", exc)
        return 1
    if early.stopping():
        return 0
    if local < 0:
        log.error("the DVS of this node is not initialised")
        return 1
    set_log_node(local)
    try:
        cfg = cfgmod.load(args.config, dvs, local_node=local)
    except cfgmod.ConfigError as err:
        for line in str(err).splitlines():
            log.error("%s", line)
        return 1
    except OSError as exc:
        log.error("%s: %s", args.config, exc.strerror)
        return 1
    for w in cfg.warnings:
        log.warning("%s", w)
    log.info("%s", cfg.role(local).describe())
    other = daemon.already_running(dvk, [s.nodeid for s in topology.peer_specs(cfg, local)],
                                   args.pidfile)
    if other is not None:
        log.error("a dsp_proxy of node %d is already running (pid %d)", local, other)
        return 1
    if early.stopping():
        return 0
    dsp = Dsp(dvk, cfg, local, dvs, allow_any_peer=args.allow_any_peer)
    early.hand_over(dsp)
    latency = cpu_latency.hold(args.cpu_latency)
    if latency is not None:
        dsp.cpu_latency_us = args.cpu_latency
    try:
        return serve(dsp, args, stats_addr)
    finally:
        if latency is not None:
            latency.close()


def serve(dsp: Dsp, args: argparse.Namespace, stats_addr: tuple[str, int] | None) -> int:
    """Start the DSP (and its statistics server), run it until it stops; the exit status."""
    server = None
    try:
        if stats_addr is not None:
            server = statsmod.serve(dsp, *stats_addr)
        dsp.start()
    except (E.DvkError, TimeoutError, OSError) as exc:
        log.error("start-up failed: %s", exc)
        dsp.shutdown()
        if server is not None:
            server.shutdown()
        return 1
    if args.pidfile and not pidfile_written(args.pidfile):
        dsp.shutdown()
        if server is not None:
            server.shutdown()
            server.server_close()
        return 1
    log.info("DSP of node %d running: %d peers, LB node %s", dsp.local, len(dsp.links),
             dsp.lb_nodeid if dsp.lb_nodeid >= 0 else "none")
    try:
        status = dsp.run(args.status_file, os.path.abspath(args.config))
        dsp.shutdown()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return status


def write_pidfile(path: str, probe: bool = False) -> None:
    """Write the pidfile whole (a temporary file renamed); `probe`: only show it can be
    written (the pidfile itself says the daemon is ready, so it comes last)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    if probe:
        os.unlink(tmp)
    else:
        os.replace(tmp, path)


def pidfile_written(path: str, probe: bool = False) -> bool:
    """`write_pidfile`; False (logged at ERROR, with the reason) when it cannot be."""
    try:
        write_pidfile(path, probe)
    except OSError as exc:
        log.error("cannot write the pidfile %s: %s", path, exc.strerror or exc)
        return False
    return True


def remove_pidfile(path: str) -> None:
    """Remove the pidfile if it is still ours."""
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
