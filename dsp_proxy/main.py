"""`dsp_proxy [options] CONFIG`: start-up order, threads, signals and the periodic tick.

Start-up mirrors the C daemon: open the DVK, read the DVS info (the node id comes from the DVK),
load and validate the config against it, then for every remote node create RPROXY and SPROXY
with the TID handshake, `proxies_bind` + `node_up` the pair, and the same for the virtual LB
node's pair (the get2rmt and put2lcl threads).  Then the DSP adds the nodes to the DCs its
services name and binds the services' endpoints on client nodes (ARCHITECTURE §5, D5).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from dvk_cffi import DvsInfo, open_dvk
from dvk_cffi import consts as C
from dvk_cffi import errors as E
from dvk_cffi.api import Dvk
from dvk_cffi.wire import Header

from . import config as cfgmod
from . import stats as statsmod
from . import topology
from .elastic import MT_SVC_START, MT_SVC_STOP, Autoscaler, ServiceRunner, control_message
from .link import Link, OutMonitor, PeerSpec
from .misc import StartGate, is_local_address, resolve, set_log_node, setup_logging, start_thread
from .rproxy import Acceptor, Put2lclThread, RProxy, error_ack
from .sproxy import LbSender, SProxy, hello_frame

log = logging.getLogger("dsp")

SHUTDOWN_GRACE = 1.5
#: Control frame: a session found no server (sent to the autoscaling DSP, D12).
MT_NEED_SERVER = 0x12


class Dsp:
    """One running DSP: the links to every peer, the LB pair, and what they share."""

    def __init__(self, dvk: Dvk, cfg, local: int, dvs: DvsInfo,
                 allow_any_peer: bool = False) -> None:
        self.dvk = dvk
        self.cfg = cfg
        self.local = local
        self.dvs = dvs
        self.allow_any_peer = allow_any_peer
        self.stopping = threading.Event()
        lb = cfg.lb
        self.lb_nodeid = lb.nodeid if lb is not None else -1
        self._set_timers(cfg)
        me = cfg.nodes_by_id.get(local)
        self.bind_addr = _local_bind_address(me.rname) if me is not None else ""
        self.monitor = OutMonitor()
        self.links: dict[int, Link] = {}
        self.acceptor = Acceptor(self)
        self.threads: list[threading.Thread] = []
        self.pairs: list[int] = []
        self.put2lcl: Put2lclThread | None = None
        self.group = None
        self.relay_host = topology.relay_host(cfg)
        self.node_pids = _node_pids(dvk)
        self.services = ServiceRunner(self)
        self.autoscaler: Autoscaler | None = None
        self._need_sent = 0.0
        self._activity_mark = 0
        self.errors: dict[int, int] = {}
        self.started = time.time()
        self.scopes: dict[int, PeerScope] = {}     # a peer's threads see the DSP through it
        self.reload_requested = threading.Event()
        self.reloads = {"ok": 0, "failed": 0, "last": None, "last_error": None}
        self.stats_address: str | None = None

    def _set_timers(self, cfg) -> None:
        """Timers that come from the lb block (at start and on a reload)."""
        lb = cfg.lb
        self.fd_interval_ms = lb.fd_interval if lb is not None else 500
        fall = lb.fd_fall if lb is not None else 3
        # D11: DOWN after fd_fall intervals with nothing received (HELLOs keep idle links
        # talking), so a frozen peer is noticed, not only a closed socket
        self.silence_timeout = self.fd_interval_ms * fall / 1000.0
        self.user_timeout_ms = int(self.silence_timeout * 1000)
        self.period = lb.period if lb is not None else 30

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        relayed = topology.is_relayed_client(self.cfg, self.local)
        if self.cfg.lb is not None and self.lb_nodeid != self.local and not relayed:
            from .group import Group
            self.group = Group(self)
            self.autoscaler = Autoscaler(self)
        for spec in topology.peer_specs(self.cfg, self.local):
            self._start_peer(spec)
        if self.group is not None:
            self.put2lcl = Put2lclThread(self, StartGate())
            sender = LbSender(self, StartGate())
            self._start_pair(self.cfg.lb.name, self.lb_nodeid, ("put2lcl", self.put2lcl),
                             ("get2rmt", sender))
            for status in (C.CONNECT_RPROXY, C.CONNECT_SPROXY):
                self.dvk.proxy_conn(self.lb_nodeid, status)
        self._join_dcs()
        self._bind_services()
        self.threads.append(start_thread("acceptor", self.acceptor.run))

    def _start_peer(self, spec: PeerSpec) -> Link:
        """The link to one peer and its RPROXY/SPROXY pair (at start-up and on a reload)."""
        link = Link(spec, self.dvk, self.monitor)
        scope = PeerScope(self, spec.nodeid)
        if self.stopping.is_set():
            scope.stopping.set()
        self.scopes[spec.nodeid] = scope
        self.links[spec.nodeid] = link
        if self.group is not None and spec.nodeid in self.group.servers:
            link.on_down.append(self.group.server_down)
        rproxy = RProxy(scope, link, StartGate())
        sproxy = SProxy(scope, link, StartGate())
        self.acceptor.add(link)
        scope.pair_threads = self._start_pair(spec.name, spec.nodeid, (rproxy.name, rproxy),
                                              (sproxy.name, sproxy))
        return link

    def _start_pair(self, name: str, nodeid: int, receiver, sender) -> list[threading.Thread]:
        """The C start handshake: both threads report their TID, main registers the pair with
        the kernel, then lets them run."""
        started = []
        threads = []
        for tname, obj in (receiver, sender):
            threads.append(start_thread(tname, obj.run))
            started.append(obj)
        self.threads.extend(threads)
        try:
            rtid = started[0].gate.wait_tid()
            stid = started[1].gate.wait_tid()
            self.dvk.proxies_bind(name, nodeid, stid, rtid, C.MAXCOPYBUF)
            self.dvk.node_up(name, nodeid, nodeid)
        except BaseException:
            for obj in started:
                obj.gate.abort()
            raise
        self.pairs.append(nodeid)
        for obj in started:
            obj.gate.go()
        log.debug("proxy pair %d (%s) registered: sender %d, receiver %d", nodeid, name,
                  stid, rtid)
        return threads

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
        nodes = [n for n in self.pairs]
        for dcid in self._target_dcs():
            for nodeid in nodes:
                try:
                    self.dvk.add_node(dcid, nodeid)
                except E.DvkError as err:
                    if err.code != E.EDVSDCNODE:
                        log.warning("add_node(DC %d, node %d): %s", dcid, nodeid, err)

    def _bind_services(self) -> None:
        """D5: on client nodes, each service's ext_ep is bound to the LB node."""
        me = self.cfg.nodes_by_id.get(self.local)
        if me is None or me.role != "client" or self.lb_nodeid < 0:
            return
        for svc in self.cfg.services:
            dcids = [svc.dcid] if svc.dcid >= 0 else self._target_dcs()
            for dcid in dcids:
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

    # ------------------------------------------------------------------ data path hooks
    def route(self, h: Header, payload, deliverer, link: Link | None) -> None:
        """ARCHITECTURE §5 routing of a command from the network."""
        dnode = h.c_dnode
        if dnode == self.local:
            if self.group is not None and self.group.reverse(h, payload, link):
                return
            deliverer.deliver(h, payload, link.spec.autobind if link else True)
        elif dnode == self.lb_nodeid and self.group is not None:
            self.group.from_network(h, payload, link)
        else:
            self.count_error(h, E.EDVSBADNODEID)
            ack = error_ack(h, E.EDVSBADNODEID)
            if ack is not None:
                self.send_to_node(h.c_snode, ack)

    def from_local(self, h: Header, payload) -> None:
        """A command local processes addressed to the LB node (the get2rmt thread)."""
        if self.group is not None:
            self.group.from_local(h, payload)
            return
        ack = error_ack(h, E.EDVSDSTDIED)
        if ack is not None:
            self.put2lcl.put(ack)

    def send_to_node(self, nodeid: int, h: Header, data: bytes | memoryview = b"") -> bool:
        """Write a frame to a peer's link (any thread may; the link's lock keeps frames whole)."""
        link = self.links.get(nodeid)
        if link is None or not link.up:
            if nodeid == self.local and self.put2lcl is not None:
                self.put2lcl.put(h, bytes(data))
                return True
            return False
        return link.submit(h.buf, data)

    def hello_for(self, peer: int, report: bool = False) -> Header:
        """A HELLO for `peer`; with `report`, carrying this node's load report (D11)."""
        body = self.meter_report() if report else None
        return hello_frame(self.local, peer, body)

    def meter_report(self) -> bytes | None:
        return self.group.load_report() if self.group is not None else None

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
        """A control frame (a HELLO with a message body, D12) to a peer."""
        return self.send_to_node(nodeid, hello_frame(self.local, nodeid, body))

    def activity(self) -> int:
        """Commands this DSP moved since the last call (carried in load reports)."""
        total = sum(dc.commands for link in list(self.links.values())
                    for counters in (link.sent, link.received)
                    for dc in list(counters.by_dc.values()))  # DC traffic only: not HELLOs
        moved, self._activity_mark = total - self._activity_mark, total
        return max(0, moved)  # a reload that removed a link lowers the total

    def on_control(self, link: Link, h: Header) -> None:
        m_type = h.c_msg.m_type
        if m_type in (MT_SVC_START, MT_SVC_STOP):
            self.services.handle(link, h.c_msg)
        elif m_type == MT_NEED_SERVER:
            if self.autoscaler is not None:
                self.autoscaler.no_server = True
        elif self.group is not None:
            self.group.on_control(link, h)

    def count_error(self, h: Header, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    # ------------------------------------------------------------------ running and stopping
    def snapshot(self) -> dict:
        """Everything an operator (or the demo) wants to see, as plain data."""
        links = {}
        for peer, link in sorted(list(self.links.items())):
            links[peer] = {
                "name": link.spec.name, "up": link.up, "downs": link.downs,
                "generation": link.generation,
                "address": f"{link.spec.host}:{link.spec.sport}",
                "listen_port": link.spec.rport,
                "sent": link.sent.as_dict(),
                "received": link.received.as_dict(),
            }
        return {
            "node": self.local, "lb_node": self.lb_nodeid, "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 1), "links": links,
            "put2lcl_errors": {E.error_name(c): n for c, n in list(self.errors.items())},
            "group": self.group.snapshot() if self.group is not None else None,
            "autoscaler": self.autoscaler.snapshot() if self.autoscaler is not None else None,
            "config": config_view(self.cfg),
            "reloads": dict(self.reloads),
            "stats": self.stats_address,
        }

    def write_status(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f, indent=1, default=str)
        os.replace(tmp, path)

    def run(self, status_file: str | None = None, config_path: str | None = None) -> None:
        next_sample = 0.0
        while not self.stopping.wait(1.0):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                if config_path:
                    self.reload(config_path)
                    next_sample = 0.0
            if status_file:
                try:
                    self.write_status(status_file)
                except OSError as exc:
                    log.warning("cannot write %s: %s", status_file, exc)
            if self.group is None:
                continue
            now = time.monotonic()
            if now >= next_sample:
                from .group import LEVEL_NAMES
                before = self.group.meter.level
                self.group.sample_load()
                after = self.group.meter.level
                if after != before:
                    log.info("this node's load level %s -> %s (cpu %d%%)",
                             LEVEL_NAMES.get(before, before), LEVEL_NAMES.get(after, after),
                             self.group.meter.cpu)
                next_sample = now + self.period
            self.group.tick()
            self.autoscaler.tick()
        if status_file:
            try:
                self.write_status(status_file)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        for scope in list(self.scopes.values()):
            scope.stopping.set()

    def shutdown(self) -> None:
        """Graceful stop: links disconnected, proxies unbound (the kernel wakes their
        callers with EDVSNOTCONN)."""
        self.stop()
        self.services.stop_all()
        for link in self.links.values():
            link.stop()
        self.monitor.stop()
        for pxid in self.pairs:
            try:
                self.dvk.proxies_unbind(pxid)
            except E.DvkError as err:
                log.debug("proxies_unbind(%d): %s", pxid, err)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        log.info("DSP of node %d stopped", self.local)

    # ------------------------------------------------------------------ live reload (SIGHUP)
    def reload(self, path: str) -> bool:
        """Re-read and validate the config; on success apply what can change live (services,
        thresholds, timers, peers added or removed) without touching the links that did not
        change; on any error keep the running config and log why."""
        log.info("reloading %s", path)
        try:
            new = cfgmod.load(path, self.dvs, local_node=self.local)
        except cfgmod.ConfigError as err:
            for line in str(err).splitlines():
                log.error("reload: %s", line)
            return self._reload_failed(path, str(err).splitlines()[0] if str(err) else "")
        except OSError as exc:
            log.error("reload: %s: %s", path, exc.strerror)
            return self._reload_failed(path, f"{path}: {exc.strerror}")
        why = restart_needed(self.cfg, new, self.local)
        if why:
            log.error("reload: %s needs a restart of dsp_proxy", why)
            return self._reload_failed(path, f"{why} needs a restart")
        for w in new.warnings:
            log.warning("reload: %s", w)
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
            self.group.reload(new)
        if self.autoscaler is not None:
            self.autoscaler.reload(new)
        for spec in added:
            try:
                self._start_peer(spec)
            except (E.DvkError, TimeoutError) as exc:
                log.error("reload: link to node %d (%s) could not start: %s", spec.nodeid,
                          spec.name, exc)
                self._remove_peer(spec.nodeid)
            else:
                log.info("reload: link to node %d (%s) added", spec.nodeid, spec.name)
        self._join_dcs()
        self._bind_services()
        self.reloads["ok"] += 1
        self.reloads["last"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.reloads["last_error"] = None
        log.info("reload of %s done: %d links removed, %d added, %d unchanged", path,
                 len(removed), len(added), len(new_specs) - len(added))
        return True

    def _reload_failed(self, path: str, why: str) -> bool:
        self.reloads["failed"] += 1
        self.reloads["last_error"] = why
        log.error("reload of %s failed: the running configuration is kept", path)
        return False

    def _remove_peer(self, peer: int) -> None:
        """A peer left the config: its link goes down, its threads end, its listener closes,
        its proxy pair is unbound (the kernel ends the node: REMOTE slots unbound, DCs left)."""
        link = self.links.pop(peer, None)
        scope = self.scopes.pop(peer, None)
        if scope is not None:
            scope.stopping.set()
        if link is not None:
            link.stop()
            self.acceptor.remove(link)
        if self.group is not None and peer in self.group.servers:
            self.group.server_down(peer)
        if peer in self.pairs:
            self.pairs.remove(peer)
            try:
                self.dvk.proxies_unbind(peer)
            except E.DvkError as err:
                log.debug("proxies_unbind(%d): %s", peer, err)
        threads = scope.pair_threads if scope is not None else []
        deadline = time.monotonic() + SHUTDOWN_GRACE * 2
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("reload: thread %s of node %d did not end", t.name, peer)
            elif t in self.threads:
                self.threads.remove(t)
        log.info("reload: link to node %d removed", peer)

    def _unbind_services(self, services) -> None:
        """Undo D5 for services a reload removed (or moved): on a client node, the service's
        ext_ep bound to the LB node is unbound."""
        me = self.cfg.nodes_by_id.get(self.local)
        if me is None or me.role != "client" or self.lb_nodeid < 0:
            return
        for svc in services:
            dcids = [svc.dcid] if svc.dcid >= 0 else self._target_dcs()
            for dcid in dcids:
                try:
                    info = self.dvk.getprocinfo(dcid, svc.ext_ep)
                    if info.p_rts_flags & C.REMOTE and info.p_nodeid == self.lb_nodeid:
                        self.dvk.unbind(dcid, svc.ext_ep)
                        log.info("service %s removed: endpoint %d of DC %d unbound",
                                 svc.name, svc.ext_ep, dcid)
                except E.DvkError as err:
                    log.debug("service %s: unbind of %d in DC %d: %s", svc.name,
                              svc.ext_ep, dcid, err)


class PeerScope:
    """The DSP as one peer's RPROXY/SPROXY see it: every attribute is the DSP's, except
    `stopping`, the peer's own event, set when the DSP stops or a reload removes the peer
    (so those two threads end while the others keep running)."""

    def __init__(self, dsp: Dsp, peer: int) -> None:
        self._dsp = dsp
        self._peer = peer
        self.stopping = threading.Event()
        self.pair_threads: list[threading.Thread] = []

    def __getattr__(self, name: str):
        return getattr(self._dsp, name)


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
    node kernel (D11); on a real DVK node None (= the whole machine)."""
    if getattr(dvk, "backend", "") != "emu":
        return None

    def pids() -> set[int]:
        try:
            text = dvk.proc_text("tasks")
        except (E.DvkError, OSError):
            return set()
        return {int(line.split()[0]) for line in text.splitlines()[1:] if line.strip()}
    return pids


def _local_bind_address(rname: str) -> str:
    """The local node listens on and connects from its rname when that is a local address
    (D9), on all interfaces otherwise."""
    try:
        addr = resolve(rname)
    except OSError:
        return ""
    return addr if is_local_address(addr) else ""


def _find_local_node(cfg_path: str) -> int | None:
    """The config node whose rname is a local, non-loopback-range-wide address."""
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


def open_node_dvk(mode: str, node: int | None, cfg_path: str) -> Dvk:
    """Open the DVK; with the emulator (emu, or emu-ioctl: the kernel backend over the
    emulator's ioctl device) find this node's kernel, or start one as a process of its own."""
    if mode == "kernel" or (mode == "auto" and os.path.exists(C.DVK_FILE_NAME)):
        return open_dvk("kernel")
    from dvk_cffi.emu import node as emunode
    from dvk_cffi.emu.client import DvkUnavailable
    from dvk_cffi.emu.server import socket_path
    backend = "emu-ioctl" if mode == "emu-ioctl" else "emu"
    if node is None and os.environ.get("DVK_NODE"):
        node = int(os.environ["DVK_NODE"])
    if node is None and not os.environ.get("DVK_SOCKET"):
        node = _find_local_node(cfg_path)
    try:
        dvk = open_dvk(backend, node=node)
    except DvkUnavailable:
        if node is None:
            raise
        log.info("no DVK node kernel for node %d: starting one", node)
        emunode.start_node(node, detach=True)
        dvk = open_dvk(backend, path=socket_path(node))
    if backend == "emu-ioctl":
        log.info("DVK: the kernel backend, through the emulated node's ioctl device")
    return dvk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsp_proxy", description="Distributed Service Proxy")
    p.add_argument("config", help="configuration file")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print the cluster summary and exit")
    p.add_argument("--dvk", choices=("auto", "kernel", "emu", "emu-ioctl"), default="auto",
                   help="DVK backend (auto: the kernel when /dev/dvk exists; emu-ioctl: the "
                        "kernel backend driving an emulated node through its ioctl device)")
    p.add_argument("--node", type=int, default=None,
                   help="emulated node kernel to attach to (default DVK_NODE, or the node "
                        "whose rname is a local address)")
    p.add_argument("--log-level", default=os.environ.get("DSP_LOG_LEVEL", "INFO"))
    p.add_argument("--log-file", default=None)
    p.add_argument("--allow-any-peer", action="store_true",
                   help="accept a peer's connection from any address (NAT)")
    p.add_argument("--status-file", default=None,
                   help="write the daemon's figures as JSON to this file every second")
    p.add_argument("--stats", default=None, metavar="[ADDR:]PORT",
                   help="serve statistics over HTTP (/, /stats.json, /metrics); ADDR "
                        "defaults to 127.0.0.1, port 0 picks a free one; off by default")
    p.add_argument("--pidfile", default=None,
                   help="write the daemon's pid to this file (removed at exit)")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> int:
    try:
        cfg = cfgmod.load(args.config, DvsInfo(), local_node=args.node)
    except cfgmod.ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.config}: {exc.strerror}", file=sys.stderr)
        return 1
    print(cfgmod.format_summary(cfg, args.node))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["stats"]:  # `dsp_proxy stats [ADDR:PORT]`: the figures of a running DSP
        return statsmod.client_main(argv[1:])
    args = parse_args(argv)
    if args.check:
        return check(args)
    stats_addr = None
    if args.stats:
        try:
            stats_addr = statsmod.parse_address(args.stats)
        except ValueError as exc:
            print(f"dsp_proxy: --stats: {exc}", file=sys.stderr)
            return 2
    setup_logging(args.log_level, args.log_file)
    try:
        dvk = open_node_dvk(args.dvk, args.node, args.config)
        local, dvs = dvk.getdvsinfo()
    except (OSError, E.DvkError, TimeoutError, RuntimeError) as exc:
        log.error("cannot open the DVK: %s", exc)
        return 1
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
    if cfg.nodes_by_id.get(local) is None:
        log.error("node %d (this DVK) is not a node of %s", local, args.config)
        return 1
    dsp = Dsp(dvk, cfg, local, dvs, allow_any_peer=args.allow_any_peer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: dsp.stop())
    signal.signal(signal.SIGHUP, lambda *_: dsp.reload_requested.set())
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
    if args.pidfile:
        write_pidfile(args.pidfile)
    log.info("DSP of node %d running: %d peers, LB node %s", local, len(dsp.links),
             dsp.lb_nodeid if dsp.lb_nodeid >= 0 else "none")
    try:
        dsp.run(args.status_file, os.path.abspath(args.config))
        dsp.shutdown()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0


def write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


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
