"""DVS, DCs and nodes: initialisation, membership, the info views and privileges."""

from __future__ import annotations

import logging
import os
import signal

from .. import consts as C
from .. import errors as E
from ..info import DcInfo, DvsInfo, NodeInfo, ProcInfo
from .model import (
    DC,
    ProxyPair,
    Task,
    ep_p,
    priv_bytes,
    signal_thread,
)

log = logging.getLogger("dvk.emu")


class Admin:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def dvs_init(self, task: Task, nodeid: int, params: DvsInfo | None) -> int:
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
        local.n_flags = C.NODE_ATTACHED | C.NODE_SCONNECTED  # the kernel's 0x6
        log.info("DVS initialised: node %d", nodeid)
        return nodeid

    def dvs_end(self, task: Task) -> int:
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
        return self.local_nodeid, self.dvs

    def dc_init(self, task: Task, p: DcInfo) -> int:
        self._require_init()
        d = self.dvs
        if not (0 <= p.dc_dcid < d.d_nr_dcs and 1 <= p.dc_nr_procs <= d.d_nr_procs
                and 1 <= p.dc_nr_tasks <= d.d_nr_tasks
                and 1 <= p.dc_nr_sysprocs <= d.d_nr_sysprocs
                and 1 <= p.dc_nr_nodes <= d.d_nr_nodes
                and p.dc_nr_sysprocs < p.dc_nr_procs + p.dc_nr_tasks
                and p.dc_nr_sysprocs > p.dc_nr_tasks):
            raise E.DvkError.for_code(E.EDVSBADRANGE)
        try:    # a C string of the info struct: one byte per character
            name_size = len(p.dc_name.encode("latin-1"))
        except UnicodeEncodeError:
            raise E.DvkError.for_code(E.EDVSBADVALUE) from None
        if name_size >= C.MAXDCNAME:
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
        self._require_init()
        dc = self._running_dc(dcid)
        self._dc_end(dc)
        return 0

    def _dc_end(self, dc: DC) -> None:
        for desc in dc.slots:
            if not desc.is_free:
                if not desc.is_remote and desc.task is not None and desc.task.pid != os.getpid():
                    signal_thread(desc.task.tid, signal.SIGTERM)
                self._do_unbind(dc, desc)
        dc.info.dc_flags = C.DC_FREE
        dc.info.dc_nodes = 0
        for node in self.nodes:
            node.n_dcs &= ~(1 << dc.info.dc_dcid)

    def getdcinfo(self, task: Task, dcid: int) -> DcInfo:
        self._require_init()
        if dcid == -1:
            if task.desc is None:
                raise E.DvkError.for_code(E.EDVSNOTBIND)
            dcid = task.desc.dcid
        return self._dc(dcid).info

    def getnodeinfo(self, task: Task, nodeid: int) -> NodeInfo:
        self._require_init()
        if nodeid == -1:
            nodeid = self.local_nodeid
        if not 0 <= nodeid < self.dvs.d_nr_nodes:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        return self.nodes[nodeid]

    def getprocinfo(self, task: Task, dcid: int, p_nr: int) -> ProcInfo:
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
        self._require_init()
        if not 0 <= nodeid < self.dvs.d_nr_nodes or nodeid == self.local_nodeid:
            raise E.DvkError.for_code(E.EDVSBADNODEID)
        dc = self._running_dc(dcid)
        if not dc.info.dc_nodes & (1 << nodeid):
            raise E.DvkError.for_code(E.EDVSDCNODE)
        dc.info.dc_nodes &= ~(1 << nodeid)
        self.nodes[nodeid].n_dcs &= ~(1 << dcid)
        return 0

    def wakeup(self, task: Task, dcid: int, ep: int) -> int:
        self._require_init()
        dc = self._running_dc(dcid)
        desc = dc.slot(ep_p(ep))
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
        self._require_init()
        desc = self._running_dc(dcid).slot(ep_p(ep))
        if desc is None or desc.is_free:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        return priv_bytes(desc)

    def setpriv(self, task: Task, dcid: int, ep: int, priv: bytes) -> int:
        self._require_init()
        desc = self._running_dc(dcid).slot(ep_p(ep))
        if desc is None or desc.is_free:
            raise E.DvkError.for_code(E.EDVSNOTBIND)
        level = int.from_bytes(priv[8:12], "little", signed=True)
        if level >= C.SERVER_PRIV:
            desc.allowed = C.DVK_ALL_CALLS
        return 0

    def proc_text(self, path: str) -> str:
        from . import procfs
        try:
            return procfs.render(self, path)
        except ValueError:
            raise E.DvkError.for_code(E.EDVSINVAL) from None
