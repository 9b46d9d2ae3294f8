"""The emulated DVK node kernel: the semantics of dvk_abi.md §4 in user space.

One `NodeKernel` is one DVS node.  It keeps the kernel's object model (DCs with slot tables of
process descriptors, nodes, proxy pairs with their outgoing FIFO), and every call runs under one
kernel lock, the way the module serialises on its own locks.  A caller that must block sleeps on
its task's condition variable; the call that satisfies it wakes it with a result code.

Callers are `Task`s (one per Linux thread that talks to the kernel, identified by its TID).  The
server (`server.py`) creates them from socket connections; the memory of their process lives in
an `AddressSpace` of shared-memory arenas.

Deviations from the kernel, each deliberate, are listed in docs/emulator.md.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .. import consts as C
from .. import errors as E
from ..info import DcInfo, DvsInfo, NodeInfo, ProcInfo, ProxiesInfo
from ..wire import HEADER_SIZE, MESSAGE_SIZE, Header, Message
from .memory import AddressSpace

log = logging.getLogger("dvk.emu")

# DVK call numbers (dvk_calls.h) used in the allowed-calls bitmaps (§1.5).
DVK_SEND, DVK_RECEIVE, DVK_NOTIFY, DVK_SENDREC, DVK_RCVRQST, DVK_REPLY = 2, 3, 4, 5, 6, 7
DVK_UNBIND, DVK_VCOPY, DVK_GETEP, DVK_WAIT4BIND = 10, 13, 26, 29
DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_PUT2LCL, DVK_GET2RMT = 17, 18, 20, 21
ALL_CALLS = frozenset(range(35))
USER_CALLS = frozenset({DVK_SENDREC, DVK_UNBIND, DVK_GETEP, DVK_WAIT4BIND})
SPROXY_CALLS = frozenset({DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_GET2RMT})
RPROXY_CALLS = frozenset({DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_PUT2LCL})

#: How often a sleeping caller checks that its process is still there.
LIVENESS_SLICE = 0.1


class TaskGone(Exception):
    """The calling task exited (its connection closed) while it slept in the kernel."""


@dataclass(eq=False)
class Task:
    """A Linux thread known to the node kernel."""

    tid: int
    pid: int
    comm: str = ""
    space: AddressSpace | None = None
    cond: threading.Condition | None = None
    desc: Desc | None = None            # bound DC slot, if any
    proxy: Desc | None = None           # proxy descriptor, if this task is a proxy
    woken: bool = False
    wake_rc: int = 0
    inbox: bytes | None = None          # message delivered while it slept
    dead: bool = False
    attached: bool = False              # has a live connection
    probe: object = None                # callable -> bool: is the peer still there?


@dataclass(eq=False)
class Desc:
    """A process descriptor: a DC slot (LOCAL or REMOTE) or one half of a proxy pair."""

    nr: int
    dcid: int
    endpoint: int
    rts: int = C.SLOT_FREE
    misc: int = 0
    lpid: int = -1
    vpid: int = -1
    nodeid: int = -1
    nodemap: int = 0
    getfrom: int = C.NONE
    sendto: int = C.NONE
    waitmigr: int = C.NONE
    waitunbind: int = C.NONE
    proxy: int = C.NONE
    lclsent: int = 0
    rmtsent: int = 0
    lclcopy: int = 0
    rmtcopy: int = 0
    name: str = "$noname"
    task: Task | None = None
    allowed: frozenset = frozenset()
    priv_id: int = 0
    msg: bytes = bytes(MESSAGE_SIZE)     # p_message: the message it is trying to send
    senders: deque = field(default_factory=deque)   # p_list: descriptors waiting to send to it
    notify_pending: set = field(default_factory=set)  # slot indexes of pending notifiers
    update_pending: int = 0
    rmtcmd: Header = field(default_factory=Header)  # p_rmtcmd
    unbind_waiters: list = field(default_factory=list)

    @property
    def is_remote(self) -> bool:
        return bool(self.rts & C.REMOTE)

    @property
    def is_free(self) -> bool:
        return bool(self.rts & C.SLOT_FREE)

    def info(self) -> ProcInfo:
        return ProcInfo(self.nr, self.endpoint, self.dcid, self.rts, self.lpid, self.vpid,
                        self.nodeid, self.nodemap, self.misc, self.getfrom, self.sendto,
                        self.waitmigr, self.waitunbind, self.proxy, self.lclsent, self.rmtsent,
                        self.lclcopy, self.rmtcopy, self.name, 0)


class DC:
    """A distributed container: its parameters and slot table."""

    def __init__(self, info: DcInfo) -> None:
        self.info = info
        self.slots: list[Desc] = []

    def reset(self) -> None:
        i = self.info
        self.slots = [Desc(nr=n, dcid=i.dc_dcid, endpoint=n)
                      for n in range(-i.dc_nr_tasks, i.dc_nr_procs)]

    def slot(self, p_nr: int) -> Desc | None:
        idx = p_nr + self.info.dc_nr_tasks
        if 0 <= idx < len(self.slots):
            return self.slots[idx]
        return None

    def in_range(self, p_nr: int) -> bool:
        return -self.info.dc_nr_tasks <= p_nr < self.info.dc_nr_procs

    def is_sys(self, p_nr: int) -> bool:
        return p_nr + self.info.dc_nr_tasks < self.info.dc_nr_sysprocs

    @property
    def running(self) -> bool:
        return self.info.dc_flags == C.DC_RUNNING


class ProxyPair:
    """A proxy pair: sender and receiver descriptors and the sender's outgoing FIFO."""

    def __init__(self, pxid: int) -> None:
        self.info = ProxiesInfo(px_id=pxid)
        self.sproxy: Desc | None = None
        self.rproxy: Desc | None = None
        self.queue: deque[Desc] = deque()

    @property
    def in_use(self) -> bool:
        return bool(self.info.px_flags & C.PROXIES_INUSE)


def _ep_p(ep: int) -> int:
    return C._ENDPOINT_P(ep)


class NodeKernel:
    """The DVK of one node.  All public methods take the calling `Task` first and return the
    stub's result or raise `DvkError` (the server turns it into the negative code)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local_nodeid = C.DVS_NO_INIT
        self.dvs = DvsInfo()
        self.dcs: list[DC] = []
        self.nodes: list[NodeInfo] = []
        self.proxies: list[ProxyPair] = []
        self.tasks: dict[int, Task] = {}
        self.spaces: dict[int, AddressSpace] = {}
        self.bind_waiters: set[Task] = set()
        self.started = time.time()

    # ================================================================ tasks and processes
    def attach(self, pid: int, tid: int, comm: str, probe=None) -> Task:
        """A thread opened a connection: find or create its task."""
        with self.lock:
            task = self.tasks.get(tid)
            if task is None or task.dead or task.pid != pid:
                task = self._new_task(tid, pid, comm)
            task.comm = comm or task.comm
            task.attached = True
            task.probe = probe
            return task

    def _new_task(self, tid: int, pid: int, comm: str = "") -> Task:
        space = self.spaces.get(pid)
        if space is None:
            space = self.spaces[pid] = AddressSpace(pid)
        task = Task(tid=tid, pid=pid, comm=comm, space=space,
                    cond=threading.Condition(self.lock))
        self.tasks[tid] = task
        return task

    def _lookup_task(self, pid: int) -> Task | None:
        """The task of a Linux TID/PID, also one that has not talked to the kernel yet."""
        task = self.tasks.get(pid)
        if task is not None and not task.dead:
            return task
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            tgid = int(status["Tgid"].strip())
            comm = status["Name"].strip()
        except (OSError, KeyError, ValueError):
            return None
        return self._new_task(pid, tgid, comm)

    def detach(self, task: Task) -> None:
        """The task's connection closed: the thread exited (the kernel's exit hook)."""
        with self.lock:
            task.attached = False
            self._task_exit(task)

    def reap(self) -> None:
        """Exit the tasks that were bound without a connection and whose thread is gone."""
        with self.lock:
            for task in list(self.tasks.values()):
                if not task.attached and not task.dead and not _alive(task.tid):
                    self._task_exit(task)

    def _task_exit(self, task: Task) -> None:
        if task.dead:
            return
        task.dead = True
        log.debug("task %d (pid %d %s) exits", task.tid, task.pid, task.comm)
        if task.desc is not None:
            desc = task.desc
            self._do_unbind(self.dcs[desc.dcid], desc)
        if task.proxy is not None:
            self._proxy_exit(task.proxy)
        task.cond.notify_all()
        self.tasks.pop(task.tid, None)
        if not any(t.pid == task.pid for t in self.tasks.values()):
            space = self.spaces.pop(task.pid, None)
            if space is not None:
                space.close()

    def add_arena(self, task: Task, fd: int, size: int) -> int:
        with self.lock:
            try:
                return task.space.add(fd, size)
            except MemoryError:
                raise E.DvkError.for_code(E.EDVSNOMEM) from None
            except (OSError, ValueError):
                raise E.DvkError.for_code(E.EDVSBADF) from None

    # ================================================================ sleeping and waking
    def _sleep(self, task: Task, tout: int, timeout_rc: int = E.EDVSTIMEDOUT) -> int:
        """Block the caller until woken or `tout` ms passed (-1 = forever).  Lock held."""
        task.woken = False
        deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
        while not task.woken:
            if task.dead:
                raise TaskGone()
            if deadline is None:
                slice_ = LIVENESS_SLICE
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return timeout_rc
                slice_ = min(remaining, LIVENESS_SLICE)
            task.cond.wait(slice_)
            if not task.woken and task.probe is not None and not task.probe():
                self._task_exit(task)
        return task.wake_rc

    @staticmethod
    def _wake(desc: Desc, rc: int) -> None:
        task = desc.task
        if task is None:
            return
        task.wake_rc = rc
        task.woken = True
        task.cond.notify_all()

    # ================================================================ checks
    def _require_init(self) -> None:
        if self.local_nodeid < 0:
            raise E.DvkError.for_code(E.EDVSDVSINIT)

    def _dc(self, dcid: int) -> DC:
        if not 0 <= dcid < self.dvs.d_nr_dcs:
            raise E.DvkError.for_code(E.EDVSBADDCID)
        return self.dcs[dcid]

    def _running_dc(self, dcid: int) -> DC:
        dc = self._dc(dcid)
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        return dc

    def _caller(self, task: Task, call: int) -> tuple[DC, Desc]:
        """check_caller: bound, DC running, call allowed."""
        self._require_init()
        desc = task.desc
        if desc is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        dc = self.dcs[desc.dcid]
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        if call not in desc.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)
        return dc, desc

    def _proxy_caller(self, task: Task, call: int) -> Desc:
        self._require_init()
        px = task.proxy
        if px is None:
            raise E.DvkError.for_code(E.EDVSNOTBIND if task.desc is None else E.EDVSBADCALL)
        if call not in px.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)
        pair = self.proxies[px.nr]
        if not pair.in_use or pair.sproxy is None or pair.rproxy is None:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        if not px.misc & C.MIS_CONNECTED:
            raise E.DvkError.for_code(E.EDVSNOTCONN)
        return px

    def _dest(self, dc: DC, caller: Desc, ep: int, free_rc: int,
              self_rc: int = E.EDVSENDPOINT) -> Desc:
        """Destination checks shared by send/sendrec/reply/notify (§4.4)."""
        p_nr = _ep_p(ep)
        if not dc.in_range(p_nr):
            raise E.DvkError.for_code(E.EDVSRANGE)
        if ep == C.HARDWARE:
            raise E.DvkError.for_code(E.EDVSBADDEST)
        dst = dc.slot(p_nr)
        if dst is caller:
            raise E.DvkError.for_code(self_rc)
        if dst.is_free:
            raise E.DvkError.for_code(free_rc)
        if dst.endpoint != ep:
            raise E.DvkError.for_code(E.EDVSENDPOINT)
        if not 0 <= dst.nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        if not dc.info.dc_nodes & (1 << dst.nodeid):
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        return dst

    @staticmethod
    def _waiting_for(dst: Desc, src_ep: int) -> bool:
        """RECEIVING, not SENDING, and receiving from ANY or from `src_ep`."""
        return (dst.rts & C.RECEIVING and not dst.rts & C.SENDING
                and dst.getfrom in (C.ANY, src_ep))

    # ================================================================ DVS / DC / nodes
    def dvs_init(self, task: Task, nodeid: int, params: DvsInfo | None) -> int:
        with self.lock:
            if self.local_nodeid >= 0:
                raise E.DvkError.for_code(E.EDVSDVSBUSY)
            p = params or DvsInfo()
            if not 0 <= nodeid < p.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            if not (1 <= p.d_nr_dcs <= C.NR_DCS and 1 <= p.d_nr_nodes <= C.NR_NODES
                    and 1 <= p.d_nr_procs <= C.NR_PROCS and 1 <= p.d_nr_tasks <= C.NR_TASKS
                    and 1 <= p.d_nr_sysprocs <= C.NR_SYS_PROCS
                    and p.d_nr_sysprocs < p.d_nr_procs + p.d_nr_tasks
                    and p.d_nr_sysprocs > p.d_nr_tasks):
                raise E.DvkError.for_code(E.EDVSBADRANGE)
            if not (p.d_max_copybuf <= C.MAXCOPYBUF and p.d_max_copylen <= C.MAXCOPYLEN
                    and p.d_max_copylen >= p.d_max_copybuf):
                raise E.DvkError.for_code(E.EDVSBADVALUE)
            self.dvs = DvsInfo(**{**p.__dict__})
            self.dvs.d_version = C.DVS_VERSION
            self.dvs.d_flags = (p.d_flags & (C.DVK_IPC | C.DVK_IOCTL | C.DVK_USERMODE)) \
                | C.DVK_IOCTL | C.DVK_INITIALIZED
            self.dvs.d_size_proc = ProcInfo.STRUCT.size
            self.dcs = [DC(DcInfo(dc_dcid=i, dc_flags=C.DC_FREE)) for i in range(p.d_nr_dcs)]
            self.nodes = [NodeInfo(n_nodeid=i) for i in range(p.d_nr_nodes)]
            self.proxies = [ProxyPair(i) for i in range(p.d_nr_nodes)]
            self.local_nodeid = nodeid
            local = self.nodes[nodeid]
            local.n_name = f"node{nodeid}"
            local.n_flags = C.NODE_ATTACHED | C.NODE_SCONNECTED  # the kernel's 0x6 (§3.4)
            log.info("DVS initialised: node %d", nodeid)
            return nodeid

    def dvs_end(self, task: Task) -> int:
        with self.lock:
            self._require_init()
            for dc in self.dcs:
                if dc.running:
                    self._dc_end(dc)
            for pair in self.proxies:
                if pair.in_use:
                    self._proxies_unbind(pair)
            self.local_nodeid = C.DVS_NO_INIT
            return 0

    def getdvsinfo(self, task: Task) -> tuple[int, DvsInfo]:
        with self.lock:
            return self.local_nodeid, self.dvs

    def dc_init(self, task: Task, p: DcInfo) -> int:
        with self.lock:
            self._require_init()
            d = self.dvs
            if not (0 <= p.dc_dcid < d.d_nr_dcs and 1 <= p.dc_nr_procs <= d.d_nr_procs
                    and 1 <= p.dc_nr_tasks <= d.d_nr_tasks
                    and 1 <= p.dc_nr_sysprocs <= d.d_nr_sysprocs
                    and 1 <= p.dc_nr_nodes <= d.d_nr_nodes
                    and p.dc_nr_sysprocs < p.dc_nr_procs + p.dc_nr_tasks
                    and p.dc_nr_sysprocs > p.dc_nr_tasks):
                raise E.DvkError.for_code(E.EDVSBADRANGE)
            if len(p.dc_name.encode()) >= C.MAXDCNAME:
                raise E.DvkError.for_code(E.EDVSNAMESIZE)
            for dc in self.dcs:
                if dc.running and (dc.info.dc_dcid == p.dc_dcid or dc.info.dc_name == p.dc_name):
                    raise E.DvkError.for_code(E.EDVSRSCBUSY)
            info = DcInfo(**{**p.__dict__})
            info.dc_flags = C.DC_RUNNING
            info.dc_nodes = 1 << self.local_nodeid
            info.dc_pid = task.pid
            dc = self.dcs[p.dc_dcid]
            dc.info = info
            dc.reset()
            self.nodes[self.local_nodeid].n_dcs |= 1 << p.dc_dcid
            log.info("DC %d (%s) initialised", p.dc_dcid, p.dc_name)
            return self.local_nodeid

    def dc_end(self, task: Task, dcid: int) -> int:
        with self.lock:
            self._require_init()
            dc = self._running_dc(dcid)
            self._dc_end(dc)
            return 0

    def _dc_end(self, dc: DC) -> None:
        for desc in dc.slots:
            if not desc.is_free:
                if not desc.is_remote and desc.task is not None and desc.task.pid != os.getpid():
                    _signal(desc.task.tid, signal.SIGTERM)
                self._do_unbind(dc, desc)
        dc.info.dc_flags = C.DC_FREE
        dc.info.dc_nodes = 0
        for node in self.nodes:
            node.n_dcs &= ~(1 << dc.info.dc_dcid)

    def getdcinfo(self, task: Task, dcid: int) -> DcInfo:
        with self.lock:
            self._require_init()
            if dcid == -1:
                if task.desc is None:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                dcid = task.desc.dcid
            return self._dc(dcid).info

    def getnodeinfo(self, task: Task, nodeid: int) -> NodeInfo:
        with self.lock:
            self._require_init()
            if nodeid == -1:
                nodeid = self.local_nodeid
            if not 0 <= nodeid < self.dvs.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            return self.nodes[nodeid]

    def getprocinfo(self, task: Task, dcid: int, p_nr: int) -> ProcInfo:
        with self.lock:
            self._require_init()
            if dcid == -1:
                if task.desc is None:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                dcid = task.desc.dcid
            dc = self._dc(dcid)
            if not dc.running:
                raise E.DvkError.for_code(E.EDVSDCNOTRUN)
            desc = dc.slot(p_nr)
            if desc is None:
                raise E.DvkError.for_code(E.EDVSBADPROC)
            return desc.info()

    def getproxyinfo(self, task: Task, pxid: int) -> tuple[ProcInfo, ProcInfo]:
        with self.lock:
            self._require_init()
            pair = self._pair(pxid)
            if not pair.in_use:
                raise E.DvkError.for_code(E.EDVSPROXYFREE)
            return pair.sproxy.info(), pair.rproxy.info()

    def _pair(self, pxid: int) -> ProxyPair:
        if not 0 <= pxid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSPROXYID)
        return self.proxies[pxid]

    def add_node(self, task: Task, dcid: int, nodeid: int) -> int:
        with self.lock:
            self._require_init()
            if not 0 <= nodeid < self.dvs.d_nr_nodes or nodeid == self.local_nodeid:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            node = self.nodes[nodeid]
            if node.n_flags == C.NODE_FREE:
                raise E.DvkError.for_code(E.EDVSNODEFREE)
            dc = self._running_dc(dcid)
            if dc.info.dc_nodes & (1 << nodeid):
                raise E.DvkError.for_code(E.EDVSDCNODE)
            if bin(dc.info.dc_nodes).count("1") >= dc.info.dc_nr_nodes:
                raise E.DvkError.for_code(E.EDVSRSCBUSY)
            dc.info.dc_nodes |= 1 << nodeid
            node.n_dcs |= 1 << dcid
            return 0

    def del_node(self, task: Task, dcid: int, nodeid: int) -> int:
        with self.lock:
            self._require_init()
            if not 0 <= nodeid < self.dvs.d_nr_nodes or nodeid == self.local_nodeid:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            dc = self._running_dc(dcid)
            if not dc.info.dc_nodes & (1 << nodeid):
                raise E.DvkError.for_code(E.EDVSDCNODE)
            dc.info.dc_nodes &= ~(1 << nodeid)
            self.nodes[nodeid].n_dcs &= ~(1 << dcid)
            return 0

    # ================================================================ proxies
    def proxies_bind(self, task: Task, name: str, pxid: int, spid: int, rpid: int,
                     maxbytes: int) -> int:
        with self.lock:
            self._require_init()
            if not 0 <= pxid < self.dvs.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            stask, rtask = self._lookup_task(spid), self._lookup_task(rpid)
            if stask is None or rtask is None:
                raise E.DvkError.for_code(E.EDVSBADPID)
            pair = self.proxies[pxid]
            if pair.in_use:
                raise E.DvkError.for_code(E.EDVSRSCBUSY)
            if maxbytes > C.MAXCOPYBUF:
                raise E.DvkError.for_code(E.EDVS2BIG)
            for t in (stask, rtask):
                if t.proxy is not None or t.desc is not None:
                    raise E.DvkError.for_code(E.EDVSBADPID)
            pair.info = ProxiesInfo(px_id=pxid, px_flags=C.PROXIES_INUSE, px_maxbytes=maxbytes,
                                    px_name=name[:C.MAXPROXYNAME - 1])
            pair.queue.clear()
            for role, t, calls in (("s", stask, SPROXY_CALLS), ("r", rtask, RPROXY_CALLS)):
                desc = Desc(nr=pxid, dcid=C.PROXY_NO_DC, endpoint=C.NONE, rts=0,
                            misc=C.MIS_PROXY, lpid=t.tid, vpid=t.tid,
                            nodeid=self.local_nodeid, name=(t.comm or name)[:15],
                            task=t, allowed=calls, priv_id=C.PROXY_PRIV)
                t.proxy = desc
                if role == "s":
                    pair.sproxy = desc
                else:
                    pair.rproxy = desc
                self._wake(desc, C.NONE)  # a proxy polling wait4bind(SELF) may go on
            return 0

    def proxies_unbind(self, task: Task, pxid: int) -> int:
        with self.lock:
            self._require_init()
            pair = self._pair(pxid)
            if not pair.in_use:
                raise E.DvkError.for_code(E.EDVSPROXYFREE)
            self._proxies_unbind(pair)
            return 0

    def _proxy_exit(self, desc: Desc) -> None:
        pair = self.proxies[desc.nr]
        if pair.in_use and desc in (pair.sproxy, pair.rproxy):
            self._proxies_unbind(pair)

    def _proxies_unbind(self, pair: ProxyPair) -> None:
        """Free a pair: its nodes lose the link; a node left with no direction ends (§4.2)."""
        nodemap = pair.sproxy.nodemap if pair.sproxy else 0
        for nodeid in _bits(nodemap):
            self._flush_sender(pair, nodeid)
            self._flush_waiting(nodeid)
            node = self.nodes[nodeid]
            node.n_flags &= ~(C.NODE_SCONNECTED | C.NODE_RCONNECTED)
            self._node_end(nodeid)
        for desc in (pair.sproxy, pair.rproxy):
            if desc is not None:
                desc.misc &= ~C.MIS_CONNECTED
                self._wake(desc, E.EDVSNOTCONN)  # a get2rmt sleeper returns
                if desc.task is not None:
                    desc.task.proxy = None
        pair.sproxy = pair.rproxy = None
        pair.queue.clear()
        pair.info = ProxiesInfo(px_id=pair.info.px_id)

    def _node_end(self, nodeid: int) -> None:
        """do_node_end: unbind every REMOTE descriptor of the node, drop it from every DC."""
        for dc in self.dcs:
            if not dc.running:
                continue
            for desc in dc.slots:
                if desc.is_remote and desc.nodeid == nodeid:
                    self._do_unbind(dc, desc)
            dc.info.dc_nodes &= ~(1 << nodeid)
        self.nodes[nodeid] = NodeInfo(n_nodeid=nodeid)

    def node_up(self, task: Task, name: str, nodeid: int, pxid: int) -> int:
        with self.lock:
            self._require_init()
            if not 0 <= nodeid < self.dvs.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            pair = self._pair(pxid)
            if not pair.in_use:
                raise E.DvkError.for_code(E.EDVSPROXYFREE)
            for desc in (pair.sproxy, pair.rproxy):
                desc.nodemap |= 1 << nodeid
            node = self.nodes[nodeid]
            node.n_flags = C.NODE_ATTACHED
            if pair.info.px_flags & C.PROXIES_SCONNECTED:
                node.n_flags |= C.NODE_SCONNECTED
            if pair.info.px_flags & C.PROXIES_RCONNECTED:
                node.n_flags |= C.NODE_RCONNECTED
            node.n_proxies = pxid
            node.n_name = name[:C.MAXNODENAME - 1]
            return 0

    def node_down(self, task: Task, nodeid: int) -> int:
        """The kernel's test is inverted (§4.2): only a node the pair does not serve is
        cleared.  Reproduced: it loses no message and hangs nobody."""
        with self.lock:
            self._require_init()
            if not 0 <= nodeid < self.dvs.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            node = self.nodes[nodeid]
            if node.n_proxies >= 0:
                pair = self.proxies[node.n_proxies]
                if pair.sproxy is None or not pair.sproxy.nodemap & (1 << nodeid):
                    self.nodes[nodeid] = NodeInfo(n_nodeid=nodeid)
            return 0

    def proxy_conn(self, task: Task, pxid: int, status: int) -> int:
        with self.lock:
            self._require_init()
            pair = self._pair(pxid)
            if not pair.in_use:
                raise E.DvkError.for_code(E.EDVSPROXYFREE)
            if pair.sproxy is None or pair.rproxy is None:
                raise E.DvkError.for_code(E.EDVSNOPROXY)
            nodes = list(_bits(pair.sproxy.nodemap))
            if status == C.CONNECT_SPROXY:
                pair.info.px_flags |= C.PROXIES_SCONNECTED
                pair.sproxy.misc |= C.MIS_CONNECTED
                for n in nodes:
                    self.nodes[n].n_flags |= C.NODE_SCONNECTED
            elif status == C.CONNECT_RPROXY:
                pair.info.px_flags |= C.PROXIES_RCONNECTED
                pair.rproxy.misc |= C.MIS_CONNECTED
                for n in nodes:
                    self.nodes[n].n_flags |= C.NODE_RCONNECTED
            elif status == C.DISCONNECT_SPROXY:
                pair.info.px_flags &= ~C.PROXIES_SCONNECTED
                pair.sproxy.misc &= ~C.MIS_CONNECTED
                for n in nodes:
                    self.nodes[n].n_flags &= ~C.NODE_SCONNECTED
                    self._flush_sender(pair, n)
                self._wake(pair.sproxy, E.EDVSNOTCONN)
            elif status == C.DISCONNECT_RPROXY:
                pair.info.px_flags &= ~C.PROXIES_RCONNECTED
                pair.rproxy.misc &= ~C.MIS_CONNECTED
                for n in nodes:
                    self.nodes[n].n_flags &= ~C.NODE_RCONNECTED
                    self._flush_waiting(n)
            else:
                raise E.DvkError.for_code(E.EDVSBADVALUE)
            return 0

    def _flush_sender(self, pair: ProxyPair, nodeid: int) -> None:
        """Empty the sender FIFO of the commands for `nodeid`: local requesters get EDVSNOTCONN,
        queued ACK carriers go back to plain REMOTE."""
        keep = deque()
        for desc in pair.queue:
            if desc.rmtcmd.c_dnode != nodeid:
                keep.append(desc)
                continue
            desc.rts &= ~C.RMTOPER
            desc.proxy = C.NONE
            if not desc.is_remote:
                desc.rts &= ~(C.SENDING | C.RECEIVING | C.ONCOPY)
                desc.misc &= ~C.MIS_ATOMIC
                self._wake(desc, E.EDVSNOTCONN)
        pair.queue = keep

    def _flush_waiting(self, nodeid: int) -> None:
        """Wake every local process waiting for something from `nodeid` with EDVSNOTCONN."""
        for dc in self.dcs:
            if not dc.running:
                continue
            for desc in dc.slots:
                if desc.is_free or desc.is_remote or desc.task is None:
                    continue
                if self._waits_on_node(dc, desc, nodeid):
                    if desc.rts & C.RMTOPER:
                        self._dequeue(desc)  # its request must not leave after it gave up
                    desc.rts &= ~(C.SENDING | C.RECEIVING | C.ONCOPY | C.WAITUNBIND
                                  | C.WAITMIGR)
                    desc.misc &= ~C.MIS_ATOMIC
                    desc.getfrom = desc.sendto = C.NONE
                    self._wake(desc, E.EDVSNOTCONN)

    def _waits_on_node(self, dc: DC, desc: Desc, nodeid: int) -> bool:
        def on_node(ep: int) -> bool:
            if ep in (C.ANY, C.NONE):
                return False
            other = dc.slot(_ep_p(ep))
            return other is not None and other.is_remote and other.nodeid == nodeid

        if desc.rts & C.RECEIVING and on_node(desc.getfrom):
            return True
        if desc.rts & C.SENDING and on_node(desc.sendto) and not desc.rts & C.RMTOPER:
            return True
        if desc.rts & C.ONCOPY and desc.rmtcmd.c_dnode == nodeid:
            return True
        return bool(desc.rts & C.WAITUNBIND and on_node(desc.waitunbind))

    # ================================================================ binding
    def bind(self, task: Task, cmd: int, dcid: int, pid: int, ep: int, nodeid: int,
             name: str) -> int:
        with self.lock:
            self._require_init()
            if not 0 <= cmd <= C.MAX_BIND_TYPE:
                raise E.DvkError.for_code(E.EDVSBINDTYPE)
            target = None
            if cmd in (C.SELF_BIND, C.LCL_BIND, C.REPLICA_BIND, C.USERMODE_BIND):
                if nodeid != C.LOCALNODE:
                    raise E.DvkError.for_code(E.EDVSBADNODEID)
                nodeid = self.local_nodeid
                target = task if pid == -1 else self._lookup_task(pid)
                if target is None:
                    raise E.DvkError.for_code(E.EDVSBADPID)
            else:
                if not 0 <= nodeid < self.dvs.d_nr_nodes or nodeid == self.local_nodeid:
                    raise E.DvkError.for_code(E.EDVSBADNODEID)
                if cmd == C.BKUP_BIND:
                    target = self._lookup_task(pid) if pid > 0 else None
            dc = self._running_dc(dcid)
            p_nr = _ep_p(ep)
            if not dc.in_range(p_nr):
                raise E.DvkError.for_code(E.EDVSBADDCID)  # the kernel's code for this (§4.3)
            if not dc.info.dc_nodes & (1 << nodeid):
                raise E.DvkError.for_code(E.EDVSNODCNODE)
            desc = dc.slot(p_nr)
            if not desc.is_free and cmd not in (C.BKUP_BIND, C.REPLICA_BIND):
                raise E.DvkError.for_code(E.EDVSSLOTUSED)
            if target is not None and (target.desc is not None or target.proxy is not None):
                raise E.DvkError.for_code(E.EDVSBADDCID if target.desc is not None
                                          and target.desc.dcid != dcid else E.EDVSSLOTUSED)
            if cmd == C.RMT_BIND:
                pair_id = self.nodes[nodeid].n_proxies
                pair = self.proxies[pair_id] if pair_id >= 0 else None
                if pair is None or not pair.in_use or pair.sproxy is None:
                    raise E.DvkError.for_code(E.EDVSNOPROXY)
            is_sys = dc.is_sys(p_nr)
            desc.rts = C.REMOTE if cmd in (C.RMT_BIND, C.BKUP_BIND) else 0
            desc.misc = {C.REPLICA_BIND: C.MIS_REPLICATED, C.BKUP_BIND: C.MIS_RMTBACKUP,
                         C.USERMODE_BIND: C.MIS_USERMODE}.get(cmd, 0)
            desc.endpoint = ep
            desc.nodeid = nodeid
            desc.nodemap = 1 << nodeid
            desc.getfrom = desc.sendto = desc.waitmigr = desc.waitunbind = C.NONE
            desc.proxy = C.NONE
            desc.lclsent = desc.rmtsent = desc.lclcopy = desc.rmtcopy = 0
            desc.allowed = ALL_CALLS if is_sys else USER_CALLS
            desc.priv_id = p_nr + dc.info.dc_nr_tasks if is_sys else dc.info.dc_nr_sysprocs
            desc.senders.clear()
            desc.notify_pending.clear()
            desc.update_pending = 0
            desc.rmtcmd = Header()
            if desc.is_remote:
                desc.lpid = desc.vpid = -1
                desc.task = target
                desc.name = (name or "remote")[:15]
            else:
                desc.lpid = desc.vpid = target.tid
                desc.task = target
                desc.name = (target.comm or name or "task")[:15]
                target.desc = desc
                self._wake(desc, ep)  # wait4bind(SELF) of the bound task returns
            self._bind_changed()
            log.debug("bind dc=%d ep=%d node=%d type=%d", dcid, ep, nodeid, cmd)
            return ep

    def unbind(self, task: Task, dcid: int, ep: int, tout: int) -> int:
        with self.lock:
            self._require_init()
            dc = self._running_dc(dcid)
            desc = dc.slot(_ep_p(ep))
            if desc is None:
                raise E.DvkError.for_code(E.EDVSBADDCID)
            if desc.is_free:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            if not 0 <= desc.nodeid < self.dvs.d_nr_nodes:
                raise E.DvkError.for_code(E.EDVSBADNODEID)
            if desc.is_remote or desc.task is task:
                self._do_unbind(dc, desc)
                return 0
            # Another local process: the kernel sends it SIGTERM; its exit unbinds it.
            target = desc.task
            if target is not None:
                if desc.rts & (C.SENDING | C.RECEIVING):
                    self._cancel(desc)  # out of the queues it waits in, like a timeout
                    self._wake(desc, E.EDVSSHUTDOWN)
                _signal(target.tid, signal.SIGTERM)
            caller = task.desc
            if caller is None or tout == C.TIMEOUT_NOWAIT:
                raise E.DvkError.for_code(E.EDVSAGAIN)
            caller.rts |= C.WAITUNBIND
            caller.waitunbind = ep
            desc.unbind_waiters.append(caller)
            try:
                rc = self._sleep(task, tout)
            finally:
                caller.rts &= ~C.WAITUNBIND
                caller.waitunbind = C.NONE
                if caller in desc.unbind_waiters:
                    desc.unbind_waiters.remove(caller)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            return 0

    def _bind_changed(self) -> None:
        for t in self.bind_waiters:
            t.cond.notify_all()

    def _do_unbind(self, dc: DC, desc: Desc) -> None:
        """Free a slot and settle everybody who depended on it (§4.3 do_unbind)."""
        if desc.is_free:
            return
        self._bind_changed()
        ep = desc.endpoint
        # senders queued on it
        while desc.senders:
            snd = desc.senders.popleft()
            snd.rts &= ~C.SENDING
            if snd.is_remote:
                rc = E.EDVSDEADSRCDST if snd.rts & C.RECEIVING else E.EDVSDSTDIED
                snd.rts &= ~C.RECEIVING
                self._queue_ack(snd, C.CMD_SEND_ACK, ep, rc, dc)
            else:
                snd.rts &= ~C.RECEIVING
                snd.misc &= ~C.MIS_ATOMIC
                self._wake(snd, E.EDVSDSTDIED)
        idx = desc.nr + dc.info.dc_nr_tasks
        for other in dc.slots:
            if other.is_free or other is desc:
                continue
            other.notify_pending.discard(idx)
            if desc in other.senders:
                other.senders.remove(desc)
            if other.rts & C.RECEIVING and other.getfrom == ep and not other.rts & C.SENDING:
                other.rts &= ~C.RECEIVING
                other.misc &= ~C.MIS_ATOMIC
                if other.is_remote:
                    self._queue_ack(other, C.CMD_SEND_ACK, ep, E.EDVSSRCDIED, dc)
                else:
                    self._wake(other, E.EDVSSRCDIED)
        if desc.rts & C.RMTOPER:
            self._dequeue(desc)
        for waiter in desc.unbind_waiters:
            self._wake(waiter, 0)
        desc.unbind_waiters.clear()
        if desc.task is not None and desc.task.desc is desc:
            desc.task.desc = None
            if desc.rts & (C.SENDING | C.RECEIVING | C.ONCOPY):
                self._wake(desc, E.EDVSSHUTDOWN)
        fresh = Desc(nr=desc.nr, dcid=desc.dcid, endpoint=desc.nr)
        desc.__dict__.update(fresh.__dict__)

    def wait4bind(self, task: Task, cmd: int, ep: int, tout: int) -> int:
        """Wait until the caller (ep = SELF) or endpoint `ep` of its DC is bound (WAIT_BIND)
        or free (WAIT_UNBIND)."""
        with self.lock:
            self._require_init()
            if ep == C.SELF:
                def done():
                    if task.proxy is not None:
                        return C.NONE
                    if task.desc is not None:
                        return task.desc.endpoint if cmd == C.WAIT_BIND else None
                    return 0 if cmd == C.WAIT_UNBIND else None
            else:
                caller = task.desc
                if caller is None:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                desc = self.dcs[caller.dcid].slot(_ep_p(ep))
                if desc is None:
                    raise E.DvkError.for_code(E.EDVSRANGE)

                def done():
                    if cmd == C.WAIT_BIND:
                        return ep if not desc.is_free else None
                    return 0 if desc.is_free else None
            deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
            self.bind_waiters.add(task)
            try:
                while True:
                    result = done()
                    if result is not None:
                        return result
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise E.DvkError.for_code(E.EDVSTIMEDOUT)
                    task.cond.wait(LIVENESS_SLICE if left is None else min(left, LIVENESS_SLICE))
                    if task.dead:
                        raise TaskGone()
                    if task.probe is not None and not task.probe():
                        self._task_exit(task)  # its process died while it waited
                        raise TaskGone()
            finally:
                self.bind_waiters.discard(task)

    def getep(self, task: Task, pid: int) -> int:
        with self.lock:
            self._require_init()
            if task.desc is None and task.proxy is None:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            if not 1 <= pid <= 4194304:
                raise E.DvkError.for_code(E.EDVSBADRANGE)
            target = self.tasks.get(pid)
            if target is None:
                target = next((t for t in self.tasks.values() if t.pid == pid and t.desc), None)
            if target is None:
                if not os.path.exists(f"/proc/{pid}"):
                    raise E.DvkError.for_code(E.EDVSBADPID)
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            if target.proxy is not None:
                raise E.DvkError.for_code(E.EDVSBADPROC)
            if target.desc is None:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            return target.desc.endpoint

    # ================================================================ the sender FIFO
    def _sproxy_pair(self, nodeid: int) -> ProxyPair:
        """The pair serving `nodeid`, which must be bound and connected (§4.5)."""
        node = self.nodes[nodeid] if 0 <= nodeid < len(self.nodes) else None
        if node is None or node.n_proxies < 0:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        pair = self.proxies[node.n_proxies]
        if not pair.in_use or pair.sproxy is None or not pair.sproxy.misc & C.MIS_PROXY:
            raise E.DvkError.for_code(E.EDVSNOPROXY)
        if not pair.sproxy.misc & C.MIS_CONNECTED:
            raise E.DvkError.for_code(E.EDVSNOTCONN)
        return pair

    def _enqueue(self, desc: Desc, pair: ProxyPair) -> None:
        desc.rts |= C.RMTOPER
        desc.proxy = pair.info.px_id
        pair.queue.append(desc)
        self._wake(pair.sproxy, 0)

    def _dequeue(self, desc: Desc) -> None:
        if desc.proxy != C.NONE and 0 <= desc.proxy < len(self.proxies):
            pair = self.proxies[desc.proxy]
            if desc in pair.queue:
                pair.queue.remove(desc)
        desc.rts &= ~C.RMTOPER
        desc.proxy = C.NONE

    def _rmtcmd(self, desc: Desc, cmd: int, dcid: int, src: int, dst: int, dnode: int,
                rcode: int = 0, length: int = 0) -> Header:
        h = desc.rmtcmd
        h.buf[:] = bytes(HEADER_SIZE)
        h.c_cmd, h.c_dcid, h.c_src, h.c_dst = cmd, dcid, src, dst
        h.c_snode, h.c_dnode, h.c_rcode, h.c_len = self.local_nodeid, dnode, rcode, length
        h.c_pid = desc.lpid
        return h

    def _queue_ack(self, rdesc: Desc, cmd: int, src_ep: int, rcode: int, dc: DC,
                   lpid: int = -1) -> None:
        """Queue an ACK on a REMOTE descriptor when the link to its node is up (§4.6)."""
        try:
            pair = self._sproxy_pair(rdesc.nodeid)
        except E.DvkError:
            log.debug("ACK %#x to %d@%d dropped: no connected sender", cmd, rdesc.endpoint,
                      rdesc.nodeid)
            return
        if rdesc.rts & C.RMTOPER:
            self._dequeue(rdesc)
        h = self._rmtcmd(rdesc, cmd, dc.info.dc_dcid, src_ep, rdesc.endpoint, rdesc.nodeid,
                         rcode)
        h.c_pid = lpid
        self._enqueue(rdesc, pair)

    # ================================================================ local and remote IPC
    def send(self, task: Task, ep: int, msg: bytes, tout: int) -> int:
        with self.lock:
            dc, caller = self._caller(task, DVK_SEND)
            dst = self._dest(dc, caller, ep, E.EDVSDSTDIED, self_rc=E.EDVSBADDEST)
            msg = _with_source(msg, caller.endpoint)
            if dst.is_remote:
                return self._remote_request(task, dc, caller, dst, C.CMD_SEND_MSG, msg, tout)
            if not self._waiting_for(dst, caller.endpoint):
                if tout == C.TIMEOUT_NOWAIT:
                    raise E.DvkError.for_code(E.EDVSAGAIN)
                caller.rts |= C.SENDING
                caller.sendto = ep
                caller.msg = msg
                dst.senders.append(caller)
                self._sleep_call(task, caller, tout)
            else:
                self._deliver(dst, msg)
            caller.lclsent += 1
            return 0

    def sendrec(self, task: Task, ep: int, msg: bytes, tout: int) -> bytes:
        """Send `msg` and wait for the reply, which is returned."""
        with self.lock:
            dc, caller = self._caller(task, DVK_SENDREC)
            dst = self._dest(dc, caller, ep, E.EDVSDEADSRCDST)
            msg = _with_source(msg, caller.endpoint)
            task.inbox = None
            caller.misc |= C.MIS_ATOMIC
            try:
                if dst.is_remote:
                    self._remote_request(task, dc, caller, dst, C.CMD_SNDREC_MSG, msg, tout)
                    return task.inbox or msg
                if self._waiting_for(dst, caller.endpoint):
                    self._deliver(dst, msg)
                    caller.rts |= C.RECEIVING
                    caller.getfrom = ep
                elif (dst.rts & C.SENDING and dst.sendto == caller.endpoint
                      and dst in caller.senders):
                    caller.senders.remove(dst)  # restart case: its message is the reply
                    dst.rts &= ~C.SENDING
                    dst.sendto = C.NONE
                    self._wake(dst, 0)
                    return dst.msg
                else:
                    if tout == C.TIMEOUT_NOWAIT:
                        raise E.DvkError.for_code(E.EDVSAGAIN)
                    caller.rts |= C.SENDING | C.RECEIVING
                    caller.sendto = caller.getfrom = ep
                    caller.msg = msg
                    dst.senders.append(caller)
                caller.lclsent += 1
                self._sleep_call(task, caller, tout)
                return task.inbox or msg
            finally:
                caller.misc &= ~C.MIS_ATOMIC

    def receive(self, task: Task, src: int, tout: int, rqst_only: bool = False) -> bytes:
        """Receive from `src` (or ANY); `rqst_only` is rcvrqst (no notifications)."""
        with self.lock:
            dc, caller = self._caller(task, DVK_RCVRQST if rqst_only else DVK_RECEIVE)
            if not rqst_only:
                if caller.misc & C.MIS_WOKENUP and src == C.ANY:
                    caller.misc &= ~C.MIS_WOKENUP
                    raise E.DvkError.for_code(E.EDVSWOKENUP)
                if src != C.ANY:
                    p_nr = _ep_p(src)
                    if not (-dc.info.dc_nr_tasks <= p_nr
                            < dc.info.dc_nr_procs - dc.info.dc_nr_tasks):
                        raise E.DvkError.for_code(E.EDVSRANGE)
                if caller.notify_pending:  # lowest system slot first; src ignored (§4.10)
                    sid = min(caller.notify_pending)
                    caller.notify_pending.discard(sid)
                    if not caller.notify_pending:
                        caller.misc &= ~C.MIS_NOTIFY
                    return self._notify_msg(dc, sid - dc.info.dc_nr_tasks, caller)
            for snd in list(caller.senders):
                if src not in (C.ANY, snd.endpoint):
                    continue
                caller.senders.remove(snd)
                snd.rts &= ~C.SENDING
                snd.sendto = C.NONE
                if snd.is_remote:
                    if not snd.rts & C.RECEIVING:
                        self._queue_ack(snd, C.CMD_SEND_ACK, caller.endpoint, 0, dc, caller.lpid)
                elif not snd.rts & C.RECEIVING:
                    self._wake(snd, 0)
                return snd.msg
            if tout == C.TIMEOUT_NOWAIT:
                raise E.DvkError.for_code(E.EDVSAGAIN)
            if src != C.ANY:
                other = dc.slot(_ep_p(src))
                if other is not None and other.is_remote:
                    if not self.nodes[other.nodeid].n_flags & C.NODE_RCONNECTED:
                        raise E.DvkError.for_code(E.EDVSNOTCONN)
            caller.rts |= C.RECEIVING
            caller.getfrom = src
            task.inbox = None
            self._sleep_call(task, caller, tout)
            return task.inbox if task.inbox is not None else bytes(MESSAGE_SIZE)

    def reply(self, task: Task, ep: int, msg: bytes, tout: int) -> int:
        with self.lock:
            dc, caller = self._caller(task, DVK_REPLY)
            dst = self._dest(dc, caller, ep, E.EDVSDSTDIED)
            msg = _with_source(msg, caller.endpoint)
            if dst.is_remote:
                return self._remote_request(task, dc, caller, dst, C.CMD_REPLY_MSG, msg, tout)
            if not (dst.rts & C.RECEIVING and not dst.rts & C.SENDING
                    and dst.getfrom == caller.endpoint):
                raise E.DvkError.for_code(E.EDVSPROCSTS)
            self._deliver(dst, msg)
            caller.lclsent += 1
            return 0

    def notify(self, task: Task, src_nr: int, ep: int, value: int) -> int:
        with self.lock:
            dc, caller = self._caller(task, DVK_NOTIFY)
            if src_nr == C.SELF:
                src_nr = caller.nr
            src = dc.slot(src_nr) if src_nr != C.HARDWARE else None
            if src_nr != C.HARDWARE and src is None:
                raise E.DvkError.for_code(E.EDVSRANGE)
            dst = self._dest(dc, caller, ep, E.EDVSDSTDIED, self_rc=E.EDVSBADDEST)
            if not dc.is_sys(dst.nr):
                raise E.DvkError.for_code(E.EDVSTRAPDENIED)
            if dst.priv_id >= dc.info.dc_nr_sysprocs:
                raise E.DvkError.for_code(E.EDVSPRIVILEGES)
            sid = src_nr + dc.info.dc_nr_tasks
            bits = 32
            if dst.is_remote:
                msg = self._notify_msg(dc, src_nr, dst)
                rc_val = value if 0 <= value < bits else -1
                return self._remote_request(task, dc, caller, dst, C.CMD_NTFY_MSG, msg,
                                            C.TIMEOUT_FOREVER, rcode=rc_val)
            if 0 <= value < bits:
                dst.update_pending |= 1 << value
            if self._waiting_for(dst, src.endpoint if src else C.HARDWARE):
                self._deliver(dst, self._notify_msg(dc, src_nr, dst))
                return 0
            if sid in dst.notify_pending:
                log.debug("notify overrun %d -> %d", src_nr, ep)
            dst.notify_pending.add(sid)
            dst.misc |= C.MIS_NOTIFY
            return 0

    def _notify_msg(self, dc: DC, src_nr: int, dst: Desc) -> bytes:
        m = Message()
        src = dc.slot(src_nr)
        m.m_source = src.endpoint if src is not None else src_nr
        m.m_type = C.NOTIFY_FROM(src_nr)
        now = time.time()
        m.m9_t1_sec, m.m9_t1_nsec = int(now), int((now % 1) * 1e9)
        m.m9_l1 = dst.update_pending & 0x7FFFFFFF
        dst.update_pending = 0
        return bytes(m)

    def _deliver(self, dst: Desc, msg: bytes) -> None:
        """Copy a message into a waiting local receiver and wake it."""
        dst.rts &= ~C.RECEIVING
        dst.getfrom = C.NONE
        if dst.task is not None:
            dst.task.inbox = msg
        self._wake(dst, 0)

    def _sleep_call(self, task: Task, caller: Desc, tout: int) -> int:
        """Sleep in an IPC call; on timeout take the caller out of every queue it is in.
        Raises the DvkError of a failed call."""
        rc = self._sleep(task, tout)
        if not task.woken:
            self._cancel(caller)
        if rc < 0:
            raise E.DvkError.for_code(rc)
        return rc

    def _cancel(self, caller: Desc) -> None:
        if caller.rts & C.RMTOPER:
            self._dequeue(caller)
        if caller.rts & C.SENDING and caller.sendto not in (C.NONE, C.ANY):
            dc = self.dcs[caller.dcid]
            dst = dc.slot(_ep_p(caller.sendto))
            if dst is not None and caller in dst.senders:
                dst.senders.remove(caller)
        caller.rts &= ~(C.SENDING | C.RECEIVING)
        caller.getfrom = caller.sendto = C.NONE
        caller.misc &= ~C.MIS_ATOMIC

    def _remote_request(self, task: Task, dc: DC, caller: Desc, dst: Desc, cmd: int,
                        msg: bytes, tout: int, rcode: int = 0) -> int:
        """Hand a request for a REMOTE destination to its node's sender proxy (§4.5)."""
        pair = self._sproxy_pair(dst.nodeid)
        if caller.rts & C.RMTOPER:
            raise E.DvkError.for_code(E.EDVSENQUEUED)
        h = self._rmtcmd(caller, cmd, dc.info.dc_dcid, caller.endpoint, dst.endpoint,
                         dst.nodeid, rcode)
        h.c_msg.load(msg)
        if cmd == C.CMD_NTFY_MSG:
            caller.rts |= C.SENDING
        else:
            caller.rts |= C.SENDING
            caller.sendto = dst.endpoint
            if cmd == C.CMD_SNDREC_MSG:
                caller.rts |= C.RECEIVING
                caller.getfrom = dst.endpoint
        self._enqueue(caller, pair)
        if dst.rts & C.RECEIVING and dst.getfrom == caller.endpoint:
            dst.rts &= ~C.RECEIVING  # this is the reply its remote sendrec waited for
            dst.getfrom = C.NONE
            dst.misc &= ~C.MIS_ATOMIC
        self._sleep_call(task, caller, tout)
        caller.rmtsent += 1
        return 0

    # ================================================================ vcopy
    def vcopy(self, task: Task, src_ep: int, saddr: int, dst_ep: int, daddr: int,
              nbytes: int) -> int:
        with self.lock:
            dc, caller = self._caller(task, DVK_VCOPY)
            if nbytes < 0 or nbytes > self.dvs.d_max_copylen:
                raise E.DvkError.for_code(E.EDVS2BIG if nbytes > 0 else E.EDVSINVAL)
            if src_ep == C.SELF:
                src_ep = caller.endpoint
            elif dst_ep == C.SELF:
                dst_ep = caller.endpoint
            if src_ep == dst_ep or C.ANY in (src_ep, dst_ep) or C.NONE in (src_ep, dst_ep):
                raise E.DvkError.for_code(E.EDVSENDPOINT)
            parties = []
            for ep in (src_ep, dst_ep):
                d = dc.slot(_ep_p(ep))
                if d is None:
                    raise E.DvkError.for_code(E.EDVSRANGE)
                if d.is_free:
                    raise E.DvkError.for_code(E.EDVSNOTBIND)
                if d.endpoint != ep:
                    raise E.DvkError.for_code(E.EDVSENDPOINT)
                if d is not caller:
                    if d.is_remote:
                        if d.rts & C.RMTOPER:
                            raise E.DvkError.for_code(E.EDVSBUSY)
                    elif not d.rts & C.RECEIVING:
                        raise E.DvkError.for_code(E.EDVSPROCSTS)
                if d.rts & C.ONCOPY:
                    raise E.DvkError.for_code(E.EDVSBUSY)
                parties.append(d)
            src, dst = parties
            if (not src.is_remote and not dst.is_remote and src.task is not None
                    and src.task is dst.task):
                raise E.DvkError.for_code(E.EDVSPERM)
            involved = {id(d): d for d in (caller, src, dst)}.values()
            for d in involved:
                d.rts |= C.ONCOPY
            try:
                if not src.is_remote and not dst.is_remote:
                    return self._copy_local(src, saddr, dst, daddr, nbytes, caller)
                return self._copy_remote(task, dc, caller, src, saddr, dst, daddr, nbytes)
            finally:
                for d in involved:
                    d.rts &= ~C.ONCOPY

    def _space(self, desc: Desc | None) -> AddressSpace:
        if desc is None or desc.is_free or desc.is_remote or desc.task is None:
            raise E.DvkError.for_code(E.EDVSBADPROC)
        return desc.task.space

    def _copy_local(self, src: Desc, saddr: int, dst: Desc, daddr: int, nbytes: int,
                    caller: Desc) -> int:
        step = self.dvs.d_max_copybuf
        last = 0
        try:
            sspace, dspace = self._space(src), self._space(dst)
            for off in range(0, nbytes, step):
                chunk = min(step, nbytes - off)
                dspace.write(daddr + off, sspace.read(saddr + off, chunk))
                last = chunk
        except ValueError as exc:
            log.debug("vcopy fault: %s", exc)
            raise E.DvkError.for_code(E.EDVSFAULT) from None
        caller.lclcopy += 1
        return last

    def _copy_remote(self, task: Task, dc: DC, caller: Desc, src: Desc, saddr: int,
                     dst: Desc, daddr: int, nbytes: int) -> int:
        """One synchronous command per chunk of the pair's px_maxbytes (§4.5 table)."""
        if src.is_remote and dst.is_remote:
            if src.nodeid != dst.nodeid:
                raise E.DvkError.for_code(E.EDVSNOSYS)  # 3-node copies: see docs/emulator.md
            cmd, target = C.CMD_COPYLCL_RQST, dst
        elif dst.is_remote:
            cmd, target = C.CMD_COPYIN_DATA, dst
        else:
            cmd, target = C.CMD_COPYOUT_RQST, src
        pair = self._sproxy_pair(target.nodeid)
        step = max(1, pair.info.px_maxbytes)
        for off in range(0, nbytes, step):
            chunk = min(step, nbytes - off)
            h = self._rmtcmd(caller, cmd, dc.info.dc_dcid, caller.endpoint, target.endpoint,
                             target.nodeid, 0, chunk if cmd == C.CMD_COPYIN_DATA else 0)
            h.v_src, h.v_dst, h.v_rqtr = src.endpoint, dst.endpoint, caller.endpoint
            h.v_saddr, h.v_daddr, h.v_bytes = saddr + off, daddr + off, chunk
            self._enqueue(caller, pair)
            rc = self._sleep(task, C.TIMEOUT_MOLCALL)
            if not task.woken:
                self._dequeue(caller)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            caller.rmtcopy += 1
            pair = self._sproxy_pair(target.nodeid)
        return 0

    # ================================================================ get2rmt / put2lcl
    def get2rmt(self, task: Task, payload_addr: int, tout: int) -> bytes:
        """Next command of this sender proxy's FIFO, data copied to `payload_addr`."""
        return self.get2rmt_more(task, payload_addr, tout)[0]

    def get2rmt_more(self, task: Task, payload_addr: int, tout: int) -> tuple[bytes, int]:
        """`get2rmt`, plus how many commands were still queued for the proxy afterwards (an
        upper bound: a proxy batches only when it knows more is waiting, so a lone command is
        never delayed by an extra call)."""
        with self.lock:
            px = self._proxy_caller(task, DVK_GET2RMT)
            pair = self.proxies[px.nr]
            deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
            while True:
                while pair.queue:
                    desc = pair.queue.popleft()
                    try:
                        out = self._take_command(pair, desc, task, payload_addr)
                    except E.DvkError as err:
                        if not desc.is_remote:
                            desc.rts &= ~(C.SENDING | C.RECEIVING | C.RMTOPER)
                            self._wake(desc, err.code)
                            raise
                        continue
                    if out is not None:
                        return out, len(pair.queue)
                if not px.misc & C.MIS_CONNECTED:
                    raise E.DvkError.for_code(E.EDVSNOTCONN)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise E.DvkError.for_code(E.EDVSTIMEDOUT)
                task.woken = False
                task.cond.wait(LIVENESS_SLICE if left is None else min(left, LIVENESS_SLICE))
                if task.dead:
                    raise TaskGone()
                if task.probe is not None and not task.woken and not task.probe():
                    self._task_exit(task)
                    raise TaskGone()

    def _take_command(self, pair: ProxyPair, desc: Desc, task: Task,
                      payload_addr: int) -> bytes | None:
        h = desc.rmtcmd
        desc.rts &= ~C.RMTOPER
        desc.proxy = C.NONE
        if desc.is_free:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        dnode = h.c_dnode
        if not 0 <= h.c_dcid < self.dvs.d_nr_dcs:
            raise E.DvkError.for_code(E.EDVSBADDCID)
        if not self.nodes[dnode].n_dcs & (1 << h.c_dcid):
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        if not pair.sproxy.nodemap & (1 << dnode):
            raise E.DvkError.for_code(E.EDVSNONODE)
        dc = self.dcs[h.c_dcid]
        if not dc.running:
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        now = time.time()
        h.c_tv_sec, h.c_tv_nsec = int(now), int((now % 1) * 1e9)
        cmd = h.c_cmd
        data = None
        if not desc.is_remote:
            h.c_pid = desc.lpid
            if cmd in (C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG, C.CMD_NTFY_MSG):
                h.c_msg.m_source = desc.endpoint
            if cmd == C.CMD_SNDREC_MSG:
                desc.rts &= ~C.SENDING
                desc.sendto = C.NONE
            elif cmd == C.CMD_NTFY_MSG:
                desc.rts &= ~C.SENDING
                self._wake(desc, 0)
            elif cmd == C.CMD_COPYIN_DATA:
                if h.v_bytes > pair.info.px_maxbytes:
                    raise E.DvkError.for_code(E.EDVS2BIG)
                data = self._read_party(dc, h.v_src, h.v_saddr, h.v_bytes)
        else:
            if cmd == C.CMD_COPYOUT_DATA:
                src = dc.slot(_ep_p(h.c_src))
                if h.c_rcode == 0:
                    try:
                        data = self._read_party(dc, h.v_src, h.v_saddr, h.v_bytes)
                    except E.DvkError as err:
                        h.c_rcode, h.c_len = err.code, 0
                if src is not None:
                    src.rts &= ~C.ONCOPY
            elif cmd in (C.CMD_COPYIN_ACK, C.CMD_COPYLCL_ACK, C.CMD_COPYRMT_ACK):
                dst = dc.slot(_ep_p(h.v_dst))
                if dst is not None and not dst.is_remote:
                    dst.rts &= ~C.ONCOPY
            elif cmd not in (C.CMD_SEND_ACK, C.CMD_SNDREC_ACK):
                raise E.DvkError.for_code(E.EDVSINVAL)
        if data is not None:
            h.c_len = len(data)
            task.space.write(payload_addr, data)
        h.c_flags = h.c_snd_seq = h.c_ack_seq = h.c_batch_nr = 0
        out = bytes(h.buf)
        h.c_cmd = C.CMD_NONE
        node = self.nodes[dnode]
        node.n_stime_sec, node.n_stime_nsec = h.c_tv_sec, h.c_tv_nsec
        node.n_pxsent += 1
        pair.sproxy.rmtsent += 1
        return out

    def _read_party(self, dc: DC, ep: int, addr: int, nbytes: int) -> bytes:
        party = dc.slot(_ep_p(ep))
        if party is None or party.is_free or party.is_remote:
            raise E.DvkError.for_code(E.EDVSBADPROC)
        try:
            return self._space(party).read(addr, nbytes)
        except ValueError:
            raise E.DvkError.for_code(E.EDVSFAULT) from None

    def put2lcl(self, task: Task, hdr: bytes, payload_addr: int) -> int:
        with self.lock:
            self._proxy_caller(task, DVK_PUT2LCL)
            h = Header(bytearray(hdr))
            return self._put2lcl(task, h, payload_addr)

    def _put2lcl(self, task: Task, h: Header, payload_addr: int) -> int:
        cmd, dcid = h.c_cmd, h.c_dcid
        if not 0 <= dcid < self.dvs.d_nr_dcs:                                   # 1
            raise E.DvkError.for_code(E.EDVSBADDCID)
        dc = self.dcs[dcid]
        if not dc.running:                                                      # 2
            raise E.DvkError.for_code(E.EDVSDCNOTRUN)
        if not (dc.in_range(_ep_p(h.c_src)) and dc.in_range(_ep_p(h.c_dst))):  # 3
            raise E.DvkError.for_code(E.EDVSRANGE)
        snode = h.c_snode
        if not (0 <= snode < self.dvs.d_nr_nodes and dc.info.dc_nodes & (1 << snode)):  # 4
            raise E.DvkError.for_code(E.EDVSNODCNODE)
        if h.c_dnode != self.local_nodeid:                                      # 5
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        now = time.time()
        node = self.nodes[snode]
        node.n_rtime_sec, node.n_rtime_nsec = int(now), int((now % 1) * 1e9)
        rmt = dc.slot(_ep_p(h.c_src))
        lcl = dc.slot(_ep_p(h.c_dst))
        if rmt.is_free:                                                         # 6
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        if rmt.is_remote:
            if rmt.endpoint != h.c_src:                                         # 7
                raise E.DvkError.for_code(E.EDVSENDPOINT)
            if rmt.nodeid != snode:                                             # 8
                raise E.DvkError.for_code(E.EDVSNONODE)
        if not lcl.is_free and not lcl.is_remote and not dc.is_sys(lcl.nr) \
                and not dc.is_sys(rmt.nr):                                      # 9
            return self._put_error(dc, h, rmt, lcl, E.EDVSTRAPDENIED)
        if not rmt.is_remote and not rmt.misc & C.MIS_REPLICATED:               # 10
            raise E.DvkError.for_code(E.EDVSLCLPROC)
        is_request = cmd in (C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG,
                             C.CMD_NTFY_MSG, C.CMD_COPYIN_DATA, C.CMD_COPYOUT_RQST,
                             C.CMD_COPYLCL_RQST, C.CMD_COPYRMT_RQST, C.CMD_COPYIN_RQST)
        if is_request and rmt.rts & (C.RMTOPER | C.SENDING):                   # 11
            raise E.DvkError.for_code(E.EDVSENQUEUED)
        if lcl.is_remote:                                                       # 12
            return self._put_error(dc, h, rmt, lcl, E.EDVSRMTPROC)
        if lcl.is_free:                                                         # 13
            return self._put_error(dc, h, rmt, lcl, E.EDVSDSTDIED)
        if lcl.endpoint != h.c_dst:                                             # 14
            raise E.DvkError.for_code(E.EDVSENDPOINT)
        if lcl.rts & C.MIGRATING or lcl.nodeid != self.local_nodeid:            # 15
            return self._put_error(dc, h, rmt, lcl, E.EDVSMIGRATE)
        needed = {C.CMD_SEND_MSG: DVK_SEND, C.CMD_SNDREC_MSG: DVK_SENDREC,
                  C.CMD_REPLY_MSG: DVK_REPLY, C.CMD_NTFY_MSG: DVK_NOTIFY}.get(cmd)
        if cmd in (C.CMD_COPYIN_DATA, C.CMD_COPYOUT_RQST, C.CMD_COPYLCL_RQST,
                   C.CMD_COPYRMT_RQST, C.CMD_COPYIN_RQST):
            needed = DVK_VCOPY
            rqtr = dc.slot(_ep_p(h.v_rqtr))
            if rqtr is not None and not rqtr.is_free and DVK_VCOPY not in rqtr.allowed:
                raise E.DvkError.for_code(E.EDVSBADCALL)                        # 16
        elif needed is not None and needed not in rmt.allowed:
            raise E.DvkError.for_code(E.EDVSBADCALL)                            # 16
        if cmd not in C.PUT2LCL_CMDS:                                           # 17
            raise E.DvkError.for_code(E.EDVSBADREQUEST)
        rc = self._dispatch(task, dc, h, rmt, lcl, payload_addr)
        if rc > 0:
            self.proxies[task.proxy.nr].rproxy.lclsent += 1
            node.n_pxrcvd += 1
        return rc

    def _put_error(self, dc: DC, h: Header, rmt: Desc, lcl: Desc, rc: int) -> int:
        """A put2lcl check that the kernel answers with an error ACK (§4.6 "yes" rows)."""
        ack = {C.CMD_SEND_MSG: C.CMD_SEND_ACK, C.CMD_SNDREC_MSG: C.CMD_SEND_ACK,
               C.CMD_REPLY_MSG: C.CMD_SEND_ACK, C.CMD_NTFY_MSG: C.CMD_SEND_ACK,
               C.CMD_COPYIN_DATA: C.CMD_COPYIN_ACK, C.CMD_COPYOUT_RQST: C.CMD_COPYOUT_DATA,
               C.CMD_COPYLCL_RQST: C.CMD_COPYLCL_ACK, C.CMD_COPYRMT_RQST: C.CMD_COPYRMT_ACK,
               C.CMD_COPYIN_RQST: C.CMD_COPYRMT_ACK}.get(h.c_cmd)
        if ack is not None and rmt.is_remote:
            self._queue_ack(rmt, ack, h.c_dst, rc, dc, lcl.lpid)
            a = rmt.rmtcmd
            a.v_src, a.v_dst, a.v_rqtr = h.v_src, h.v_dst, h.v_rqtr
            a.v_saddr, a.v_daddr, a.v_bytes = h.v_saddr, h.v_daddr, 0
        raise E.DvkError.for_code(rc)

    def _dispatch(self, task: Task, dc: DC, h: Header, rmt: Desc, lcl: Desc,
                  payload_addr: int) -> int:
        cmd = h.c_cmd
        if cmd in (C.CMD_SEND_MSG, C.CMD_SNDREC_MSG, C.CMD_REPLY_MSG):
            msg = bytes(h.c_msg)
            if self._waiting_for(lcl, rmt.endpoint):
                self._deliver(lcl, msg)
                if cmd == C.CMD_SNDREC_MSG:
                    rmt.rts |= C.RECEIVING
                    rmt.getfrom = lcl.endpoint
                    rmt.misc |= C.MIS_ATOMIC
                else:
                    self._queue_ack(rmt, C.CMD_SEND_ACK, lcl.endpoint, 0, dc, lcl.lpid)
                return MESSAGE_SIZE
            rmt.msg = msg
            rmt.rts |= C.SENDING
            rmt.sendto = lcl.endpoint
            if cmd == C.CMD_SNDREC_MSG:
                rmt.rts |= C.RECEIVING
                rmt.getfrom = lcl.endpoint
                rmt.misc |= C.MIS_ATOMIC
            lcl.senders.append(rmt)
            return 0
        if cmd == C.CMD_NTFY_MSG:
            src_type = h.c_msg.m_type & ~C.NOTIFY_MESSAGE
            sid = _ep_p(src_type) + dc.info.dc_nr_tasks
            if sid >= dc.info.dc_nr_sysprocs:
                raise E.DvkError.for_code(E.EDVSPRIVILEGES)
            if 0 <= h.c_rcode < 32:
                lcl.update_pending |= 1 << h.c_rcode
            if self._waiting_for(lcl, rmt.endpoint):
                self._deliver(lcl, bytes(h.c_msg))
                return MESSAGE_SIZE
            lcl.notify_pending.add(sid)
            lcl.misc |= C.MIS_NOTIFY
            return 0
        if cmd == C.CMD_SEND_ACK:
            if not lcl.rts & C.SENDING:
                raise E.DvkError.for_code(E.EDVSACKDST)
            if lcl.sendto != h.c_src:
                raise E.DvkError.for_code(E.EDVSACKSRC)
            lcl.rts &= ~C.SENDING
            lcl.sendto = C.NONE
            self._wake(lcl, h.c_rcode)
            return 0
        if cmd == C.CMD_SNDREC_ACK:
            if not (lcl.rts & C.RECEIVING and lcl.getfrom == h.c_src):
                raise E.DvkError.for_code(E.EDVSACKDST)
            lcl.rts &= ~(C.RECEIVING | C.SENDING)
            lcl.getfrom = lcl.sendto = C.NONE
            lcl.misc &= ~C.MIS_ATOMIC
            self._wake(lcl, h.c_rcode)
            return 0
        if cmd == C.CMD_COPYIN_DATA:
            rc = 0
            dst = dc.slot(_ep_p(h.v_dst))
            if dst is not lcl or dst.rts & (C.ONCOPY | C.SENDING):
                rc = E.EDVSPROCSTS
            elif h.v_bytes > self.proxies[task.proxy.nr].info.px_maxbytes:
                rc = E.EDVS2BIG
            else:
                try:
                    data = task.space.read(payload_addr, h.v_bytes)
                    self._space(dst).write(h.v_daddr, data)
                except (ValueError, E.DvkError):
                    rc = E.EDVSFAULT
            self._copy_ack(dc, h, rmt, C.CMD_COPYIN_ACK, rc)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            return h.v_bytes
        if cmd == C.CMD_COPYOUT_RQST:
            src = lcl
            rc = 0
            if src.rts == 0:
                rc = E.EDVSPROCSTS
            elif src.rts & C.ONCOPY:
                rc = E.EDVSBUSY
            elif src.endpoint != h.v_src:
                rc = E.EDVSENDPOINT
            if rc == 0:
                src.rts |= C.ONCOPY
            self._copy_ack(dc, h, rmt, C.CMD_COPYOUT_DATA, rc, src_ep=src.endpoint)
            if rc < 0:
                raise E.DvkError.for_code(rc)
            return 0
        if cmd == C.CMD_COPYOUT_DATA:
            rqtr = lcl
            if not rqtr.rts & C.ONCOPY:
                raise E.DvkError.for_code(E.EDVSPROCSTS)
            rc = h.c_rcode
            if rc == 0:
                try:
                    data = task.space.read(payload_addr, h.v_bytes)
                    dst = dc.slot(_ep_p(h.v_dst))
                    self._space(dst).write(h.v_daddr, data)
                except (ValueError, E.DvkError):
                    rc = E.EDVSFAULT
            self._wake(rqtr, rc)
            return h.v_bytes if rc == 0 else 0
        if cmd in (C.CMD_COPYIN_ACK, C.CMD_COPYLCL_ACK, C.CMD_COPYRMT_ACK):
            rqtr = lcl
            if not rqtr.rts & C.ONCOPY:
                raise E.DvkError.for_code(E.EDVSPROCSTS)
            self._wake(rqtr, h.c_rcode)
            return 0
        if cmd == C.CMD_COPYLCL_RQST:
            src, dst = dc.slot(_ep_p(h.v_src)), dc.slot(_ep_p(h.v_dst))
            if src is None or dst is None:  # no slot: nothing to ACK, the proxy answers
                raise E.DvkError.for_code(E.EDVSRANGE)
            rc = 0
            try:
                self._space(dst).write(h.v_daddr, self._space(src).read(h.v_saddr, h.v_bytes))
            except (ValueError, E.DvkError):
                rc = E.EDVSFAULT
            self._copy_ack(dc, h, rmt, C.CMD_COPYLCL_ACK, rc)
            return h.v_bytes if rc == 0 else 0
        raise E.DvkError.for_code(E.EDVSBADREQUEST)  # COPYRMT/COPYIN_RQST: docs/emulator.md

    def _copy_ack(self, dc: DC, h: Header, rmt: Desc, cmd: int, rc: int,
                  src_ep: int | None = None) -> None:
        """Queue the answer to a copy command on the remote requester's descriptor."""
        self._queue_ack(rmt, cmd, h.c_dst if src_ep is None else src_ep, rc, dc)
        if not rmt.rts & C.RMTOPER:
            return
        a = rmt.rmtcmd
        a.v_src, a.v_dst, a.v_rqtr = h.v_src, h.v_dst, h.v_rqtr
        a.v_saddr, a.v_daddr, a.v_bytes = h.v_saddr, h.v_daddr, h.v_bytes
        if cmd == C.CMD_COPYOUT_DATA:
            a.c_len = h.v_bytes if rc == 0 else 0

    # ================================================================ misc calls
    def wakeup(self, task: Task, dcid: int, ep: int) -> int:
        with self.lock:
            self._require_init()
            dc = self._running_dc(dcid)
            desc = dc.slot(_ep_p(ep))
            if desc is None or desc.is_free:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            if desc.is_remote:
                raise E.DvkError.for_code(E.EDVSRMTPROC)
            if desc.rts & C.RECEIVING and desc.getfrom == C.ANY and not desc.rts & C.SENDING:
                desc.rts &= ~C.RECEIVING
                desc.getfrom = C.NONE
                self._wake(desc, E.EDVSWOKENUP)
                return 0
            desc.misc |= C.MIS_WOKENUP
            raise E.DvkError.for_code(E.EDVSPROCRUN if desc.rts == 0 else E.EDVSPROCSTS)

    def getpriv(self, task: Task, dcid: int, ep: int) -> bytes:
        with self.lock:
            self._require_init()
            desc = self._running_dc(dcid).slot(_ep_p(ep))
            if desc is None or desc.is_free:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            return _priv_bytes(desc)

    def setpriv(self, task: Task, dcid: int, ep: int, priv: bytes) -> int:
        with self.lock:
            self._require_init()
            desc = self._running_dc(dcid).slot(_ep_p(ep))
            if desc is None or desc.is_free:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            level = int.from_bytes(priv[8:12], "little", signed=True)
            if level >= C.SERVER_PRIV:
                desc.allowed = ALL_CALLS
            return 0

    # ================================================================ /proc views
    def proc_text(self, path: str) -> str:
        from . import procfs
        with self.lock:
            try:
                return procfs.render(self, path)
            except ValueError:
                raise E.DvkError.for_code(E.EDVSINVAL) from None


def _bits(mask: int):
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def _with_source(msg: bytes, ep: int) -> bytes:
    m = Message(bytearray(msg))
    m.m_source = ep
    return bytes(m)


def _priv_bytes(desc: Desc) -> bytes:
    import struct
    level = C.PROXY_PRIV if desc.misc & C.MIS_PROXY else (
        C.SERVER_PRIV if len(desc.allowed) > len(USER_CALLS) else C.USER_PRIV)
    return struct.pack("<hxxii", desc.priv_id, 0, level).ljust(52, b"\0")


def _alive(tid: int) -> bool:
    """The thread exists and is not a zombie (a zombie has exited: the kernel unbinds it)."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(tid: int, sig: int) -> None:
    try:
        os.kill(tid, sig)
    except OSError:
        pass
